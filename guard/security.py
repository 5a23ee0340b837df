"""Authentication and admission: two classes of named keys (analysis keys as X-API-Key on /api/*, OpenAI keys as
Bearer on /v1/*), compared in constant time (plain or stored as sha256:<hex>), then the per-key rate and
concurrency limits. ``installSecurity`` wires key rings, rate limiter, key gate, body limit and CORS into the app.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import time
from types import MappingProxyType

from fastapi import FastAPI, Request
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from core.errors import ServiceError, errorResponse
from core.requestContext import getMeta
from guard.rateLimit import Clock, RateLimiter
from guard.requestLimits import BodyLimitMiddleware
from guard.sharedLimiter import SharedRateLimiter
from state.redisStore import RedisStore

KEY_CLASS_API = "api"
KEY_CLASS_OPENAI = "openai"
SHA256_PREFIX = "sha256:"
AUTH_SCOPE_KEY = "poweron.auth"
ADMITTED_SCOPE_KEY = "poweron.admitted"
KEY_CLASS_BY_PREFIX = (("/api/", KEY_CLASS_API), ("/v1/", KEY_CLASS_OPENAI))
HOW_TO_SEND = MappingProxyType({KEY_CLASS_API: "an analysis key in the X-API-Key header",
                                KEY_CLASS_OPENAI: "an OpenAI key as 'Authorization: Bearer <key>'"})
CLASS_ROUTES = MappingProxyType({KEY_CLASS_API: "/api/*", KEY_CLASS_OPENAI: "/v1/*"})
OPTIONS_HEADERS = ((b"allow", b"GET, POST, OPTIONS"), (b"content-length", b"0"))
"""Answer to a plain OPTIONS on /api/* and /v1/* (no key needed; CORS preflights from allowed origins are answered
by the CORS middleware before this)."""
CORS_EXPOSED_HEADERS = ("X-Request-ID", "Retry-After", "X-RateLimit-Limit", "X-RateLimit-Remaining")


def keyDigest(key: str) -> bytes:
    """SHA-256 of a key, as stored in config.ini after ``sha256:``."""
    return hashlib.sha256(key.encode("utf-8")).digest()


def storedDigest(stored: str) -> bytes:
    """The digest of a configured key: parsed from ``sha256:<hex>`` or computed from the plain key."""
    if stored.lower().startswith(SHA256_PREFIX):
        try:
            return bytes.fromhex(stored[len(SHA256_PREFIX):])
        except ValueError:
            return b""
    return keyDigest(stored)


class KeyRing:
    """The named keys of one class with their digests, computed once at start."""

    __slots__ = ("entries",)

    def __init__(self, keys: dict[str, str]) -> None:
        self.entries = tuple((name, storedDigest(stored)) for name, stored in keys.items())

    def match(self, presented: str) -> str | None:
        """Name of the key equal to ``presented``; compares against every key in constant time."""
        presentedDigest = keyDigest(presented)
        found = None
        for name, digest in self.entries:
            if hmac.compare_digest(presentedDigest, digest) and found is None:
                found = name
        return found


def matchKeyName(presented: str, keys: dict[str, str]) -> str | None:
    """Name of the configured key equal to ``presented`` (constant-time; builds the digests on each call)."""
    return KeyRing(keys).match(presented)


def _header(scope: Scope, wanted: bytes) -> str:
    for name, value in scope.get("headers", ()):
        if name == wanted:
            return value.decode("latin-1").strip()
    return ""


def presentedKey(scope: Scope, keyClass: str) -> str:
    """The key a request presents for a class: X-API-Key for analysis keys, the Bearer token for OpenAI keys (after
    any whitespace, a tab included)."""
    if keyClass == KEY_CLASS_API:
        return _header(scope, b"x-api-key")
    scheme, *token = _header(scope, b"authorization").split(None, 1)[:2] or [""]
    return token[0].strip() if scheme.lower() == "bearer" and token else ""


def presentsValidKey(scope: Scope, keyRings: dict[str, KeyRing]) -> bool:
    """True when the request carries a valid key of either class (for details on otherwise public routes)."""
    return any((presented := presentedKey(scope, keyClass)) and keyRings[keyClass].match(presented) is not None
               for keyClass in (KEY_CLASS_API, KEY_CLASS_OPENAI))


def _authError(keyClass: str, presented: str, keyRings: dict[str, KeyRing]) -> ServiceError:
    how = HOW_TO_SEND[keyClass]
    headers = {"WWW-Authenticate": "Bearer" if keyClass == KEY_CLASS_OPENAI else 'ApiKey header="X-API-Key"'}
    if not presented:
        return ServiceError(401, f"Missing API key: {CLASS_ROUTES[keyClass]} needs {how}",
                            code="missing_api_key", headers=headers)
    otherClass = KEY_CLASS_OPENAI if keyClass == KEY_CLASS_API else KEY_CLASS_API
    if keyRings[otherClass].match(presented) is not None:
        message = (f"Wrong key class: this key is for {CLASS_ROUTES[otherClass]}; "
                   f"{CLASS_ROUTES[keyClass]} needs {how}")
    else:
        message = f"Invalid API key: {CLASS_ROUTES[keyClass]} needs {how}"
    return ServiceError(401, message, code="invalid_api_key", headers=headers)


def authenticate(scope: Scope, keyRings: dict[str, KeyRing], keyClass: str) -> str:
    """The name of the key of ``keyClass`` the request presents (remembered in the scope); 401 otherwise."""
    known = scope.get(AUTH_SCOPE_KEY)
    if known is not None and known[0] == keyClass:
        return known[1]
    presented = presentedKey(scope, keyClass)
    name = keyRings[keyClass].match(presented) if presented else None
    if name is None:
        raise _authError(keyClass, presented, keyRings)
    scope[AUTH_SCOPE_KEY] = (keyClass, name)
    return name


async def _admit(request: Request, keyClass: str, name: str) -> None:
    """Count the request against the key's rate and concurrency limits once; the slot is freed at the end."""
    scope = request.scope
    if scope.get(ADMITTED_SCOPE_KEY):
        return
    meta = getMeta(request)
    if meta is not None:
        meta.keyName, meta.keyClass = name, keyClass
    limiter: RateLimiter | SharedRateLimiter = request.app.state.rateLimiter
    try:
        admission = await limiter.acquire(keyClass, name)
    except ServiceError:
        if meta is not None:
            meta.rateLimited = True
        raise
    scope[ADMITTED_SCOPE_KEY] = True
    if meta is None:  # no RequestContextMiddleware: nothing would free the slot later
        admission.release()
        return
    meta.finishCallbacks.append(admission.release)
    meta.responseHeaders.extend(admission.headers)


async def _requireKey(request: Request, keyClass: str) -> str:
    name = authenticate(request.scope, request.app.state.keyRings, keyClass)
    await _admit(request, keyClass, name)
    return name


async def requireApiKey(request: Request) -> str:
    """Dependency for /api/*: the name of the analysis key in X-API-Key, admitted by its rate limits."""
    return await _requireKey(request, KEY_CLASS_API)


async def requireOpenAiKey(request: Request) -> str:
    """Dependency for /v1/*: the name of the OpenAI key in Authorization: Bearer, admitted by its rate limits."""
    return await _requireKey(request, KEY_CLASS_OPENAI)


async def requireAnyKey(request: Request) -> str:
    """Dependency for what callers of either API may read (the OpenAPI document): an analysis key in X-API-Key or
    an OpenAI key as Bearer, admitted by that key's rate limits."""
    keyRings: dict[str, KeyRing] = request.app.state.keyRings
    for keyClass in (KEY_CLASS_API, KEY_CLASS_OPENAI):
        presented = presentedKey(request.scope, keyClass)
        if presented and keyRings[keyClass].match(presented) is not None:
            return await _requireKey(request, keyClass)
    presented = presentedKey(request.scope, KEY_CLASS_API) or presentedKey(request.scope, KEY_CLASS_OPENAI)
    what, code = ("Invalid API key", "invalid_api_key") if presented else ("Missing API key", "missing_api_key")
    raise ServiceError(401, f"{what}: {request.url.path} needs {HOW_TO_SEND[KEY_CLASS_API]} or "
                            f"{HOW_TO_SEND[KEY_CLASS_OPENAI]}", code=code,
                       headers={"WWW-Authenticate": 'Bearer, ApiKey header="X-API-Key"'})


def _keyClassOfPath(path: str) -> str | None:
    for prefix, keyClass in KEY_CLASS_BY_PREFIX:
        if path.startswith(prefix) or path == prefix[:-1]:
            return keyClass
    return None


class KeyGateMiddleware:
    """Pure ASGI: refuses /api/* and /v1/* requests without a valid key of their class before any body is read.

    FastAPI parses request bodies (multipart uploads included) before it runs dependencies, so without this gate an
    anonymous client could make the service read and spool uploads. The router dependencies stay the authority:
    they reuse the gate's result and add the rate limits.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keyClass = _keyClassOfPath(scope["path"]) if scope["type"] == "http" else None
        if keyClass is not None and scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": OPTIONS_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return
        if keyClass is not None:
            try:
                authenticate(scope, scope["app"].state.keyRings, keyClass)
            except ServiceError as error:
                await errorResponse(Request(scope, receive), error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def fastApiTelemetryOff() -> dict:
    """Keyword for FastAPI() that switches its native OpenTelemetry export off (in versions that have it)."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False,
                          "auto_configure": False}}


def sharedStoreFor(settings: Settings) -> RedisStore | None:
    """The Redis store of ``[state] redis_url`` (started by the app's lifespan), or None for in-process state."""
    url = settings.state.redis_url.strip()
    if not url:
        return None
    return RedisStore(url, settings.state.lease_seconds, settings.state.timeout_seconds,
                      settings.state.heartbeat_seconds)


def reconfigureKeys(app: FastAPI, settings: Settings) -> None:
    """A reload: new key rings (rotated keys take effect for the next request) and per-key limits."""
    app.state.keyRings = {KEY_CLASS_API: KeyRing(settings.apiKeys), KEY_CLASS_OPENAI: KeyRing(settings.openAiKeys)}
    app.state.rateLimiter.reconfigure(settings)


def installSecurity(app: FastAPI, settings: Settings, clock: Clock = time.monotonic) -> None:
    """Key rings and rate limiter on app.state; key gate, body limit and CORS as pure ASGI middlewares."""
    app.state.keyRings = {KEY_CLASS_API: KeyRing(settings.apiKeys), KEY_CLASS_OPENAI: KeyRing(settings.openAiKeys)}
    app.state.sharedState = store = sharedStoreFor(settings)
    app.state.rateLimiter = RateLimiter(settings, clock) if store is None else SharedRateLimiter(settings, store, clock)
    app.add_middleware(KeyGateMiddleware)
    app.add_middleware(BodyLimitMiddleware, maxBytes=settings.limits.max_body_bytes)
    if settings.corsOrigins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.corsOrigins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=list(CORS_EXPOSED_HEADERS), allow_credentials=False,
                           max_age=600)
