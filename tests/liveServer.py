"""An ASGI app served by a real uvicorn (httptools) on 127.0.0.1 in a background thread, for tests that need real
sockets (chunked uploads, client disconnects) but want to reach into the app's state."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def liveServer(app: Any, timeout: float = 10.0, http: Any = "httptools") -> Iterator[str]:
    """Serve ``app`` (lifespan included) until the block ends; yields the base URL. ``http``: uvicorn's protocol
    (a name or a class, e.g. the connection guard's)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, loop="asyncio", http=http, ws="none", lifespan="on", access_log=False,
                            log_config=None, log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"live-{port}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("live server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def waitFor(condition: Any, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(0.01)
    return True
