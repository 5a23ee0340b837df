"""Worker threads for CPU-heavy request work (parsing large JSON bodies, decoding and re-encoding images), so the
event loop keeps serving other requests meanwhile. At most ``workers`` jobs run at once and the rest wait their turn,
which bounds the memory such work takes ([limits] worker_threads)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.requests import Request

Result = TypeVar("Result")


class OffloadPool:
    """A small thread pool shared by the requests of one app (``app.state.offload``)."""

    def __init__(self, workers: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poweron-offload")

    async def run(self, function: Callable[..., Result], *args: Any) -> Result:
        """``function(*args)`` on a worker thread; its exception is raised here. A caller that is cancelled stops
        waiting; the job itself runs to its end (it is bounded by the request limits)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(function, *args))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def offloadOf(request: Request) -> OffloadPool:
    return request.app.state.offload
