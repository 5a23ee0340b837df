"""Authentication: every non-public route refuses a missing key, a wrong key and a key of the other class; stored
sha256 keys; constant-time matching; the key gate before body parsing; CORS; start-up refusals."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import routeHealth
import routeWeb
from app import createApp
from config import EXAMPLE_CONFIG_PATH, ConfigError, loadSettings
from guard import security
from guard.security import KeyRing
from tests.conftest import API_KEY, OPENAI_KEY, REPO_ROOT, TEST_INI, guardedEnv

WRONG_KEY = "not-a-configured-key-000000000"
AUTH_HEADERS = {
    "none": {},
    "wrong api": {"X-API-Key": WRONG_KEY},
    "wrong bearer": {"Authorization": f"Bearer {WRONG_KEY}"},
    "openai key as X-API-Key": {"X-API-Key": OPENAI_KEY},
    "api key as Bearer": {"Authorization": f"Bearer {API_KEY}"},
}


def _flatRoutes(app: FastAPI) -> Iterator[Any]:
    """Every route of the app, through included routers (FastAPI versions with and without _IncludedRouter)."""
    for route in app.routes:
        if hasattr(route, "effective_route_contexts"):
            yield from route.effective_route_contexts()
        else:
            yield route


def _publicPaths() -> set[str]:
    return {route.path for router in (routeHealth.router, routeWeb.router) for route in router.routes
            if hasattr(route, "path")}


def _protectedRoutes(app: FastAPI) -> list[tuple[str, str]]:
    public = _publicPaths()
    found = []
    for route in _flatRoutes(app):
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path and methods and path not in public:
            found += [(method, re.sub(r"\{[^}]+\}", "x", path)) for method in sorted(methods - {"HEAD"})]
    return found


def _refusingHeaders(path: str) -> list[str]:
    """Which AUTH_HEADERS must get 401 on this path: all but the right class's valid key (none is valid here)."""
    if path.startswith("/api/"):
        return ["none", "wrong api", "openai key as X-API-Key", "wrong bearer", "api key as Bearer"]
    if path.startswith("/v1/"):
        return ["none", "wrong bearer", "api key as Bearer", "wrong api", "openai key as X-API-Key"]
    return ["none", "wrong api", "wrong bearer"]  # routes that accept either class (e.g. /metrics)


@pytest.fixture
async def client(makeSettings) -> Any:
    app = createApp(makeSettings())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        http.app = app  # type: ignore[attr-defined]
        yield http


async def test_everyNonPublicRouteRefusesMissingWrongAndOtherClassKeys(client) -> None:
    routes = _protectedRoutes(client.app)
    assert ("GET", "/v1/models") in routes and ("POST", "/v1/chat/completions") in routes
    assert any(path.startswith("/api/") for _, path in routes)
    failures = []
    for method, path in routes:
        for case in _refusingHeaders(path):
            response = await client.request(method, path, headers=AUTH_HEADERS[case])
            if response.status_code != 401:
                failures.append(f"{method} {path} with {case}: {response.status_code}")
    assert not failures, "\n".join(failures)


async def test_publicRoutesNeedNoKey(client) -> None:
    assert (await client.get("/health/liveliness")).status_code == 200
    assert (await client.get("/health")).status_code == 200
    for route in routeWeb.router.routes:
        if "GET" in getattr(route, "methods", ()) and "{" not in route.path:
            assert (await client.get(route.path)).status_code != 401, route.path


async def test_rightKeysAreAccepted(client) -> None:
    assert (await client.get("/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"})).status_code == 200
    assert (await client.get("/v1/models", headers={"Authorization": f"bearer  {OPENAI_KEY} "})).status_code == 200
    assert (await client.get("/api/models", headers={"X-API-Key": API_KEY})).status_code == 200


async def test_refusalsSayWhatToSend(client) -> None:
    missing = await client.get("/v1/models")
    otherClass = await client.get("/api/models", headers={"X-API-Key": OPENAI_KEY})
    wrong = await client.get("/api/models", headers={"X-API-Key": WRONG_KEY})
    assert missing.json()["error"] == {
        "message": "Missing API key: /v1/* needs an OpenAI key as 'Authorization: Bearer <key>'",
        "type": "authentication_error", "param": None, "code": "missing_api_key"}
    assert missing.headers["www-authenticate"] == "Bearer"
    assert otherClass.json()["detail"] == ("Wrong key class: this key is for /v1/*; /api/* needs an analysis key in "
                                           "the X-API-Key header")
    assert wrong.json()["code"] == "invalid_api_key" and wrong.json()["requestId"] == wrong.headers["x-request-id"]
    assert WRONG_KEY not in wrong.text


async def test_keysStoredAsSha256Work(makeSettings) -> None:
    digest = hashlib.sha256(OPENAI_KEY.encode()).hexdigest()
    app = createApp(makeSettings(auth={"openai_keys": f"cursor=sha256:{digest.upper()}"}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        good = await http.get("/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"})
        digestAsKey = await http.get("/v1/models", headers={"Authorization": f"Bearer sha256:{digest}"})
    assert good.status_code == 200 and digestAsKey.status_code == 401


def test_matchingComparesAgainstEveryKey(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing({f"key{i}": f"secret-number-{i:04d}-abcdefgh" for i in range(5)})
    calls = []
    realCompare = security.hmac.compare_digest

    def countingCompare(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return realCompare(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", countingCompare)
    assert ring.match("secret-number-0000-abcdefgh") == "key0"
    assert ring.match("secret-number-0004-abcdefgh") == "key4"
    assert ring.match("nothing") is None
    assert len(calls) == 15, "matching stopped early: its duration would depend on which key matched"


async def test_anonymousUploadIsRefusedBeforeTheBodyIsRead(makeSettings) -> None:
    app = createApp(makeSettings())
    pulled = []

    async def receive() -> dict:
        pulled.append(1)
        return {"type": "http.request", "body": b"--b\r\n" + b"x" * 65536, "more_body": True}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/api/analyze", "raw_path": b"/api/analyze", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=b"),
                         (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    await app(scope, receive, send)
    assert sent[0]["status"] == 401
    assert not pulled, "the body was read before the key was checked"


# --- CORS ------------------------------------------------------------------------------------------------------------

@pytest.fixture
async def corsClient(makeSettings) -> Any:
    app = createApp(makeSettings(server={"cors_origins": "https://cursor.com, https://kiva.example"}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as http:
        yield http


async def test_corsPreflightNeedsNoKey(corsClient) -> None:
    response = await corsClient.options("/v1/chat/completions", headers={
        "Origin": "https://cursor.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://cursor.com"
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


async def test_corsRefusesOtherOrigins(corsClient) -> None:
    response = await corsClient.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


async def test_corsHeadersAreOnErrorsToo(corsClient) -> None:
    response = await corsClient.get("/v1/models", headers={"Origin": "https://kiva.example"})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "https://kiva.example"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


async def test_noCorsHeadersUnlessConfigured(client) -> None:
    response = await client.get("/health", headers={"Origin": "https://cursor.com"})
    assert "access-control-allow-origin" not in response.headers
    preflight = await client.options("/v1/models", headers={"Origin": "https://cursor.com",
                                                             "Access-Control-Request-Method": "GET"})
    assert preflight.status_code != 401
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/api/analyze", "/v1/audio/transcriptions"])
async def test_plainOptionsIsAnsweredWithoutKeyOrBody(client, path: str) -> None:
    response = await client.options(path)
    assert response.status_code == 204 and response.content == b""
    assert "POST" in response.headers["allow"]


# --- start-up refusals ------------------------------------------------------------------------------------------------

def test_placeholderKeysFromTheExampleAreRefused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "config.ini"
    shutil.copy(EXAMPLE_CONFIG_PATH, path)
    monkeypatch.setenv("PRIVATE_LLM_CONFIG", str(path))
    with pytest.raises(ConfigError, match=r"\[auth\] api_keys: key 'gateway' is still the placeholder.*"
                                          r"PRIVATE_LLM_AUTH__API_KEYS"):
        loadSettings()
    monkeypatch.setenv("PRIVATE_LLM_AUTH__API_KEYS", "gateway=" + "g" * 32)
    with pytest.raises(ConfigError, match=r"\[auth\] openai_keys: key 'cursor' is still the placeholder"):
        loadSettings()


@pytest.mark.parametrize("auth, message", [
    ({"api_keys": ""}, r"\[auth\] api_keys is empty: set at least one name=<key> \(or PRIVATE_LLM_AUTH__API_KEYS\)"),
    ({"openai_keys": " , "}, r"\[auth\] openai_keys is empty"),
    ({"openai_keys": "cursor=short"}, r"key 'cursor' is shorter than 16 characters"),
    ({"openai_keys": "cursor=sha256:abc"}, r"key 'cursor' starts with sha256: but is not followed by 64 hex"),
    ({"openai_keys": f"cursor={API_KEY}"}, r"analysis key 'gateway' and OpenAI key 'cursor' are the same key"),
    ({"openai_keys": f"cursor=sha256:{hashlib.sha256(API_KEY.encode()).hexdigest()}"}, r"are the same key"),
])
def test_unsafeKeyListsAreRefused(makeSettings, auth: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        makeSettings(auth=auth)


@pytest.mark.parametrize("section, url", [
    ("ollama", "http://203.0.113.7:11434"),  # documentation range: ipaddress calls it "private", it is not ours
    ("ollama", "http://ollama.example.com:11434"),
    ("ollama", "http://169.254.169.254:11434"),
    ("ollama", "http://100.64.0.9:11434"),
    ("ollama", "http://[::ffff:8.8.8.8]:11434"),
    ("whisper", "https://8.8.8.8:9000"),
])
def test_upstreamsOffThisNetworkAreRefused(makeSettings, section: str, url: str) -> None:
    with pytest.raises(ConfigError, match=rf"\[{section}\] base_url = {re.escape(url)} is not a loopback or private"):
        makeSettings(**{section: {"base_url": url}})
    allowed = makeSettings(**{section: {"base_url": url}}, server={"allow_remote_upstream": True})
    assert getattr(allowed, section).base_url == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:11434", "http://[::1]:11434", "http://localhost:11434",
                                 "http://192.168.10.5:11434", "http://10.0.0.2:11434", "http://172.20.1.1:11434",
                                 "http://[fd12::5]:11434"])
def test_loopbackAndPrivateUpstreamsAreAccepted(makeSettings, url: str) -> None:
    assert makeSettings(ollama={"base_url": url}).ollama.base_url == url


def _runService(iniText: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    path = tmp_path / "config.ini"
    path.write_text(iniText, encoding="utf-8")
    environment = guardedEnv({k: v for k, v in __import__("os").environ.items() if not k.startswith("PRIVATE_LLM_")})
    environment.update(PRIVATE_LLM_CONFIG=str(path), **env)
    return subprocess.run([sys.executable, str(REPO_ROOT / "app.py")], cwd=REPO_ROOT, env=environment,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
def test_serviceProcessRefusesToStartWithPlaceholdersOrRemoteUpstream(tmp_path: Path) -> None:
    placeholder = _runService(EXAMPLE_CONFIG_PATH.read_text(encoding="utf-8"), tmp_path)
    # an .invalid name (RFC 6761), never an address: should the refusal break, the name leads nowhere
    remote = _runService(TEST_INI, tmp_path, PRIVATE_LLM_OLLAMA__BASE_URL="http://ollama.invalid:11434")
    assert placeholder.returncode != 0 and "still the placeholder" in placeholder.stderr
    assert "[auth] api_keys" in placeholder.stderr
    assert remote.returncode != 0 and "[ollama] base_url = http://ollama.invalid:11434" in remote.stderr
    assert "allow_remote_upstream" in remote.stderr


def test_fastApiTelemetryIsSwitchedOff(makeSettings) -> None:
    app = createApp(makeSettings())
    telemetry = getattr(app, "_telemetry", None)
    if telemetry is None:
        pytest.skip("this FastAPI version has no native telemetry")
    assert not any(telemetry[k] for k in ("tracing", "metrics", "logs", "auto_configure"))
