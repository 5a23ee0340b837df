"""The floor under the network guard, for the tests that aim at the guard on purpose (tests/test_sovereignty.py).

Before such a test attempts anything, the lowest connect and name-lookup functions the guard hands allowed calls
to are replaced by recorders: exactly 127.0.0.1, ::1, localhost and Unix sockets pass on, anything else is written
down and refused here, so an attempt the guard failed to stop never reaches the kernel (no packet, no DNS query).
A guard test then asserts both: the guard refused, and the floor saw nothing. The floor has its own, narrower idea of
local than tests/networkGuard.py (no shared code), so one bug cannot open both.

In the test process the floor slides under the installed guard (``slideUnder``: the guard's ``real*`` functions);
in a process a test starts, ``tests/subprocessFloor/sitecustomize.py`` installs it on the socket module and uvloop
(``installOnModules``) before the guard's sitecustomize wraps it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable
from typing import Any

FLOOR_MARKER = "CONNECT-FLOOR: reached"
FLOOR_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
SOCKET_FUNCTIONS = {"realConnect": "connect", "realConnectEx": "connect_ex", "realGetaddrinfo": "getaddrinfo",
                    "realGethostbyname": "gethostbyname", "realGethostbynameEx": "gethostbyname_ex"}
"""The guard's attribute for each socket function it hands allowed calls on to."""


class ReachedTheFloor(OSError):
    """An attempt the guard let through, stopped (and recorded) before the kernel."""


def _hostText(host: Any) -> str:
    return host.decode("ascii", "replace") if isinstance(host, bytes) else str(host)


def _isFloorLocal(address: Any) -> bool:
    """Unix socket paths (str/bytes) and (host, port, ...) tuples whose host is exactly one of FLOOR_HOSTS."""
    if isinstance(address, (str, bytes)):
        return True
    if isinstance(address, tuple) and address and isinstance(address[0], (str, bytes)):
        return _hostText(address[0]) in FLOOR_HOSTS
    return False


def _isNumeric(host: Any) -> bool:
    try:
        ipaddress.ip_address(_hostText(host).strip("[]").split("%", 1)[0])
        return True
    except ValueError:
        return False


class ConnectFloor:
    """Recorders for connect, connect_ex, the name lookups and uvloop's entry points; ``reached`` lists what got
    here (must stay empty), ``passed`` the local calls handed on (shows the floor is really under the path)."""

    def __init__(self, reportToStderr: bool = False) -> None:
        self.reached: list[str] = []
        self.passed: list[str] = []
        self.reportToStderr = reportToStderr

    def stop(self, what: str) -> ReachedTheFloor:
        message = f"{FLOOR_MARKER} {what} (the network guard let it through)"
        self.reached.append(message)
        if self.reportToStderr:
            print(message, file=sys.stderr, flush=True)
        return ReachedTheFloor(message)

    def connect(self, real: Callable, what: str) -> Callable:
        def recorder(sock: Any, address: Any) -> Any:
            if not _isFloorLocal(address):
                raise self.stop(f"{what} to {address!r}")
            self.passed.append(what)
            return real(sock, address)
        return recorder

    def getaddrinfo(self, real: Callable, what: str) -> Callable:
        """A name goes no further (it would be a DNS query); an IP literal is only parsed (AI_NUMERICHOST)."""
        def recorder(host: Any, port: Any = None, family: int = 0, type: int = 0, proto: int = 0,
                     flags: int = 0) -> Any:
            if host is not None and _hostText(host) not in FLOOR_HOSTS:
                if not _isNumeric(host):
                    raise self.stop(f"{what} of {_hostText(host)!r}")
                flags |= socket.AI_NUMERICHOST
            self.passed.append(what)
            return real(host, port, family, type, proto, flags)
        return recorder

    def gethostbyname(self, real: Callable, what: str) -> Callable:
        def recorder(host: str) -> Any:
            if _hostText(host) not in FLOOR_HOSTS and not _isNumeric(host):
                raise self.stop(f"{what} of {_hostText(host)!r}")
            self.passed.append(what)
            return real(host)
        return recorder

    def uvloop(self, real: dict[str, Callable]) -> dict[str, Callable]:
        """Recorders for uvloop.Loop's methods (uvloop resolves and connects in C, past the socket module)."""
        async def createConnection(loop: Any, protocolFactory: Any, host: Any = None, port: Any = None,
                                   **kwargs: Any) -> Any:
            if host is not None and _hostText(host) not in FLOOR_HOSTS:
                raise self.stop(f"uvloop create_connection to {_hostText(host)!r}")
            self.passed.append("uvloop create_connection")
            return await real["create_connection"](loop, protocolFactory, host, port, **kwargs)

        async def getaddrinfo(loop: Any, host: Any, port: Any, **kwargs: Any) -> Any:
            if host is not None and _hostText(host) not in FLOOR_HOSTS:
                if not _isNumeric(host):
                    raise self.stop(f"uvloop getaddrinfo of {_hostText(host)!r}")
                kwargs["flags"] = kwargs.get("flags", 0) | socket.AI_NUMERICHOST
            self.passed.append("uvloop getaddrinfo")
            return await real["getaddrinfo"](loop, host, port, **kwargs)

        async def sockConnect(loop: Any, sock: Any, address: Any) -> Any:
            if not _isFloorLocal(address):
                raise self.stop(f"uvloop sock_connect to {address!r}")
            self.passed.append("uvloop sock_connect")
            return await real["sock_connect"](loop, sock, address)

        async def createDatagramEndpoint(loop: Any, protocolFactory: Any, *args: Any, **kwargs: Any) -> Any:
            remote = kwargs.get("remote_addr") or (args[1] if len(args) > 1 else None)
            if remote is not None and not _isFloorLocal(remote):
                raise self.stop(f"uvloop datagram endpoint to {remote!r}")
            self.passed.append("uvloop create_datagram_endpoint")
            return await real["create_datagram_endpoint"](loop, protocolFactory, *args, **kwargs)

        return {"create_connection": createConnection, "getaddrinfo": getaddrinfo, "sock_connect": sockConnect,
                "create_datagram_endpoint": createDatagramEndpoint}

    def _wrapSocketFunction(self, name: str, real: Callable) -> Callable:
        if name in ("connect", "connect_ex"):
            return self.connect(real, name)
        return self.getaddrinfo(real, name) if name == "getaddrinfo" else self.gethostbyname(real, name)

    def slideUnder(self, guard: Any) -> Callable[[], None]:
        """Put the floor under an installed NetworkGuard (its ``real*`` functions); returns the undo."""
        saved = {attribute: getattr(guard, attribute) for attribute in SOCKET_FUNCTIONS}
        savedUvloop = dict(guard.realUvloop)
        for attribute, name in SOCKET_FUNCTIONS.items():
            setattr(guard, attribute, self._wrapSocketFunction(name, saved[attribute]))
        if savedUvloop:
            guard.realUvloop.update(self.uvloop(savedUvloop))

        def undo() -> None:
            for attribute, real in saved.items():
                setattr(guard, attribute, real)
            guard.realUvloop.update(savedUvloop)
        return undo

    def installOnModules(self) -> ConnectFloor:
        """Patch the socket module and uvloop.Loop themselves: for a fresh process, before the guard is installed."""
        for name in SOCKET_FUNCTIONS.values():
            owner = socket.socket if name in ("connect", "connect_ex") else socket
            setattr(owner, name, self._wrapSocketFunction(name, getattr(owner, name)))
        try:
            import uvloop
        except ImportError:
            return self
        real = {name: getattr(uvloop.Loop, name) for name in ("create_connection", "getaddrinfo", "sock_connect",
                                                               "create_datagram_endpoint")}
        for name, recorder in self.uvloop(real).items():
            setattr(uvloop.Loop, name, recorder)
        return self
