"""Sovereignty guard for the test suite: every connection or name lookup that would leave the machine fails loudly.

pytest-socket (``--allow-hosts`` in pytest.ini) blocks ``socket.connect`` during a test's call phase. This guard
closes what it leaves open: DNS lookups (a query leaves before any connect), ``connect_ex``, uvloop (which connects
in C, past the Python socket layer), the phases outside a test (collection, fixtures, teardown) and processes the
tests start (installed there by ``tests/subprocessGuard/sitecustomize.py``). Every refusal is recorded, so one that
a broad ``except`` swallows still fails the test. Allowed calls go on through the functions found at install time
(``realConnect``, ``realUvloop``, ...), which is where the guard's own tests put a recorder underneath
(tests/connectFloor.py).
"""

from __future__ import annotations

import importlib.abc
import ipaddress
import os
import socket
import sys
from typing import Any

VIOLATION_MARKER = "NETWORK-GUARD: blocked"
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
UVLOOP_ENTRY_POINTS = ("create_connection", "getaddrinfo", "sock_connect", "create_datagram_endpoint")
NATIVE_TELEMETRY_OFF = {"ORT_DISABLE_TELEMETRY": "1"}
"""Telemetry that native threads send past the socket module, where no guard sees it: onnxruntime (imported by
pymupdf and faster-whisper) otherwise resolves and posts to mobile.events.data.microsoft.com after import and at exit,
and writes a device id under ~/.cache/Microsoft. The programs set it themselves (core/nativeTelemetry.py); the test
process (conftest) and guardedEnv set it too, and the guard refuses to import onnxruntime without it."""
TELEMETRY_MODULES = frozenset({"onnxruntime"})


class NetworkViolation(RuntimeError):
    """A connection or name lookup that would leave the machine."""


def isLoopbackHost(host: Any) -> bool:
    """True for loopback IP literals and localhost names."""
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    name = host.strip("[]").lower().split("%", 1)[0]
    if name in LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _isIpLiteral(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False


class NativeTelemetryTripwire(importlib.abc.MetaPathFinder):
    """Refuses to import onnxruntime while its telemetry is on: its native threads would resolve and post past the
    socket layer, where the guard cannot stop them (NATIVE_TELEMETRY_OFF)."""

    def __init__(self, guard: NetworkGuard) -> None:
        self.guard = guard

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name.partition(".")[0] in TELEMETRY_MODULES and any(
                os.environ.get(key) != value for key, value in NATIVE_TELEMETRY_OFF.items()):
            raise self.guard.refuse(f"import of {name} with its native telemetry on (set ORT_DISABLE_TELEMETRY=1 "
                                    "before importing it)")
        return None


class NetworkGuard:
    """Patches the socket layer (and uvloop, when present) so only loopback is reachable; records refusals."""

    def __init__(self, reportToStderr: bool = False) -> None:
        self.violations: list[str] = []
        self.reportToStderr = reportToStderr
        self.realConnect = socket.socket.connect
        self.realConnectEx = socket.socket.connect_ex
        self.realGetaddrinfo = socket.getaddrinfo
        self.realGethostbyname = socket.gethostbyname
        self.realGethostbynameEx = socket.gethostbyname_ex
        self.realUvloop: dict[str, Any] = {}

    def refuse(self, what: str) -> NetworkViolation:
        """Record a refusal and return the error to raise."""
        message = f"{VIOLATION_MARKER} {what}: tests may only reach loopback (127.0.0.1, ::1, localhost)"
        self.violations.append(message)
        if self.reportToStderr:
            print(message, file=sys.stderr, flush=True)
        return NetworkViolation(message)

    def checkAddress(self, address: Any, what: str) -> None:
        """Refuse a socket address that is not loopback (Unix socket paths are local)."""
        if isinstance(address, tuple) and not isLoopbackHost(address[0]):
            raise self.refuse(f"{what} to {address[0]!r}")

    def checkName(self, host: Any, what: str) -> None:
        """Refuse resolving a name that is neither local nor an IP literal (a DNS query would leave the machine)."""
        if host is None:
            return
        text = host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)
        if not (isLoopbackHost(text) or _isIpLiteral(text)):
            raise self.refuse(f"{what} of {text!r}")

    def install(self) -> NetworkGuard:
        """Patch the socket module; also pytest-socket's and uvloop's entry points when they are loaded."""
        self._patchSocket()
        pytestSocket = sys.modules.get("pytest_socket")
        if pytestSocket is not None:
            self._patchPytestSocket(pytestSocket)
        self.patchUvloop()
        sys.meta_path.insert(0, NativeTelemetryTripwire(self))
        return self

    def _patchSocket(self) -> None:
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            guard.checkAddress(address, "connect")
            return guard.realConnect(sock, address)

        def connectEx(sock: socket.socket, address: Any) -> int:
            guard.checkAddress(address, "connect_ex")
            return guard.realConnectEx(sock, address)

        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            guard.checkName(host, "getaddrinfo")
            return guard.realGetaddrinfo(host, *args, **kwargs)

        def gethostbyname(host: str) -> str:
            guard.checkName(host, "gethostbyname")
            return guard.realGethostbyname(host)

        def gethostbynameEx(host: str) -> Any:
            guard.checkName(host, "gethostbyname_ex")
            return guard.realGethostbynameEx(host)

        socket.socket.connect = connect  # type: ignore[method-assign]
        socket.socket.connect_ex = connectEx  # type: ignore[method-assign]
        socket.getaddrinfo = getaddrinfo
        socket.gethostbyname = gethostbyname
        socket.gethostbyname_ex = gethostbynameEx
        self.guardedConnect = connect

    def _patchPytestSocket(self, pytestSocket: Any) -> None:
        """pytest-socket restores ``_true_connect`` between tests: make that our guard; record its own refusals."""
        guard = self
        pytestSocket._true_connect = self.guardedConnect
        blocked = pytestSocket.SocketConnectBlockedError
        originalInit = blocked.__init__

        def recordingInit(error: Any, allowed: Any, host: Any, *args: Any, **kwargs: Any) -> None:
            guard.violations.append(f"{VIOLATION_MARKER} connect to {host!r} (pytest-socket)")
            originalInit(error, allowed, host, *args, **kwargs)

        blocked.__init__ = recordingInit

    def patchUvloop(self) -> None:
        """uvloop connects and resolves in C: guard the methods of its Python-level Loop class.

        The methods found there are kept in ``realUvloop`` and called through it (as ``realConnect`` for sockets),
        so whatever was installed first stays underneath: uvloop's C code, or a test's recorder
        (tests/connectFloor.py)."""
        try:
            import uvloop
        except ImportError:
            return
        if getattr(uvloop.Loop, "_poweronGuarded", False):
            return
        guard = self
        self.realUvloop = {name: getattr(uvloop.Loop, name) for name in UVLOOP_ENTRY_POINTS}

        async def createConnection(loop: Any, protocolFactory: Any, host: Any = None, port: Any = None,
                                   **kwargs: Any) -> Any:
            if host is not None and not isLoopbackHost(host):
                raise guard.refuse(f"uvloop create_connection to {host!r}")
            return await guard.realUvloop["create_connection"](loop, protocolFactory, host, port, **kwargs)

        async def getaddrinfo(loop: Any, host: Any, *args: Any, **kwargs: Any) -> Any:
            guard.checkName(host, "uvloop getaddrinfo")
            return await guard.realUvloop["getaddrinfo"](loop, host, *args, **kwargs)

        async def sockConnect(loop: Any, sock: Any, address: Any) -> Any:
            guard.checkAddress(address, "uvloop sock_connect")
            return await guard.realUvloop["sock_connect"](loop, sock, address)

        async def createDatagramEndpoint(loop: Any, protocolFactory: Any, *args: Any, **kwargs: Any) -> Any:
            remote = kwargs.get("remote_addr") or (args[1] if len(args) > 1 else None)
            guard.checkAddress(remote, "uvloop datagram endpoint")
            return await guard.realUvloop["create_datagram_endpoint"](loop, protocolFactory, *args, **kwargs)

        uvloop.Loop.create_connection = createConnection
        uvloop.Loop.getaddrinfo = getaddrinfo
        uvloop.Loop.sock_connect = sockConnect
        uvloop.Loop.create_datagram_endpoint = createDatagramEndpoint
        uvloop.Loop._poweronGuarded = True
