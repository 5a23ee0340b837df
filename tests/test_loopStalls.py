"""Issue 17: image decoding/re-encoding of /v1 image parts and the parsing of large JSON bodies run off the event loop
(a few worker threads, so their memory stays bounded), and each chat request has a budget (total pixels, messages,
tools) with 413 beyond it. The proofs are about ordering: a liveliness probe is answered while a decode is held
open on its worker; a ticking task keeps ticking while a real TIFF is re-encoded."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from PIL import Image

import guard.jsonBody
import openaiCompat.images
from app import createApp
from tests.conftest import OPENAI_KEY
from tests.ollamaStub import StubServer

BEARER = {"Authorization": f"Bearer {OPENAI_KEY}"}
VISION = "poweron-vision-general"
HOLD_SECONDS = 3.0


async def openService(settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = createApp(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://service", timeout=30) as http:
        yield http


@pytest.fixture
async def service(stub: StubServer, stubControl: httpx.Client, makeSettings) -> AsyncIterator[httpx.AsyncClient]:
    async for http in openService(makeSettings(ollama={"base_url": stub.baseUrl})):
        yield http


def imageDataUrl(width: int, height: int, fmt: str, **options: Any) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(buffer, fmt, **options)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def chatWithImages(*urls: str) -> dict:
    parts = [{"type": "text", "text": "Was steht da?"}] + [{"type": "image_url", "image_url": {"url": url}}
                                                             for url in urls]
    return {"model": VISION, "messages": [{"role": "user", "content": parts}]}


class HeldCall:
    """Wraps a function so that each call signals ``started`` and then waits (at most HOLD_SECONDS) for ``release``.
    Run on the event loop, the wait blocks the loop, nothing can release it, and ``heldTheLoop`` becomes True."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.started = threading.Event()
        self.release = threading.Event()
        self.heldTheLoop = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.started.set()
        if not self.release.wait(HOLD_SECONDS):
            self.heldTheLoop = True
        return self.function(*args, **kwargs)

    async def waitStarted(self) -> None:
        for _ in range(int(HOLD_SECONDS * 200) + 200):
            if self.started.is_set():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("the held call never started")


async def probeWhileHeld(service: httpx.AsyncClient, held: HeldCall, request: Any) -> tuple[httpx.Response, ...]:
    task = asyncio.create_task(request)
    await held.waitStarted()
    probe = await asyncio.wait_for(service.get("/health/liveliness"), HOLD_SECONDS * 2)
    held.release.set()
    return probe, await task


async def test_liveliness_is_answered_while_an_image_is_re_encoded(service, monkeypatch) -> None:
    held = HeldCall(openaiCompat.images._asPng)
    monkeypatch.setattr(openaiCompat.images, "_asPng", held)
    chat = service.post("/v1/chat/completions", headers=BEARER, json=chatWithImages(imageDataUrl(64, 64, "GIF")))
    probe, answer = await probeWhileHeld(service, held, chat)
    assert answer.status_code == 200, answer.text
    assert probe.status_code == 200
    assert not held.heldTheLoop, "the re-encoding ran on the event loop"


async def test_liveliness_is_answered_while_a_large_body_is_parsed(service, monkeypatch) -> None:
    held = HeldCall(guard.jsonBody._parse)
    monkeypatch.setattr(guard.jsonBody, "_parse", held)
    body = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hallo"}],
            "metadata": {"note": "x" * 400_000}}  # large, yet a prompt that fits the context window
    chat = service.post("/v1/chat/completions", headers=BEARER, json=body)
    probe, answer = await probeWhileHeld(service, held, chat)
    assert answer.status_code == 200 and probe.status_code == 200
    assert not held.heldTheLoop, "the large body was parsed on the event loop"


async def test_the_loop_keeps_ticking_while_a_real_tiff_is_re_encoded(service, monkeypatch) -> None:
    """Relative numbers only: the longest pause of a ticking task during the request is well below the time the
    re-encoding itself took (on the loop, the pause would be at least that long)."""
    spans: list[float] = []
    original = openaiCompat.images._asPng

    def timed(*args: Any) -> Any:
        begin = time.perf_counter()
        try:
            return original(*args)
        finally:
            spans.append(time.perf_counter() - begin)

    monkeypatch.setattr(openaiCompat.images, "_asPng", timed)
    url = imageDataUrl(2000, 2000, "TIFF", compression="tiff_deflate")
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)  # ticking before the request starts
    answer = await service.post("/v1/chat/completions", headers=BEARER, json=chatWithImages(url))
    done.set()
    await ticker
    assert answer.status_code == 200, answer.text
    assert len(spans) == 1 and max(gaps) < spans[0] / 2, (max(gaps), spans)


async def test_decodes_run_at_most_worker_threads_at_once(stub, stubControl, makeSettings, monkeypatch) -> None:
    active, most = 0, 0
    lock = threading.Lock()
    original = openaiCompat.images._asPng

    def counted(*args: Any) -> Any:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.1)
        with lock:
            active -= 1
        return original(*args)

    monkeypatch.setattr(openaiCompat.images, "_asPng", counted)
    settings = makeSettings(ollama={"base_url": stub.baseUrl}, limits={"worker_threads": 1})
    async for http in openService(settings):
        answers = await asyncio.gather(*(http.post("/v1/chat/completions", headers=BEARER,
                                                   json=chatWithImages(imageDataUrl(32, 32, "BMP")))
                                         for _ in range(4)))
    assert [answer.status_code for answer in answers] == [200] * 4 and most == 1


# ------------------------------------------------------------------------------ budgets per request


async def budgetService(stub: StubServer, makeSettings, **limits: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for http in openService(makeSettings(ollama={"base_url": stub.baseUrl}, limits=limits)):
        yield http


async def test_too_many_messages_are_413(stub, stubControl, makeSettings) -> None:
    async for http in budgetService(stub, makeSettings, max_messages=50):
        ok = await http.post("/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "messages": [{"role": "user", "content": "x"}] * 50})
        tooMany = await http.post("/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "messages": [{"role": "user", "content": "x"}] * 51})
        responsesShape = await http.post("/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "input": [{"role": "user", "content": "x"}] * 51})
    assert ok.status_code == 200
    for answer in (tooMany, responsesShape):
        assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_many_messages"
        assert "max_messages" in answer.json()["error"]["message"]


async def test_too_many_tools_are_413(stub, stubControl, makeSettings) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    async for http in budgetService(stub, makeSettings, max_tools=8):
        answer = await http.post("/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "messages": [{"role": "user", "content": "x"}], "tools": [tool] * 9})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "too_many_tools"


async def test_too_many_pixels_in_one_request_are_413(stub, stubControl, makeSettings) -> None:
    png = imageDataUrl(150, 150, "PNG")
    async for http in budgetService(stub, makeSettings, max_request_pixels=30_000):
        one = await http.post("/v1/chat/completions", headers=BEARER, json=chatWithImages(png))
        two = await http.post("/v1/chat/completions", headers=BEARER, json={"model": VISION, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}]})
    assert one.status_code == 200
    assert two.status_code == 413 and two.json()["error"]["code"] == "request_pixels_too_large"
    assert "max_request_pixels" in two.json()["error"]["message"]


async def test_too_many_json_items_are_413_before_parsing(stub, stubControl, makeSettings) -> None:
    async for http in budgetService(stub, makeSettings, max_json_items=1000):
        answer = await http.post("/v1/chat/completions", headers=BEARER, json={
            "model": "poweron-text-general", "messages": [{"role": "user", "content": "x"}], "x": [1] * 1000})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "json_too_large"


async def test_a_request_over_its_pixel_budget_decodes_nothing(stub, stubControl, makeSettings, monkeypatch) -> None:
    """Every image's header is checked against the budget before any image is re-encoded."""
    calls: list[str] = []
    original = openaiCompat.images._asPng

    def counted(image: Any, param: str) -> str:
        calls.append(param)
        return original(image, param)

    monkeypatch.setattr(openaiCompat.images, "_asPng", counted)
    gif = imageDataUrl(150, 150, "GIF")
    async for http in budgetService(stub, makeSettings, max_request_pixels=30_000):
        answer = await http.post("/v1/chat/completions", headers=BEARER, json={"model": VISION, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": gif}}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": gif}}]}]})
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_pixels_too_large"
    assert calls == []


async def test_a_part_whose_type_is_not_a_string_is_400(service) -> None:
    """Found by test_openApiFuzz: the image scan hashed the part's type (500 for ``"type": {}``)."""
    for items in ({"messages": [{"role": "user", "content": [{"type": {}}]}]},
                  {"input": [{"type": "message", "role": "user", "content": [{"type": {}, "refusal": None}]}]}):
        answer = await service.post("/v1/chat/completions", headers=BEARER,
                                    json={"model": "poweron-text-general", **items})
        assert answer.status_code == 400, answer.text
