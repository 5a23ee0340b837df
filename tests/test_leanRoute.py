"""core/leanRoute.py: eligible routes are served without FastAPI's general request handler, with the same
dependencies in the same order and the same error mapping; every other route, and every request while dependency
overrides are set, keeps FastAPI's handler."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Annotated

import fastapi.routing
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from starlette.responses import JSONResponse, Response

import core.leanRoute
import routeApi
import routeOpenAi
from app import createApp
from core.leanRoute import LeanRoute
from tests.conftest import OPENAI_KEY as KEY


@pytest.fixture
def solveCount(monkeypatch) -> list[int]:
    """Counts FastAPI's general dependency resolution (the lean path never calls it)."""
    calls: list[int] = []
    original = fastapi.routing.solve_dependencies

    async def counting(*args, **kwargs):
        calls.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return calls


async def gate(request: Request) -> str:
    request.app.state.order.append("gate")
    if request.headers.get("x-key") != "good":
        raise HTTPException(401, "no key")
    return "gate"


async def context(request: Request) -> dict:
    request.app.state.order.append("context")
    return {"path": request.url.path}


async def other(request: Request) -> str:
    request.app.state.order.append("other")
    return "other"


async def overridden(request: Request) -> dict:
    return {"overridden": True}


def makeApp(order: list[str]) -> FastAPI:
    router = APIRouter(prefix="/v1", route_class=LeanRoute, dependencies=[Depends(other)])

    @router.post("/lean")
    async def lean(request: Request, ctx: Annotated[dict, Depends(context)]) -> Response:
        order.append("endpoint")
        return JSONResponse({"ctx": ctx, "body": (await request.body()).decode()})

    @router.get("/items/{itemId}")
    async def withPathParameter(itemId: int) -> Response:
        return JSONResponse({"itemId": itemId})

    @router.get("/plain")
    async def returnsADict(request: Request) -> dict:
        return {"plain": True}

    app = FastAPI()
    app.include_router(router, dependencies=[Depends(gate)])
    app.state.order = order
    return app


def test_anEligibleRouteRunsItsDependenciesInOrderWithoutFastApisResolver(solveCount) -> None:
    order: list[str] = []
    with TestClient(makeApp(order)) as client:
        answer = client.post("/v1/lean", content=b"hello", headers={"x-key": "good"})
    assert answer.status_code == 200
    assert answer.json() == {"ctx": {"path": "/v1/lean"}, "body": "hello"}
    assert order == ["gate", "other", "context", "endpoint"]  # the include's, the router's, the route's
    assert solveCount == []


def test_aDependencyThatRefusesIsMappedAsBefore(solveCount) -> None:
    order: list[str] = []
    with TestClient(makeApp(order)) as client:
        answer = client.post("/v1/lean", content=b"hello")
    assert (answer.status_code, answer.json()) == (401, {"detail": "no key"})
    assert order == ["gate"]


def test_otherRoutesKeepFastApisHandler(solveCount) -> None:
    with TestClient(makeApp([])) as client:
        assert client.get("/v1/items/7", headers={"x-key": "good"}).json() == {"itemId": 7}
        assert client.get("/v1/items/seven", headers={"x-key": "good"}).status_code == 422
        assert client.get("/v1/plain", headers={"x-key": "good"}).json() == {"plain": True}
    assert len(solveCount) == 3


def test_dependencyOverridesAreHonoured(solveCount) -> None:
    order: list[str] = []
    app = makeApp(order)

    app.dependency_overrides[context] = overridden
    with TestClient(app) as client:
        answer = client.post("/v1/lean", content=b"x", headers={"x-key": "good"})
    assert answer.json()["ctx"] == {"overridden": True}
    assert solveCount


@pytest.mark.parametrize("router", [routeOpenAi.router, routeApi.router], ids=["v1", "api"])
def test_theModelRoutersUseLeanRoutes(router: APIRouter) -> None:
    assert router.route_class is LeanRoute


async def test_theServiceAnswersChatsOnTheLeanPathWithItsLimits(stub, makeSettings, solveCount) -> None:
    """A chat through the whole service: answered, admitted by the key's limits (rate-limit headers), refused
    without a valid key, and no general dependency resolution."""
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
    body = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hello"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as http:
            answer = await http.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
            refused = await http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer no"})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert any(name.lower().startswith("x-ratelimit") for name in answer.headers)
    assert refused.status_code == 401
    assert solveCount == []


def test_withoutFastApisInclusionContextRoutesKeepFastApisHandler(monkeypatch, solveCount) -> None:
    """A FastAPI without the inclusion context (the include's dependencies could be missed): no lean handlers."""
    monkeypatch.setattr(core.leanRoute, "fastapiRouting", SimpleNamespace())  # a routing module without it
    order: list[str] = []
    with TestClient(makeApp(order)) as client:
        assert client.post("/v1/lean", content=b"x").status_code == 401
        assert client.post("/v1/lean", content=b"x", headers={"x-key": "good"}).status_code == 200
    assert order[:1] == ["gate"] and solveCount
