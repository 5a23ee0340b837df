"""``python app.py`` moves the objects that exist at start out of the cyclic GC's full collections."""

from __future__ import annotations

import gc
from pathlib import Path
from types import SimpleNamespace

import pytest

import app


def test_freezeStartupObjects_movesLiveObjectsToThePermanentGeneration() -> None:
    before, thresholds = gc.get_freeze_count(), gc.get_threshold()
    try:
        app.freezeStartupObjects()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_freezeStartupObjects_collectsTheYoungestGenerationLessOften() -> None:
    """(10000, 10, 10) instead of Python's (700, 10, 10): at 64 concurrent chats the GC then took ~80 ms of CPU in
    20 s instead of ~540 ms (fewer in-flight objects promoted to older generations); docu/performance.md."""
    thresholds = gc.get_threshold()
    try:
        app.freezeStartupObjects()
        assert gc.get_threshold() == app.GC_THRESHOLDS == (10_000, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_main_freezesAfterBuildingTheAppAndBeforeServing(testIni: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    built = SimpleNamespace(state=SimpleNamespace(), openapi=lambda: calls.append("openapi"))
    monkeypatch.setattr(app, "createApp", lambda settings: calls.append("createApp") or built)
    monkeypatch.setattr(app, "freezeStartupObjects", lambda: calls.append("freeze"))
    monkeypatch.setattr(app, "configureLogging", lambda level: None)
    runArguments: dict = {}
    monkeypatch.setattr(app.uvicorn, "run", lambda *args, **kwargs: calls.append("run") or runArguments.update(kwargs))
    app.main()
    assert calls == ["createApp", "openapi", "freeze", "run"]  # the OpenAPI document is built before the freeze
    assert built.state.freezeAfterStartup is True
    assert runArguments["loop"] == "core.eventLoop:newEventLoop"  # accepts all waiting connections at once


async def test_lifespanFreezesItsObjectsOnlyWhenServing(makeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(app, "freezeStartupObjects", lambda: calls.append("freeze"))
    served = app.createApp(makeSettings())
    served.state.freezeAfterStartup = True
    async with served.router.lifespan_context(served):
        assert calls == ["freeze"]
    inTests = app.createApp(makeSettings())
    async with inTests.router.lifespan_context(inTests):
        assert calls == ["freeze"]
