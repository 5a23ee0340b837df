"""Lean request handlers for routes that take only the request and request-only async dependencies.

FastAPI's request handler is general: it reads and validates parameters from path, query, headers, cookies and
body, resolves every dependency with a full pass (parameters, cache key, security scopes, generator stacks) and
serialises what the endpoint returns. For the model routes, whose endpoints take the request and read their own
bodies (guard/jsonBody.py), that was about a fifth of a request's CPU (docu/performance.md, "Stalls under
load", third session).

``LeanRoute`` keeps the declarations as they are (dependencies in the signature and on the router, the OpenAPI
document) and, for a route whose dependencies are all ``async def f(request)`` without sub-dependencies and whose
endpoint takes nothing but the request and those dependencies and returns a ``Response``, calls the dependencies in
their order with the request and then the endpoint. Any other route gets FastAPI's own handler, and so does every
request while dependency overrides are set.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import routing as fastapiRouting
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
SPECIAL_PARAMETERS = ("websocket_param_name", "http_connection_param_name", "response_param_name",
                      "background_tasks_param_name", "security_scopes_param_name")


def _takesOnlyTheRequest(dependant: Dependant) -> bool:
    """No parameter FastAPI would read or validate, no special one; the request is passed in."""
    return (dependant.request_param_name is not None and not dependant.path_params and not dependant.query_params
            and not dependant.header_params and not dependant.cookie_params and not dependant.body_params
            and not dependant.own_oauth_scopes and not any(getattr(dependant, name) for name in SPECIAL_PARAMETERS))


def _isPlainCoroutine(call: Any) -> bool:
    return inspect.iscoroutinefunction(call) and not inspect.isasyncgenfunction(call)


def _isLeanDependency(dependant: Dependant) -> bool:
    """``async def f(request)``: one parameter, the request, and no dependencies of its own."""
    call = dependant.call
    return (_isPlainCoroutine(call) and not dependant.dependencies and dependant.use_cache
            and _takesOnlyTheRequest(dependant) and len(inspect.signature(call).parameters) == 1)


def _returnsResponse(call: Any) -> bool:
    try:
        annotation = inspect.signature(call, eval_str=True).return_annotation
    except Exception:  # an annotation that does not evaluate here: not provably a Response
        return False
    return inspect.isclass(annotation) and issubclass(annotation, Response)


def leanHandlerFor(dependant: Dependant) -> Handler | None:
    """The lean handler of an eligible route, else None."""
    subs = dependant.dependencies
    calls = [sub.call for sub in subs]
    if not (_isPlainCoroutine(dependant.call) and _takesOnlyTheRequest(dependant) and _returnsResponse(dependant.call)
            and all(_isLeanDependency(sub) for sub in subs) and len(set(calls)) == len(calls)):
        return None
    steps = tuple((sub.name, sub.call) for sub in subs)
    endpoint, requestName = dependant.call, dependant.request_param_name

    async def handler(request: Request) -> Response:
        values: dict[str, Any] = {requestName: request}
        for name, call in steps:
            value = await call(request)
            if name is not None:
                values[name] = value
        return await endpoint(**values)

    return handler


def _effectiveRoute(route: APIRoute) -> Any:
    """The route as included (its dependant has the include's dependencies, e.g. the key and its rate limits):
    FastAPI 0.165 builds an included route's handler with the inclusion's context set. None where this FastAPI has
    no such context (the route keeps FastAPI's handler: a lean one could miss the include's dependencies)."""
    contextVar = getattr(fastapiRouting, "_effective_route_context_var", None)
    if contextVar is None:
        return None
    context = contextVar.get()
    return context if context is not None and context.original_route is route else route


class LeanRoute(APIRoute):
    """An APIRoute that serves eligible routes with ``leanHandlerFor`` (see the module docstring)."""

    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        effective = _effectiveRoute(self)
        lean = leanHandlerFor(effective.dependant) if effective is not None else None
        if lean is None:
            return standard
        overridesProvider = effective.dependency_overrides_provider

        async def handler(request: Request) -> Response:
            if overridesProvider is not None and getattr(overridesProvider, "dependency_overrides", None):
                return await standard(request)
            return await lean(request)

        return handler
