"""Authentication: two classes of named keys (analysis keys as X-API-Key on /api/*, OpenAI keys as Bearer on /v1/*),
compared in constant time, plain or stored as sha256:<hex>."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from errors import ServiceError
from requestContext import getMeta

KEY_CLASS_API = "api"
KEY_CLASS_OPENAI = "openai"
SHA256_PREFIX = "sha256:"


def _keyDigest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _storedDigest(stored: str) -> bytes:
    if stored.lower().startswith(SHA256_PREFIX):
        try:
            return bytes.fromhex(stored[len(SHA256_PREFIX):])
        except ValueError:
            return b""
    return _keyDigest(stored)


def matchKeyName(presented: str, keys: dict[str, str]) -> str | None:
    """Name of the configured key equal to ``presented``; compares every key in constant time."""
    presentedDigest = _keyDigest(presented)
    found = None
    for name, stored in keys.items():
        if hmac.compare_digest(presentedDigest, _storedDigest(stored)) and found is None:
            found = name
    return found


def _bearerToken(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _authenticate(request: Request, presented: str, keys: dict[str, str], keyClass: str, how: str) -> str:
    if not presented:
        raise ServiceError(401, f"Missing API key: send it as {how}", code="missing_api_key")
    name = matchKeyName(presented, keys)
    if name is None:
        raise ServiceError(401, f"Invalid API key for this endpoint (expected a valid key as {how})",
                           code="invalid_api_key")
    meta = getMeta(request)
    if meta is not None:
        meta.keyName, meta.keyClass = name, keyClass
    return name


async def requireApiKey(request: Request) -> str:
    """Dependency for /api/*: the name of the analysis key in X-API-Key."""
    keys = request.app.state.settings.apiKeys
    return _authenticate(request, request.headers.get("x-api-key", "").strip(), keys, KEY_CLASS_API,
                         "the X-API-Key header")


async def requireOpenAiKey(request: Request) -> str:
    """Dependency for /v1/*: the name of the OpenAI key in Authorization: Bearer."""
    keys = request.app.state.settings.openAiKeys
    return _authenticate(request, _bearerToken(request), keys, KEY_CLASS_OPENAI, "'Authorization: Bearer <key>'")
