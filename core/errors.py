"""Service errors and the one place that renders them: OpenAI's envelope on /v1, the API's shape elsewhere."""

from __future__ import annotations

from types import MappingProxyType

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from core.requestContext import getMeta

OPENAI_TYPES = MappingProxyType({
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable", 504: "timeout",
})


HTTP_EXCEPTION_CODES = MappingProxyType({404: "not_found", 405: "method_not_allowed", 413: "request_too_large"})


class ServiceError(Exception):
    """An error with an HTTP status and a message a person can act on."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, errorType: str | None = None,
                 extra: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}
        self.errorType = errorType or OPENAI_TYPES.get(status, "api_error")
        self.extra = extra or {}


def openAiErrorBody(error: ServiceError) -> dict:
    """OpenAI's error envelope."""
    return {"error": {"message": error.message, "type": error.errorType, "param": error.param, "code": error.code}}


def apiErrorBody(error: ServiceError, requestId: str | None) -> dict:
    """The analysis API's error shape."""
    return {"detail": error.message, "code": error.code or error.errorType, "requestId": requestId, **error.extra}


def isOpenAiPath(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1"


def errorResponse(request: Request, error: ServiceError) -> Response:
    """Render an error in the shape the route's clients expect."""
    meta = getMeta(request)
    if meta is not None:
        meta.errorCode = error.code or error.errorType
    requestId = meta.requestId if meta is not None else None
    openAi = isOpenAiPath(request.url.path)
    body = openAiErrorBody(error) if openAi else apiErrorBody(error, requestId)
    status = error.status
    if error.code == "context_length_exceeded" and not openAi:
        status = 413  # the analysis API's status for input too large; /v1 keeps OpenAI's 400
    return Response(orjson.dumps(body), status_code=status, headers=error.headers, media_type="application/json")


def _describeValidation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    firstParam = None
    for item in exc.errors():
        location = ".".join(str(p) for p in item.get("loc", ()) if p not in ("body", "query", "form", "header"))
        firstParam = firstParam or location or None
        parts.append(f"{location}: {item.get('msg')}" if location else str(item.get("msg")))
    return "Invalid request: " + "; ".join(parts[:5]), firstParam


async def _handleServiceError(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return errorResponse(request, exc)


async def _handleValidationError(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    message, param = _describeValidation(exc)
    return errorResponse(request, ServiceError(400, message, code="invalid_request", param=param))


async def _handleHttpException(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "Request failed"
    if exc.status_code == 404 and message == "Not Found":
        message = f"No route {request.method} {request.url.path}"
    if exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    code = HTTP_EXCEPTION_CODES.get(exc.status_code)
    return errorResponse(request, ServiceError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


def internalError() -> ServiceError:
    return ServiceError(500, "Internal error; the request id in the logs tells more", errorType="api_error",
                        code="internal_error")


async def _handleUnexpected(request: Request, exc: Exception) -> Response:
    return errorResponse(request, internalError())


async def sendInternalError(scope: Scope, receive: Receive, send: Send) -> None:
    """The 500 answer for an exception that escaped the app (RequestContextMiddleware's ``renderError``)."""
    await errorResponse(Request(scope, receive), internalError())(scope, receive, send)


def installErrorHandlers(app: FastAPI) -> None:
    """Register the handlers that render every error of the service."""
    app.add_exception_handler(ServiceError, _handleServiceError)
    app.add_exception_handler(RequestValidationError, _handleValidationError)
    app.add_exception_handler(StarletteHTTPException, _handleHttpException)
    app.add_exception_handler(Exception, _handleUnexpected)
