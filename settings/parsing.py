"""Parsers and checks of single settings: named keys, per-key limits, local URLs, cloud model names, and ConfigError."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit


class ConfigError(Exception):
    """A configuration problem an operator must fix before the service can start."""


def isCloudModelName(ollamaName: str) -> bool:
    """True for Ollama names served by ollama.com (tag ``cloud`` or ending in ``-cloud``)."""
    tag = ollamaName.rpartition(":")[2].lower() if ":" in ollamaName else ""
    return tag == "cloud" or tag.endswith("-cloud")


def parseNamedKeys(raw: str, setting: str) -> dict[str, str]:
    """Parse ``name=key, name2=key2`` into ``{name: key}``."""
    keys: dict[str, str] = {}
    for number, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        name, sep, key = part.partition("=")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            which = f"'{name}'" if sep and name else f"number {number}"  # never echo what may be a key
            raise ConfigError(f"{setting}: entry {which} must look like name=<key>")
        if name in keys:
            raise ConfigError(f"{setting}: key name '{name}' appears twice")
        keys[name] = key
    return keys


UPSTREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
DEFAULT_UPSTREAM = "default"


def parseUpstreams(raw: str, baseUrl: str) -> dict[str, str]:
    """``[ollama] upstreams`` as ``{name: url}``; empty = ``{"default": base_url}``. URLs are not echoed in errors
    beyond the entry's name (they are internal)."""
    if not raw.strip():
        return {DEFAULT_UPSTREAM: baseUrl.rstrip("/")}
    upstreams: dict[str, str] = {}
    for number, part in enumerate((p.strip() for p in raw.split(",")), start=1):
        if not part:
            continue
        name, sep, url = (piece.strip() for piece in part.partition("="))
        if not sep or not UPSTREAM_NAME.fullmatch(name):
            raise ConfigError(f"[ollama] upstreams: entry number {number} must look like name=http://host:port "
                              "(name: letters, digits, - _ . up to 32 characters)")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(f"[ollama] upstreams: '{name}' needs a URL like http://10.0.0.5:11434 (no path)")
        if name in upstreams:
            raise ConfigError(f"[ollama] upstreams: upstream name '{name}' appears twice")
        upstreams[name] = url.rstrip("/")
    if not upstreams:
        raise ConfigError("[ollama] upstreams: no upstream given; set name=url pairs or leave it empty for base_url")
    return upstreams


def parseDrain(raw: str, upstreams: dict[str, str]) -> frozenset[str]:
    """``[ollama] drain``: upstream names, each one of ``upstreams``."""
    names = frozenset(name.strip() for name in raw.split(",") if name.strip())
    unknown = sorted(names - set(upstreams))
    if unknown:
        raise ConfigError(f"[ollama] drain: '{unknown[0]}' is not an upstream name (known: {', '.join(upstreams)})")
    return names


PerKeyLimits = tuple[float | None, int | None, int | None]


def parsePerKeyLimits(raw: str, knownNames: set[str]) -> dict[str, PerKeyLimits]:
    """Parse ``[ratelimit] per_key``: ``name=<requests per minute>/<burst>/<concurrent>`` (trailing parts optional)."""
    limits: dict[str, PerKeyLimits] = {}
    for name, value in parseNamedKeys(raw, "[ratelimit] per_key").items():
        if name not in knownNames:
            raise ConfigError(f"[ratelimit] per_key: '{name}' is not a key name from [auth] api_keys or openai_keys")
        parts = [p.strip() for p in value.split("/")]
        try:
            rpm = float(parts[0]) if parts[0] else None
            burst, concurrent = (int(p) if p else None for p in (parts + ["", ""])[1:3])
        except ValueError:
            rpm = burst = concurrent = -1
        if len(parts) > 3 or any(v is not None and v <= 0 for v in (rpm, burst, concurrent)):
            raise ConfigError(f"[ratelimit] per_key: '{name}={value}' must be <requests per minute>/<burst>/"
                              "<concurrent> with positive numbers, e.g. kiva=1200/100/32")
        limits[name] = (rpm, burst, concurrent)
    return limits


def parsePositiveNumbers(raw: str, setting: str, knownNames: set[str] | None, integer: bool) -> dict[str, float]:
    """Parse ``name=<number>, ...`` (``[ratelimit] queue_weights``, ``[ollama] num_parallel_per_model``); names must
    be in ``knownNames`` when it is given; numbers positive (whole with ``integer``)."""
    numbers: dict[str, float] = {}
    for name, value in parseNamedKeys(raw, setting).items():
        if knownNames is not None and name not in knownNames:
            raise ConfigError(f"{setting}: '{name}' is not a key name from [auth] api_keys or openai_keys")
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = 0
        if not number > 0:
            kind = "a whole number" if integer else "a number"
            raise ConfigError(f"{setting}: '{name}={value}' must be {kind} above 0, e.g. {name}=" +
                              ("2" if integer else "4"))
        numbers[name] = number
    return numbers


LOCAL_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7"))


"""Loopback and private (RFC 1918, IPv6 ULA) networks; ipaddress' is_private also counts documentation and
reserved ranges, which are not this operator's network."""


def isLocalUrl(url: str) -> bool:
    """True when the URL's host is loopback, a private (RFC 1918 / ULA) address, 0.0.0.0 or exactly localhost."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":  # not *.localhost: a resolver may send such names anywhere
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_unspecified or any(address in network for network in LOCAL_NETWORKS)


REDIS_SCHEMES = ("redis", "rediss")


def checkSharedState(workers: int, redisUrl: str, allowRemote: bool) -> None:
    """Several workers need Redis (else each would grant a key its full limits); Redis stays on this network."""
    url = redisUrl.strip()
    if workers > 1 and not url:
        raise ConfigError(f"[server] workers = {workers} needs [state] redis_url: without shared state each worker "
                          "would grant a key its full limits (set workers = 1 or configure Redis)")
    if not url:
        return
    if url.partition("://")[0].lower() not in REDIS_SCHEMES:
        raise ConfigError("[state] redis_url must start with redis:// or rediss:// (e.g. redis://127.0.0.1:6379/0)")
    if not allowRemote and not isLocalUrl(url):
        raise ConfigError("[state] redis_url is not a loopback or private address; limits and key names must stay "
                          "on this network (set [server] allow_remote_upstream = true only if that host is yours)")
