"""Sovereignty: in this test suite nothing reaches past loopback (the guard fails loudly before a packet leaves, in
this process and in the processes the tests start), and the service itself never fetches a URL it is given.

The guard's own tests aim at it on purpose, so each first puts a recorder under it (the floor, tests/connectFloor.py)
and aims only at targets that cannot leave (see below): a broken guard fails the test at the floor, never on the
wire."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvloop

from app import createApp
from tests.conftest import (NETWORK_GUARD, OPENAI_KEY, REPO_ROOT, SUBPROCESS_GUARD_DIR, TEST_INI, freePort, guardedEnv,
                            stopProcess)
from tests.connectFloor import FLOOR_MARKER, ConnectFloor
from tests.networkGuard import (NATIVE_TELEMETRY_OFF, VIOLATION_MARKER, NetworkGuard, NetworkViolation,
                                isLoopbackHost)
from tests.ollamaStub import StubServer

# What the guard tests aim at. Nothing is a routable outside address, and every attempt meets the floor
# (tests/connectFloor.py) before the kernel, so nothing can leave even if pytest-socket and the guard both broke:
# - names end in .invalid (RFC 6761: never resolves anywhere); past the guard they reach only the floor, which lets
#   no name on to a resolver, so not even a DNS query leaves;
# - the IP literals are the unspecified addresses 0.0.0.0 and ::: not loopback, so the guard must refuse them, and no
#   destination on the wire (RFC 1122; Linux would deliver a connect to this host itself), so even a connect past
#   guard and floor could not leave the machine. The floor refuses them first anyway.
# Private, documentation and public ranges appear only as data for the guard's classifier
# (test_onlyLoopbackCountsAsLocal), never as a target.
UNSPECIFIED_V4, UNSPECIFIED_V6 = "0.0.0.0", "::"
OUTSIDE_NAME = "ollama.invalid"
FLOOR_DIR = Path(__file__).resolve().parent / "subprocessFloor"
FLOOR_INSTALLED = f"CONNECT-FLOOR: installed, then {SUBPROCESS_GUARD_DIR / 'sitecustomize.py'}"
"""What a process started with flooredEnv prints first: the floor is in, and the guard's sitecustomize runs over it."""
REMOTE_URL = re.compile(r"""(?:src|href|action)\s*=\s*["']\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//"""
                        r"""|@import\s+(?:url\()?["']?(?:https?:)?//|from\s+["']https?://|import\(\s*["']https?://"""
                        r"""|fetch\(\s*["']https?://""", re.IGNORECASE)


@pytest.fixture
def floor() -> Iterator[ConnectFloor]:
    """For tests that trigger the guard on purpose: first the floor goes under it (and is shown to be under the
    connect, connect_ex, lookup and uvloop paths by loopback calls), then the test runs; the guard's record of
    refusals is cleared afterwards, and nothing may have reached the floor."""
    floor = ConnectFloor()
    undo = floor.slideUnder(NETWORK_GUARD)
    try:
        _showTheFloorIsUnderThePath(floor)
        NETWORK_GUARD.violations.clear()
        yield floor
        NETWORK_GUARD.violations.clear()
    finally:
        undo()
    assert not floor.reached, "past the guard (stopped by the floor):\n" + "\n".join(floor.reached)


def _showTheFloorIsUnderThePath(floor: ConnectFloor) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) == 0
        socket.gethostbyname("localhost")

        async def viaUvloop() -> None:
            writer = (await asyncio.open_connection("127.0.0.1", port))[1]
            writer.close()

        uvloop.run(viaUvloop())
    expected = {"getaddrinfo", "connect", "connect_ex", "gethostbyname", "uvloop create_connection"}
    assert expected <= set(floor.passed), f"the floor is not under every path: {floor.passed}"
    assert not NETWORK_GUARD.violations and not floor.reached
    floor.passed.clear()


def flooredEnv(env: dict[str, str]) -> dict[str, str]:
    """guardedEnv with the floor's sitecustomize first: it installs the floor, then runs the guard's over it."""
    guarded = guardedEnv(env)
    return {**guarded, "PYTHONPATH": os.pathsep.join([str(FLOOR_DIR), guarded["PYTHONPATH"]])}


@pytest.mark.parametrize("host", ["10.255.255.1", "192.168.1.10", "172.16.0.1", "100.64.0.9", "169.254.169.254",
                                  "198.51.100.20", "203.0.113.7", "8.8.8.8", "fd00::1", "fe80::1", "::ffff:10.0.0.1",
                                  "::ffff:8.8.8.8", UNSPECIFIED_V4, UNSPECIFIED_V6, OUTSIDE_NAME, "localhost.invalid",
                                  "huggingface.co"])
def test_onlyLoopbackCountsAsLocal(host: str) -> None:
    """The classifier alone (no socket is made): private and documentation ranges are outside as well."""
    assert not isLoopbackHost(host)
    with pytest.raises(NetworkViolation, match=re.escape(repr(host))):
        NetworkGuard().checkAddress((host, 80), "connect")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST", "app.localhost"])
def test_loopbackCountsAsLocal(host: str) -> None:
    assert isLoopbackHost(host)


def test_connectToANonLoopbackAddressFailsLoudly(floor: ConnectFloor) -> None:
    with pytest.raises(RuntimeError, match=re.escape(UNSPECIFIED_V4)):
        socket.create_connection((UNSPECIFIED_V4, 80), timeout=5)
    assert NETWORK_GUARD.violations, "the refusal was not recorded"
    assert not floor.reached


def test_connectExToANonLoopbackAddressFailsLoudly(floor: ConnectFloor) -> None:
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(NetworkViolation):
        sock.connect_ex((UNSPECIFIED_V6, 443))
    assert not floor.reached


def test_nameLookupsFailBeforeAnyDnsQuery(floor: ConnectFloor) -> None:
    with pytest.raises(NetworkViolation, match=re.escape(OUTSIDE_NAME)):
        socket.getaddrinfo(OUTSIDE_NAME, 443)
    with pytest.raises(NetworkViolation):
        socket.gethostbyname("cdn.invalid")
    with pytest.raises(NetworkViolation):
        socket.gethostbyname_ex("fonts.invalid")
    assert not floor.reached


def test_httpxClientsCannotLeave(floor: ConnectFloor) -> None:
    with pytest.raises(RuntimeError):
        httpx.get(f"http://{UNSPECIFIED_V4}/", timeout=5)

    async def fetch() -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            await client.get("https://models.invalid/")

    with pytest.raises(NetworkViolation):
        asyncio.run(fetch())
    assert not floor.reached


async def test_asyncioConnectionsCannotLeave(floor: ConnectFloor) -> None:
    with pytest.raises(RuntimeError):
        await asyncio.open_connection(UNSPECIFIED_V4, 11434)
    with pytest.raises(NetworkViolation):
        await asyncio.open_connection(OUTSIDE_NAME, 11434)
    assert not floor.reached


def test_uvloopConnectionsCannotLeave(floor: ConnectFloor) -> None:
    for host in (UNSPECIFIED_V4, OUTSIDE_NAME):
        with pytest.raises(NetworkViolation, match="uvloop"):
            uvloop.run(asyncio.open_connection(host, 80))

    async def lookUp() -> None:
        await asyncio.get_running_loop().getaddrinfo(OUTSIDE_NAME, 80)

    with pytest.raises(NetworkViolation, match="uvloop getaddrinfo"):
        uvloop.run(lookUp())
    assert not floor.reached


def test_swallowedRefusalsAreStillRecorded(floor: ConnectFloor) -> None:
    try:
        socket.create_connection((UNSPECIFIED_V4, 80), timeout=5)
    except Exception:  # noqa: BLE001 - what careless code would do
        pass
    assert any(UNSPECIFIED_V4 in v for v in NETWORK_GUARD.violations)
    assert not floor.reached


def test_loopbackStaysReachable() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(("localhost", server.getsockname()[1]), timeout=5):
            pass
    assert not NETWORK_GUARD.violations


SUBPROCESS_ATTEMPTS = f"""
import asyncio, socket, sys, uvloop
floor = sys.modules["sitecustomize"].FLOOR
server = socket.create_server(("127.0.0.1", 0))
port = server.getsockname()[1]
socket.create_connection(("127.0.0.1", port), timeout=5).close()
async def probe():
    (await asyncio.open_connection("127.0.0.1", port))[1].close()
uvloop.run(probe())
print("floor passed:", sorted(set(floor.passed)), file=sys.stderr)
for attempt in (lambda: socket.create_connection(({UNSPECIFIED_V4!r}, 80), timeout=5),
                lambda: socket.getaddrinfo({OUTSIDE_NAME!r}, 80),
                lambda: uvloop.run(asyncio.open_connection({UNSPECIFIED_V6!r}, 80))):
    try:
        attempt()
    except Exception:
        pass
"""


def test_processesStartedByTestsAreGuardedToo() -> None:
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_ATTEMPTS],
                            env=flooredEnv(dict(os.environ)), capture_output=True, text=True, timeout=60)
    assert FLOOR_INSTALLED in result.stderr, result.stderr
    assert "floor passed: ['connect', 'getaddrinfo', 'uvloop create_connection']" in result.stderr, result.stderr
    assert FLOOR_MARKER not in result.stderr, result.stderr
    assert result.stderr.count(VIOLATION_MARKER) == 3, result.stderr


@pytest.mark.e2e
def test_serviceProcessCannotReachARemoteUpstream(tmp_path: Path) -> None:
    path = tmp_path / "config.ini"
    path.write_text(TEST_INI, encoding="utf-8")
    env = flooredEnv({k: v for k, v in os.environ.items() if not k.startswith("PRIVATE_LLM_")})
    env.update(PRIVATE_LLM_CONFIG=str(path), PRIVATE_LLM_SERVER__HOST="127.0.0.1",
               PRIVATE_LLM_SERVER__PORT=str(freePort()), PRIVATE_LLM_SERVER__ALLOW_REMOTE_UPSTREAM="true",
               PRIVATE_LLM_OLLAMA__BASE_URL=f"http://{OUTSIDE_NAME}:11434")
    logPath = tmp_path / "service.log"
    expected = re.compile(re.escape(VIOLATION_MARKER) + r" uvloop [a-z_]+ (?:of|to) " + re.escape(repr(OUTSIDE_NAME)))
    with open(logPath, "wb") as log:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "app.py")], cwd=REPO_ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not expected.search(logPath.read_text(errors="replace")) and time.monotonic() < deadline:
                assert process.poll() is None or expected.search(logPath.read_text(errors="replace"))
                time.sleep(0.1)
        finally:
            stopProcess(process)
    # the attempt was stopped by the guard; discovery then reports Ollama as unreachable and the service runs on
    text = logPath.read_text(errors="replace")
    assert expected.search(text), text[-3000:]
    assert FLOOR_INSTALLED in text and FLOOR_MARKER not in text, text[-3000:]


PROGRAM_STARTS = {
    "service": "import app\nfrom config import loadSettings\napp.createApp(loadSettings())\nimport pymupdf\n",
    "whisper": ("import uvicorn\nuvicorn.run = lambda *args, **kwargs: None\n"
                "from whisperServer import engine, service\n"
                "engine.WhisperEngine.preload = lambda self: __import__('onnxruntime')\n"
                "service.main()\n"),
}
"""Each program's start up to its first use of onnxruntime: the service's render workers import pymupdf (which
imports it) after createApp; the whisper service's engine (faster-whisper's VAD) after main's setup."""


@pytest.mark.parametrize("program", sorted(PROGRAM_STARTS))
def test_programsSwitchOffNativeTelemetryBeforeOnnxruntimeLoads(program: str, testIni: Path) -> None:
    """onnxruntime's telemetry runs in native threads, past the socket guard: the programs must switch it off
    themselves. The test's own switch is taken out of the environment; the guard in the process refuses the import
    while telemetry is on (so nothing starts, let alone leaves)."""
    env = {k: v for k, v in guardedEnv(dict(os.environ)).items() if k not in NATIVE_TELEMETRY_OFF}
    result = subprocess.run([sys.executable, "-c", PROGRAM_STARTS[program] + "print('loaded')"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert VIOLATION_MARKER not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("loaded"), result.stdout + result.stderr[-3000:]


# --- the service never fetches what it is given ---------------------------------------------------------------

class ConnectionRecorder:
    """A loopback TCP listener that records whether anyone connected."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.server.settimeout(0.2)
        self.connections = 0
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/invoice.png"

    def _accept(self) -> None:
        while self.running:
            try:
                self.server.accept()[0].close()
                self.connections += 1
            except OSError:
                continue

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.server.close()


def _chatWithImage(url: str) -> dict:
    return {"model": "poweron-vision-general", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "total?"}, {"type": "image_url", "image_url": {"url": url}}]}]}


async def test_imageUrlsAreNeverFetched(makeSettings) -> None:
    recorder = ConnectionRecorder()
    try:
        with StubServer() as stub:
            app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
                responses = [await client.post("/v1/chat/completions", json=_chatWithImage(url),
                                               headers={"Authorization": f"Bearer {OPENAI_KEY}"})
                             for url in (recorder.url, recorder.url.replace("http:", "https:"))]
            chats = [r for r in stub.state.requests if r["path"] == "/api/chat"]
    finally:
        recorder.close()
    assert [r.status_code for r in responses] == [400, 400]
    assert "data URL" in responses[0].json()["error"]["message"]
    assert recorder.connections == 0 and not chats


# --- the web UI loads nothing from elsewhere ------------------------------------------------------------------

def test_remoteUrlPatternCatchesCdnUsage() -> None:
    for snippet in ('<script src="https://cdn.jsdelivr.net/npm/x.js">', "<link href='//fonts.googleapis.com/css'>",
                    "background: url(https://example.com/a.png)", '@import "https://x/y.css";',
                    'import x from "https://esm.sh/x";', 'fetch("https://api.example.com")'):
        assert REMOTE_URL.search(snippet), snippet
    for snippet in ('<script src="/static/app.js">', '<a href="#top">', "url(/static/logo.svg)",
                    'fetch("/v1/models")', "data:image/png;base64,AAAA"):
        assert not REMOTE_URL.search(snippet), snippet


def test_webAssetsReferenceNoRemoteUrls() -> None:
    files = [path for folder in ("templates", "static") for path in (REPO_ROOT / folder).rglob("*")
             if path.is_file() and path.suffix in (".html", ".js", ".mjs", ".css", ".svg", ".json")]
    offenders = [f"{path.relative_to(REPO_ROOT)}: {match.group(0)}" for path in files
                 for match in REMOTE_URL.finditer(path.read_text(encoding="utf-8", errors="replace"))]
    assert not offenders, "\n".join(offenders)


async def test_servedWebPageReferencesNoRemoteUrls(makeSettings) -> None:
    app = createApp(makeSettings())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://testserver") as client:
        page = await client.get("/")
        if page.status_code == 404:
            pytest.skip("no web page is served yet")
        assets = re.findall(r"""(?:src|href)\s*=\s*["'](/[^"'#?]+)""", page.text)
        texts = [page.text] + [(await client.get(asset)).text for asset in assets]
    offenders = [match.group(0) for text in texts for match in REMOTE_URL.finditer(text)]
    assert page.status_code == 200 and not offenders, offenders
