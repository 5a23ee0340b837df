"""The browser test UI without a browser: the page and its assets are public and strict (Content-Security-Policy,
no inline scripts, styles or event handlers, nothing from elsewhere, no key storage but sessionStorage), and
POST /api/preview renders thumbnails of the pages /api/analyze would analyse (analysis key, render workers)."""

from __future__ import annotations

import base64
import io
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

import routeWeb
from app import createApp
from tests.conftest import API_KEY, OPENAI_KEY, REPO_ROOT
from tests.documentSamples import makeImage, makePdf, makePixelBombPng, makeZipNamedPdf

STATIC_DIR = REPO_ROOT / "static"
TEMPLATE = REPO_ROOT / "templates" / "index.html"
ANY_URL = re.compile(r"""(?:https?:|wss?:|ftp:)?//[a-z0-9][a-z0-9.-]*\.[a-z]{2,}""", re.IGNORECASE)
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
"""An XML namespace name, never fetched: the one URL-looking string the assets may contain."""
UNSAFE_JS = re.compile(r"\binnerHTML\b|\bouterHTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function\(|"
                       r"localStorage|document\.cookie|setTimeout\(\s*[\"'`]")
MAX_THUMBNAIL_SIDE = 200
"""Pages of A4 (portrait or landscape) become thumbnails at most this wide and high."""


def webFiles() -> list[Path]:
    return [TEMPLATE, *sorted(path for path in STATIC_DIR.rglob("*") if path.is_file())]


class TagCollector(HTMLParser):
    """Every start tag with its attributes, and the text inside <script> and <style> elements."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.inlineCode: list[str] = []
        self.current: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self.current = tag

    def handle_endtag(self, tag: str) -> None:
        self.current = None

    def handle_data(self, data: str) -> None:
        if self.current in ("script", "style") and data.strip():
            self.inlineCode.append(data.strip()[:60])


@pytest.fixture
def app(makeSettings):
    return createApp(makeSettings())


@pytest.fixture
def page(app) -> httpx.Response:
    with TestClient(app, base_url="http://127.0.0.1") as client:
        return client.get("/")


def cspDirectives(header: str) -> dict[str, list[str]]:
    directives = {}
    for part in filter(None, (p.strip() for p in header.split(";"))):
        name, *values = part.split()
        directives[name.lower()] = values
    return directives


def test_pageIsPublicRenderedFromTheTemplateWithSecurityHeaders(page) -> None:
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.template.name == "index.html"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "microphone=(self)" in page.headers["permissions-policy"]
    assert "set-cookie" not in page.headers


def test_contentSecurityPolicyIsStrict(page) -> None:
    csp = cspDirectives(page.headers["content-security-policy"])
    assert csp["default-src"] == ["'self'"]
    assert csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert set(csp["img-src"]) == {"'self'", "data:", "blob:"} and set(csp["media-src"]) == {"'self'", "blob:"}
    everything = " ".join(value for values in csp.values() for value in values)
    for loose in ("'unsafe-inline'", "'unsafe-eval'", "*", "http:", "https:", "'unsafe-hashes'"):
        assert loose not in everything.split(), loose


def test_pageHasNoInlineScriptsStylesOrEventHandlers(page) -> None:
    collector = TagCollector()
    collector.feed(page.text)
    scripts = [attrs for tag, attrs in collector.tags if tag == "script"]
    assert scripts and all(attrs.get("src", "").startswith("/static/") for attrs in scripts)
    assert not collector.inlineCode, collector.inlineCode
    handlers = [(tag, name) for tag, attrs in collector.tags for name in attrs if name.lower().startswith("on")]
    assert not handlers, handlers
    assert not [tag for tag, attrs in collector.tags if "style" in attrs]
    assert not re.search(r"javascript:", page.text, re.IGNORECASE)


def test_alertAndKeyFieldsHaveStableIds(page) -> None:
    for needle in ('id="alert" class="alert" role="alert"', 'id="apiKey"', 'id="openAiKey"', 'id="models"',
                   'id="chatStop"', 'id="thumbnails"', 'id="audioFile"'):
        assert needle in page.text, needle
    assert re.search(r'id="(?:apiKey|openAiKey)"[^>]*type="password"', page.text)


def test_webFilesReferenceNothingOutsideTheServer() -> None:
    offenders = []
    for path in webFiles():
        text = path.read_text(encoding="utf-8").replace(SVG_NAMESPACE, "")
        offenders += [f"{path.relative_to(REPO_ROOT)}: {match.group(0)}" for match in ANY_URL.finditer(text)]
        offenders += [f"{path.relative_to(REPO_ROOT)}: {match.group(0)}"
                      for match in re.finditer(r"@import|@font-face|\bsrc:\s*url", text)]
    assert not offenders, "\n".join(offenders)


def test_scriptsBuildTheDomSafelyAndKeepKeysInSessionStorageOnly() -> None:
    scripts = {path.name: path.read_text(encoding="utf-8") for path in STATIC_DIR.glob("*.js")}
    offenders = [f"{name}: {match.group(0)}" for name, text in scripts.items() for match in UNSAFE_JS.finditer(text)]
    assert not offenders, offenders
    assert "sessionStorage.setItem" in scripts["api.js"]
    assert 'credentials: "omit"' in scripts["api.js"]


def test_everyAssetAndModuleImportIsServed(app, page) -> None:
    assets = re.findall(r"""(?:src|href)="(/static/[^"]+)\"""", page.text)
    imports = [f"/static/{name}" for path in STATIC_DIR.glob("*.js")
               for name in re.findall(r"""from\s+"\./([\w.]+)\"""", path.read_text(encoding="utf-8"))]
    assert "/static/app.js" in assets and imports
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for url in {*assets, *imports}:
            response = client.get(url)
            assert response.status_code == 200, url
            assert response.headers["x-content-type-options"] == "nosniff"
            if url.endswith(".js"):
                assert response.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
        assert client.get("/static/../config.py").status_code == 404


# --- POST /api/preview ------------------------------------------------------------------------------------------


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://service", headers={"X-API-Key": API_KEY},
            timeout=60.0) as http:
        yield http


async def postPreview(client: httpx.AsyncClient, data: bytes, **fields: str) -> httpx.Response:
    return await client.post("/api/preview", files={"file": ("upload.bin", data)}, data=fields)


def thumbnailSize(dataUrl: str) -> tuple[int, int]:
    prefix = "data:image/jpeg;base64,"
    assert dataUrl.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(dataUrl[len(prefix):]))) as image:
        assert image.format == "JPEG"
        return image.size


async def test_previewShowsThePagesTheAnalysisWouldTake(client) -> None:
    response = await postPreview(client, makePdf(7))
    body = response.json()
    assert response.status_code == 200, body
    assert (body["fileType"], body["pageCount"], body["pagesAnalysed"], body["truncated"]) == ("pdf", 7,
                                                                                              [1, 2, 3, 4, 5], True)
    assert body["model"] == "poweron-vision-general" and body["mode"] == "combined"
    sizes = [thumbnailSize(thumbnail["dataUrl"]) for thumbnail in body["thumbnails"]]
    assert [thumbnail["page"] for thumbnail in body["thumbnails"]] == [1, 2, 3, 4, 5]
    assert all(width <= MAX_THUMBNAIL_SIDE and height <= MAX_THUMBNAIL_SIDE for width, height in sizes), sizes
    assert all(width >= 100 for width, _ in sizes)


async def test_previewFollowsPagesAndTheModelsMode(client) -> None:
    chosen = (await postPreview(client, makePdf(7), pages="6-7")).json()
    assert chosen["pagesAnalysed"] == [6, 7] and chosen["truncated"] is False
    deep = (await postPreview(client, makePdf(3), model="poweron-vision-deep")).json()
    assert deep["mode"] == "perPage" and deep["model"] == "poweron-vision-deep"
    landscape = (await postPreview(client, makePdf(1, size=(842, 595)))).json()
    width, height = thumbnailSize(landscape["thumbnails"][0]["dataUrl"])
    assert width > height and width <= MAX_THUMBNAIL_SIDE and landscape["mode"] == "single"


async def test_previewOfAnImageIsOneScaledThumbnail(client) -> None:
    body = (await postPreview(client, makeImage(2400, 1600, "JPEG"))).json()
    assert body["fileType"] == "jpeg" and body["pageCount"] == 1 and body["pagesAnalysed"] == [1]
    width, height = thumbnailSize(body["thumbnails"][0]["dataUrl"])
    assert width * height <= routeWeb.THUMBNAIL_PIXELS and abs(width / height - 1.5) < 0.05


@pytest.mark.parametrize(("data", "fields", "status", "code"), [
    (makePdf(3), {"pages": "9"}, 400, "invalid_pages"),
    (makePdf(3), {"pages": "x"}, 400, "invalid_pages"),
    (makePdf(3), {"pages": "5-"}, 400, "invalid_pages"),
    (makeImage(40, 30, "PNG"), {"pages": "2-"}, 400, "invalid_pages"),
    (makeZipNamedPdf(), {}, 415, "unsupported_file_type"),
    (b"", {}, 400, "empty_file"),
    (makePixelBombPng(), {}, 413, "image_too_large"),
    (makePdf(1), {"model": "poweron-text-general"}, 400, "model_capability"),
    (makePdf(1), {"model": "no-such-model"}, 404, "model_not_found"),
    (makePdf(1), {"prompt": "unexpected"}, 400, "invalid_request"),
])
async def test_previewRefusesWhatTheAnalysisWouldRefuse(client, data: bytes, fields: dict, status: int,
                                                        code: str) -> None:
    response = await postPreview(client, data, **fields)
    assert (response.status_code, response.json()["code"]) == (status, code), response.text


async def test_previewOfAnOpenRangePastTheEndNamesThePageCount(client) -> None:
    response = await postPreview(client, makePdf(3), pages="5-")
    assert response.status_code == 400 and "the document has 3 pages" in response.json()["detail"]


async def test_previewNeedsAFileInAMultipartForm(client) -> None:
    missing = await client.post("/api/preview", data={"pages": "1"}, files={"other": ("x", b"1")})
    asJson = await client.post("/api/preview", json={"file": "JVBERi0="})
    assert (missing.status_code, missing.json()["code"]) == (400, "missing_file")
    assert (asJson.status_code, asJson.json()["code"]) == (415, "unsupported_media_type")


async def test_previewNeedsAnAnalysisKey(client) -> None:
    for headers in ({"X-API-Key": ""}, {"X-API-Key": OPENAI_KEY}, {"X-API-Key": "wrong-key-0000000000"}):
        response = await client.post("/api/preview", files={"file": ("a.pdf", makePdf(1))}, headers=headers)
        assert response.status_code == 401, headers
    assert all(route.path != "/api/preview" for route in routeWeb.router.routes)
