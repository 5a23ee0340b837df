"""A real redis-server (Debian package ``redis-server``) on 127.0.0.1 and a free port, without persistence, started
and stopped by PID; ``stop()`` + ``start()`` keep the port, so a service sees "Redis down" and "Redis back"."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import freePort

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redisAvailable() -> bool:
    return Path(REDIS_SERVER).exists()


class RedisServer:
    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.port = port or freePort()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.directory = directory
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.logFile = open(self.directory / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--protected-mode", "yes", "--daemonize", "no", "--dir", str(self.directory)],
            stdout=self.logFile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)
        return self

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *parts: str) -> bytes:
        """One RESP command, the raw first reply (enough for DBSIZE, KEYS, ZCARD in assertions)."""
        payload = f"*{len(parts)}\r\n".encode() + b"".join(f"${len(p)}\r\n{p}\r\n".encode() for p in parts)
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(payload)
            time.sleep(0.05)
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.logFile.close()
        self.process = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
