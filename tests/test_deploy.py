"""deploy/push.sh + deploy/activate.sh end to end on this machine: ssh, sudo, systemctl and pip are stand-ins that run
locally and record their calls; a readiness endpoint answers 200 unless the live release is marked broken."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

BROKEN_MARKER = "BROKEN_READINESS"
FAKE_SSH = """#!/usr/bin/env bash
# ssh stand-in: skip the options and the target, run the remote command here
while [ "${1#-}" != "$1" ]; do shift 2; done
shift
exec bash -c "$*"
"""
FAKE_SUDO = '#!/usr/bin/env bash\nexec "$@"\n'
FAKE_SYSTEMCTL = '#!/usr/bin/env bash\necho "systemctl $*" >> "$CALL_LOG"\n'
FAKE_PIP = '#!/usr/bin/env bash\necho "pip $*" >> "$CALL_LOG"\n'


def writeScript(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


class Readiness(http.server.BaseHTTPRequestHandler):
    root: Path

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        broken = (self.root / "current" / BROKEN_MARKER).exists()
        self.send_response(503 if broken else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict]:
    """A fake server root with a venv pip stand-in, fake tools on PATH and a readiness endpoint."""
    root = tmp_path / "opt"
    (root / "releases").mkdir(parents=True)
    writeScript(root / "venv" / "bin" / "pip", FAKE_PIP)
    tools = tmp_path / "bin"
    for name, text in (("ssh", FAKE_SSH), ("sudo", FAKE_SUDO), ("systemctl", FAKE_SYSTEMCTL)):
        writeScript(tools / name, text)
    handler = type("Handler", (Readiness,), {"root": root})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    callLog = tmp_path / "calls.log"
    callLog.touch()
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "CALL_LOG": str(callLog), "POWERON_ROOT": str(root),
           "POWERON_READINESS_URL": f"http://127.0.0.1:{httpd.server_address[1]}/health/readiness",
           "POWERON_READY_TIMEOUT": "3"}
    yield {"root": root, "env": env, "calls": callLog}
    httpd.shutdown()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A small git repository holding the deploy scripts and a requirements.txt."""
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    for name in ("push.sh", "activate.sh"):
        shutil.copy2(REPO_ROOT / "deploy" / name, repo / "deploy" / name)
    (repo / "requirements.txt").write_text("fastapi\n")
    (repo / "constraints.txt").write_text("fastapi==0.165.0\n")
    git(repo, "init", "-q")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "-m", "good")
    return repo


def commit(repo: Path, message: str, broken: bool = False) -> str:
    (repo / "CHANGES").write_text(message)
    if broken:
        (repo / BROKEN_MARKER).write_text("readiness answers 503 while this release is live\n")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@localhost", "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def push(repo: Path, server: dict, revision: str) -> subprocess.CompletedProcess:
    return subprocess.run(["deploy/push.sh", "deploy@gpu.example", revision], cwd=repo, env=server["env"],
                          capture_output=True, text=True, timeout=60)


def liveRelease(server: dict) -> str:
    return os.readlink(server["root"] / "current")


def test_aReadyReleaseGoesLive(repo, server):
    revision = git(repo, "rev-parse", "HEAD")
    result = push(repo, server, revision)
    assert result.returncode == 0, result.stderr
    assert liveRelease(server) == f"releases/{revision}"
    assert (server["root"] / "releases" / revision / "requirements.txt").read_text() == "fastapi\n"
    calls = server["calls"].read_text().splitlines()
    assert calls[0].startswith("pip install") and calls[0].endswith(f"releases/{revision}/requirements.txt")
    assert f"-c {server['root']}/releases/{revision}/constraints.txt -r " in calls[0]  # the tested versions
    assert "systemctl restart poweron-llm.service poweron-whisper.service" in calls
    assert "systemctl is-active --quiet poweron-llm.service poweron-whisper.service" in calls


def test_aReleaseThatIsNotReadyIsRolledBack(repo, server):
    good = git(repo, "rev-parse", "HEAD")
    assert push(repo, server, good).returncode == 0
    bad = commit(repo, "breaks readiness", broken=True)
    server["calls"].write_text("")
    result = push(repo, server, bad)
    assert result.returncode == 1
    assert "rolled back to " + good in result.stderr
    assert liveRelease(server) == f"releases/{good}"
    calls = server["calls"].read_text().splitlines()
    pips = [call for call in calls if call.startswith("pip install")]
    assert [pip.rsplit("/", 2)[-2] for pip in pips] == [bad, good]  # the old requirements are reinstalled too
    assert calls.count("systemctl restart poweron-llm.service poweron-whisper.service") == 2


def test_theFirstReleaseFailsWithoutAnythingToRollBackTo(repo, server):
    bad = commit(repo, "broken from the start", broken=True)
    result = push(repo, server, bad)
    assert result.returncode == 1
    assert "no previous release" in result.stderr


def test_serverLocalSettingsChooseTheUnits(repo, server):
    (server["root"] / "deploy.env").write_text("POWERON_UNITS=poweron-llm.service\n")
    assert push(repo, server, git(repo, "rev-parse", "HEAD")).returncode == 0
    assert "systemctl restart poweron-llm.service" in server["calls"].read_text().splitlines()
