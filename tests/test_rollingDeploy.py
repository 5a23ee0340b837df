"""Zero-downtime deploy: a real nginx with docu/nginx.conf in front of two real service instances (sharing their
limits in a real redis-server), deploy/rollingRestart.sh replaces them one at a time (through a systemctl stand-in
that stops and starts the real processes, tests/fakeUnits/) while clients send a steady load of streaming and
non-streaming chats through nginx: 0 failed requests, every stream complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.conftest import OPENAI_KEY, REPO_ROOT, assertNoNetworkViolation, freePort, guardedEnv, stopProcess
from tests.conftest import waitForHttp
from tests.redisServer import RedisServer, redisAvailable
from tests.test_docs import nginxSite, nginxUpstreams

pytestmark = [pytest.mark.skipif(shutil.which("nginx") is None or not redisAvailable(),
                                 reason="nginx or redis-server not installed (make test-deps)")]

FAKE_UNITS = Path(__file__).resolve().parent / "fakeUnits"
BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
CHAT = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hallo"}]}


def startNginx(ports: list[int], directory: Path) -> tuple[subprocess.Popen, str]:
    """docu/nginx.conf as documented (upstreams, failover, buffering), plain HTTP on a free port, both instances."""
    port = freePort()
    site = nginxUpstreams(nginxSite(ports[0], port), ports).replace("/var/log/nginx/", f"{directory}/")
    (directory / "site.conf").write_text(site)
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"{user}daemon off;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'};\nevents {{}}\n"
        f"http {{\n access_log off;\n {temp}\n include {directory / 'site.conf'};\n}}\n")
    nginx = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return nginx, f"http://127.0.0.1:{port}"


class Load:
    """Clients in threads sending chats through the proxy until stopped; every outcome that is not a complete
    answer is kept as a failure."""

    def __init__(self, proxy: str, streaming: int, plain: int) -> None:
        self.proxy, self.stop = proxy, threading.Event()
        self.done: Counter = Counter()
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(True,), daemon=True) for _ in range(streaming)]
        self.threads += [threading.Thread(target=self.run, args=(False,), daemon=True) for _ in range(plain)]

    def run(self, stream: bool) -> None:
        with httpx.Client(base_url=self.proxy, headers=BEARER, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    outcome = self.streamOnce(client) if stream else self.plainOnce(client)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.done["stream" if stream else "plain"] += 1

    @staticmethod
    def streamOnce(client: httpx.Client) -> str:
        with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            body = response.read().decode()
        if response.status_code != 200 or not body.rstrip().endswith("data: [DONE]"):
            return f"stream {response.status_code}: ...{body[-200:]!r}"
        return ""

    @staticmethod
    def plainOnce(client: httpx.Client) -> str:
        response = client.post("/v1/chat/completions", json=CHAT)
        if response.status_code != 200 or not response.json()["choices"][0]["message"]["content"]:
            return f"plain {response.status_code}: {response.text[:200]!r}"
        return ""

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def unitEnv(directory: Path, redis: RedisServer, stub) -> dict[str, str]:
    return guardedEnv({
        **os.environ, "PATH": f"{FAKE_UNITS}:{os.environ['PATH']}", "FAKE_UNITS_DIR": str(directory),
        "FAKE_PYTHON": sys.executable, "FAKE_APP": str(REPO_ROOT / "app.py"),
        "PRIVATE_LLM_SERVER__HOST": "127.0.0.1", "PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
        "PRIVATE_LLM_STATE__REDIS_URL": redis.url, "PRIVATE_LLM_RATELIMIT__PER_KEY": "cursor=600000/10000/1000",
        "PRIVATE_LLM_SERVER__GRACEFUL_SHUTDOWN_SECONDS": "20", "POWERON_READY_POLL": "0.2",
        "POWERON_SETTLE_SECONDS": "0", "POWERON_READY_TIMEOUT": "120"})


def pidOf(directory: Path, port: int) -> int:
    return int((directory / f"{port}.pid").read_text())


@pytest.mark.e2e
def test_rollingRestartBehindNginxLosesNoRequest(tmp_path: Path, testIni: Path, stub, stubControl):
    stubControl.post("/_stub/config", json={"numParallel": 8, "chunks": 12, "chunkDelayMs": 40}).raise_for_status()
    ports = [freePort(), freePort()]
    with RedisServer(tmp_path) as redis:
        env = unitEnv(tmp_path, redis, stub)
        subprocess.run(["systemctl", "start", *(f"poweron-llm@{port}.service" for port in ports)], env=env,
                       check=True, timeout=30)
        nginx, proxy = startNginx(ports, tmp_path)
        try:
            for port in ports:
                waitForHttp(f"http://127.0.0.1:{port}/health/readiness", 120)
            waitForHttp(proxy + "/health/liveliness", 20, nginx)
            before = {port: pidOf(tmp_path, port) for port in ports}
            with Load(proxy, streaming=2, plain=2) as load:
                time.sleep(1.5)
                deploy = subprocess.run([str(REPO_ROOT / "deploy" / "rollingRestart.sh"), *map(str, ports)], env=env,
                                        capture_output=True, text=True, timeout=300)
                time.sleep(1.5)
            after = {port: pidOf(tmp_path, port) for port in ports}
        finally:
            stopProcess(nginx)
            for port in ports:
                if (tmp_path / f"{port}.pid").exists():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pidOf(tmp_path, port), signal.SIGTERM)
            time.sleep(0.5)
    assert deploy.returncode == 0, deploy.stderr
    assert all(after[port] != before[port] for port in ports), "both instances were replaced"
    restarts = [line for line in (tmp_path / "calls.log").read_text().splitlines() if " restart " in line]
    assert restarts == [f"systemctl restart poweron-llm@{port}.service" for port in ports]
    print(f"rolling deploy under load: {dict(load.done)} complete, {len(load.failures)} failed")
    assert load.failures == [], load.failures[:5]
    assert load.done["stream"] >= 10 and load.done["plain"] >= 10, load.done
    for port in ports:
        assertNoNetworkViolation((tmp_path / f"{port}.log").read_text())
