"""Browser test UI: one page (Jinja2) and its static assets, served by the service itself (no CDN, nothing from
elsewhere), plus ``POST /api/preview``: the pages ``/api/analyze`` would analyse, as small thumbnails rendered on
the server by the analysis render workers.

The page and the assets are public; every API call the page makes carries the user's key (kept in the browser's
sessionStorage), so ``/api/preview`` needs an analysis key like every other ``/api/*`` route.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import Field
from starlette.formparsers import MultiPartException
from starlette.responses import Response
from swagger_ui_bundle import swagger_ui_path

from config import ModelSpec, Settings, resolveModel
from core.clientDisconnect import CLIENT_CLOSED_STATUS, ClientDisconnected, untilDisconnect
from core.errors import ServiceError
from core.requestContext import getMeta
from documents import wireSchemas
from documents.analysisRequest import InMemoryMultiPartParser, RequestFields, parseFields
from documents.documentRender import RenderedDocument, RenderJob, detectFileType, parsePageRanges
from guard.security import requireApiKey
from upstream.dependencies import RegistryDep, SettingsDep
from upstream.modelRegistry import ModelRegistry

WEB_ROOT = Path(__file__).resolve().parent
TEMPLATES = Jinja2Templates(directory=WEB_ROOT / "templates")
STATIC_DIR = WEB_ROOT / "static"
CONTENT_SECURITY_POLICY = "; ".join((
    "default-src 'self'", "script-src 'self'", "style-src 'self'", "img-src 'self' data: blob:",
    "media-src 'self' blob:", "connect-src 'self'", "font-src 'self'", "object-src 'none'", "base-uri 'none'",
    "form-action 'none'", "frame-ancestors 'none'"))
"""No inline scripts or styles, no eval, nothing from another origin; data:/blob: images for the thumbnails and the
uploaded image, blob: media for recorded audio."""
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "microphone=(self), camera=(), geolocation=(), payment=(), usb=()",
}
ASSET_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
THUMBNAIL_PIXELS = 28_000
"""Pixel budget of a thumbnail (the render workers' budget logic, so the aspect ratio is kept): an A4 page becomes
140×199 px, a landscape one 199×140; the page shows them at most 200 px a side."""
DEFAULT_PREVIEW_MODEL = "poweron-vision-general"

router = APIRouter(tags=["web"], include_in_schema=False)
apiRouter = APIRouter(prefix="/api", tags=["web"], dependencies=[Depends(requireApiKey)])


class WebAssets(StaticFiles):
    """The page's CSS, JavaScript and icon: nosniff, revalidated on each load (ETag) so an update shows at once."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(ASSET_HEADERS)
        return response


def installWeb(app: FastAPI) -> None:
    """The public page, the key-protected preview route and the static assets under /static."""
    app.include_router(router)
    app.include_router(apiRouter)
    app.mount("/static/swagger-ui", WebAssets(directory=swagger_ui_path), name="swagger-ui")
    app.mount("/static", WebAssets(directory=STATIC_DIR), name="static")


@router.get("/docs", response_class=HTMLResponse)
async def apiDocs(request: Request) -> Response:
    """The API reference for people: Swagger UI (served from the swagger-ui-bundle package, no CDN) reading
    /openapi.json with the key this tab keeps for the test page."""
    return TEMPLATES.TemplateResponse(request, "docs.html", {"version": request.app.version}, headers=PAGE_HEADERS)


@router.get("/", response_class=HTMLResponse)
async def index(request: Request, settings: SettingsDep) -> Response:
    """The browser test UI: keys, model picker, chat, image/PDF analysis, transcription."""
    context = {"maxPdfPages": settings.documents.max_pdf_pages, "version": request.app.version}
    return TEMPLATES.TemplateResponse(request, "index.html", context, headers=PAGE_HEADERS)


class PreviewFields(RequestFields):
    """Fields of /api/preview besides the file (the same meaning as for /api/analyze)."""

    pages: str | None = Field(None, max_length=200)
    model: str | None = Field(None, max_length=200)
    password: str | None = Field(None, max_length=1024)


async def _readPreviewForm(request: Request, settings: Settings) -> tuple[PreviewFields, bytes]:
    """The fields and the file of a multipart preview request (in memory, limited like /api/analyze)."""
    contentType = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if contentType != "multipart/form-data":
        raise ServiceError(415, "Send the document as multipart/form-data (field 'file')",
                           code="unsupported_media_type")
    try:
        form = await InMemoryMultiPartParser(request, settings.limits.max_file_bytes).parse()
    except MultiPartException as exc:
        raise ServiceError(400, f"Malformed multipart form: {exc.message}", code="invalid_multipart") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise ServiceError(400, "No file: send the document in the multipart field 'file'", code="missing_file",
                           param="file")
    data = await upload.read()
    await upload.close()
    fields = {name: value for name, value in form.multi_items() if name != "file"}
    return parseFields(PreviewFields, fields), data


def _visionSpec(settings: Settings, registry: ModelRegistry, name: str) -> ModelSpec:
    """The configured model the analysis would use (pulled or not: the preview works while Ollama is down);
    404 when unknown, 400 when it cannot read images."""
    spec = resolveModel(settings, name)
    if spec is None:
        raise registry.unknownModelError(name)
    capabilities = registry.cachedCapabilities(spec) if spec.backend == "ollama" else frozenset()
    if spec.backend != "ollama" or "vision" not in (capabilities or {spec.type}):
        raise ServiceError(400, f"The model `{name}` cannot read images or PDFs (no vision capability); pick a "
                           "vision model", code="model_capability", param="model")
    return spec


def _analysisMode(spec: ModelSpec, pages: int) -> str:
    if pages <= 1:
        return "single"
    return "perPage" if spec.imagesPerMessage == 1 else "combined"


def _previewBody(document: RenderedDocument, spec: ModelSpec) -> dict[str, Any]:
    return {"model": spec.externalName, "fileType": document.fileType, "pageCount": document.pageCount,
            "pagesAnalysed": document.pages, "truncated": document.truncated,
            "mode": _analysisMode(spec, len(document.images)),
            "thumbnails": [{"page": image.page, "width": image.width, "height": image.height,
                            "dataUrl": "data:image/jpeg;base64," + image.base64Jpeg} for image in document.images]}


@apiRouter.post("/preview", **wireSchemas.previewDoc())
async def preview(request: Request, settings: SettingsDep, registry: RegistryDep) -> Response:
    """Which pages /api/analyze would analyse, with small JPEG thumbnails of them as data URLs."""
    fields, data = await _readPreviewForm(request, settings)
    detectFileType(data)
    job = RenderJob(data, parsePageRanges(fields.pages), settings.documents.max_pdf_pages, THUMBNAIL_PIXELS,
                    settings.limits.max_image_pixels, fields.password)
    spec = _visionSpec(settings, registry, fields.model or DEFAULT_PREVIEW_MODEL)
    try:  # a client gone while its thumbnails render stops the render (the worker is replaced)
        document = await untilDisconnect(request, request.app.state.renderPool.render(job, getMeta(request).keyName))
    except ClientDisconnected:
        getMeta(request).errorCode = "client_disconnected"
        return Response(status_code=CLIENT_CLOSED_STATUS)
    return Response(orjson.dumps(_previewBody(document, spec)), media_type="application/json")
