"""``make run``: the whisper service in the background and the main service in the foreground; Ctrl-C or SIGTERM
stops both. When whisper cannot start (no model on this machine) the main service keeps running without
poweron-transcribe; with ``[whisper] enabled = false`` whisper is not started at all. With ``[state] redis_url`` on
this machine (127.0.0.1/localhost) and nothing answering there, a redis-server (Debian package) is started for the
run on that port, without persistence, and stopped with the rest.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from config import ConfigError, loadSettings

HERE = Path(__file__).resolve().parent
PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5
STOP_TIMEOUT_SECONDS = 60


def _dieWithParent() -> None:
    """Runs in the child before exec (Linux): SIGTERM it when runAll itself dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def start(*arguments: str) -> subprocess.Popen:
    """A child in its own session, so a terminal's Ctrl-C reaches it once (forwarded here), not twice."""
    return subprocess.Popen([sys.executable, *arguments], cwd=HERE, start_new_session=True,
                            preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def startRedisIfConfigured(redisUrl: str) -> subprocess.Popen | None:
    """A redis-server for ``make run`` when [state] redis_url names this machine and nothing listens there yet."""
    parts = urlsplit(redisUrl.strip())
    if not redisUrl.strip() or parts.hostname not in ("127.0.0.1", "localhost"):
        return None
    port = parts.port or 6379
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            return None  # a Redis (or something) answers already
    server = shutil.which("redis-server")
    if server is None:
        print("runAll: [state] redis_url is set but redis-server is not installed (apt install redis-server); the "
              "service starts with per-instance limits", file=sys.stderr, flush=True)
        return None
    return subprocess.Popen([server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            preexec_fn=_dieWithParent if sys.platform.startswith("linux") else None)


def main() -> int:
    try:
        settings = loadSettings()
    except ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
    redis = startRedisIfConfigured(settings.state.redis_url)
    whisper = start("-m", "whisperServer") if settings.whisper.enabled else None
    service = start(str(HERE / "app.py"))
    children = [p for p in (service, whisper) if p is not None]

    stopRequested: list[int] = []

    def forwardStop(signum: int, frame: object) -> None:
        stopRequested.append(signum)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, forwardStop)
    signal.signal(signal.SIGTERM, forwardStop)
    whisperReported = False
    while service.poll() is None:
        if whisper is not None and whisper.poll() is not None and not whisperReported:
            print(f"runAll: the whisper service exited with code {whisper.returncode}; speech-to-text "
                  "(poweron-transcribe) is unavailable, the main service keeps running", file=sys.stderr, flush=True)
            whisperReported = True
        time.sleep(POLL_SECONDS)
    stop(whisper)
    stop(redis)
    stoppedBySignal = service.returncode in (0, -signal.SIGTERM)
    return 0 if stopRequested and stoppedBySignal else service.returncode


if __name__ == "__main__":
    sys.exit(main())
