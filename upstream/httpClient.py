"""The one shared HTTP client for upstream calls (Ollama daemons, the whisper service): pooled keep-alive
connections, no proxies from the environment, and the lean transport for the plain-http Ollama upstreams."""

from __future__ import annotations

import httpx

from upstream.transport import UpstreamTransport, allowFastUpstreams

LEAN_TRANSPORT_ATTRIBUTE = "poweronLeanTransport"
"""The UpstreamTransport createHttpClient mounted: OllamaClient calls it directly, without httpx's client layer."""


def createHttpClient(connectTimeout: float, readTimeout: float, maxConnections: int,
                     fastUpstreamUrl: str | list[str] | None = None) -> httpx.AsyncClient:
    """The one shared client for upstream calls: pooled keep-alive connections, no proxies from the environment.

    With ``fastUpstreamUrl`` (plain http; one URL or a list), calls to those hosts go through the lean
    UpstreamTransport; ``allowFastUpstreams`` adds hosts later (upstreams added by a reload)."""
    timeout = httpx.Timeout(connect=connectTimeout, read=readTimeout, write=60.0, pool=connectTimeout + 5)
    limits = httpx.Limits(max_connections=maxConnections, max_keepalive_connections=maxConnections,
                          keepalive_expiry=60.0)
    urls = [fastUpstreamUrl] if isinstance(fastUpstreamUrl, str) else fastUpstreamUrl or []
    if not urls:
        return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, follow_redirects=False)
    fallback = httpx.AsyncHTTPTransport(limits=limits, trust_env=False)
    transport = UpstreamTransport(maxConnections, fallback, keepaliveExpiry=60.0, hosts=set())
    client = httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False, follow_redirects=False,
                               mounts={"http://": transport})
    allowFastUpstreams(transport, urls)
    setattr(client, LEAN_TRANSPORT_ATTRIBUTE, transport)
    return client


def fastTransportOf(http: httpx.AsyncClient) -> UpstreamTransport | None:
    return getattr(http, LEAN_TRANSPORT_ATTRIBUTE, None)
