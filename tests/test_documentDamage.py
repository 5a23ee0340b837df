"""Hostile and damaged documents (issue 17): inline-image pixel bombs in page content and form XObjects are refused
before rendering, damaged page trees and media boxes are 422 damaged_pdf, and whatever goes wrong in a render worker
comes back as plain data (a 4xx), never as a 500 or an unpicklable exception."""

from __future__ import annotations

import pickle
import threading
from collections.abc import AsyncIterator

import httpx
import pymupdf
import pytest

from app import createApp
from core.errors import ServiceError
from documents import documentRender
from documents.documentRender import DocumentError, RenderFailure, RenderJob, renderDocument, renderInWorker
from documents.renderWorkers import RenderPool
from tests.conftest import API_KEY
from tests.documentSamples import (
    inlineImageContent,
    makePdf,
    makePdfWithInlineImage,
    makeRawPagesPdf,
    pdfStream,
    rawPdf,
)

MAX_PIXELS = 50_000_000
BUDGET = 200_000

DAMAGED_PAGE_TREES = {
    "count-a-billion": makeRawPagesPdf(count=b"1000000000"),
    "count-negative": makeRawPagesPdf(count=b"-5"),
    "tree-lists-itself": makeRawPagesPdf(kids=b"[2 0 R]"),
    "tree-lists-itself-among-pages": makeRawPagesPdf(kids=b"[3 0 R 2 0 R 4 0 R]"),
    "truncated-3-pages": makePdf(3)[:180],
}
DAMAGED_MEDIA_BOXES = [b"[0 0 1 14400000]", b"[0 0 14400000 1]", b"[0 0 0 0]", b"[0 0 -595 -842]", b"[0 0 1e38 1e38]",
                       b"[-3e38 -3e38 3e38 3e38]", b"[0 0 1e-30 842]", b"[0 0]", b"[0 0 (a) /b]", b"42",
                       b"[0 0 595 842 1 2]", b"[0 0 nan inf]"]


@pytest.fixture(scope="module", autouse=True)
def quietWorkerSettings() -> None:
    documentRender.initWorker()


def job(data: bytes, maxImagePixels: int = MAX_PIXELS) -> RenderJob:
    return RenderJob(data, (), 5, BUDGET, maxImagePixels)


def renderError(data: bytes, maxImagePixels: int = MAX_PIXELS) -> DocumentError:
    with pytest.raises(DocumentError) as caught:
        renderDocument(job(data, maxImagePixels))
    return caught.value


# ------------------------------------------------------------------ inline images


@pytest.mark.parametrize("inForm", [False, True], ids=["page-content", "nested-form-xobject"])
def test_inlineImagePixelBombIsRefusedBeforeRendering(inForm: bool) -> None:
    error = renderError(makePdfWithInlineImage(30000, 30000, inForm=inForm))
    assert (error.status, error.code) == (413, "image_too_large")
    assert "inline image of 30000x30000 pixels" in error.message and "max_image_pixels" in error.message


@pytest.mark.parametrize("saveArgs", [{"deflate": True, "use_objstms": 1},
                                      {"encryption": pymupdf.PDF_ENCRYPT_AES_256, "user_pw": "pw", "owner_pw": "o"}],
                         ids=["compressed-object-streams", "encrypted"])
def test_inlineImageIsFoundInCompressedAndEncryptedPdfs(saveArgs: dict) -> None:
    data = pymupdf.open(stream=makePdfWithInlineImage(30000, 30000, inForm=True)).tobytes(**saveArgs)
    with pytest.raises(DocumentError) as caught:
        renderDocument(RenderJob(data, (), 5, BUDGET, MAX_PIXELS, "pw" if "user_pw" in saveArgs else None))
    assert caught.value.code == "image_too_large"


def test_inlineImageJustOverTheLimitIsRefusedAndOneAtTheLimitRenders() -> None:
    assert renderError(makePdfWithInlineImage(1001, 1000), maxImagePixels=1_000_000).status == 413
    rendered = renderDocument(job(makePdfWithInlineImage(1000, 1000), maxImagePixels=1_000_000))
    assert rendered.pages == [1]


def test_inlineImageWithLongKeyNamesAndCommentsIsFound() -> None:
    content = b"q 1 0 0 1 0 0 cm %comment BI /W 1\nBI\n/Width 40000 /Height\r\n40000 /ColorSpace /DeviceGray " \
              b"/BitsPerComponent 1 /Filter [] ID \x00\x00\nEI Q"
    data = rawPdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                   b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
                   pdfStream(b"/Filter /FlateDecode", __import__("zlib").compress(content))])
    assert renderError(data).code == "image_too_large"


def test_smallInlineImagesAndTextThatMentionsBiRender() -> None:
    content = inlineImageContent(64, 64, b"\x00" * 512) + b"\nBT /F1 12 Tf 72 72 Td (BI /W 99999 ID) Tj ET"
    data = rawPdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                   b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
                   pdfStream(b"", content)])
    assert renderDocument(job(data)).pages == [1]


# ------------------------------------------------------------------ damaged page trees and media boxes


@pytest.mark.parametrize("name", sorted(DAMAGED_PAGE_TREES))
def test_damagedPageTreesAre422DamagedPdf(name: str) -> None:
    error = renderError(DAMAGED_PAGE_TREES[name])
    assert (error.status, error.code) == (422, "damaged_pdf"), error.message
    assert error.message.startswith("The PDF is damaged")


@pytest.mark.parametrize("mediaBox", DAMAGED_MEDIA_BOXES, ids=lambda box: box.decode())
def test_damagedMediaBoxesRenderOrAre422(mediaBox: bytes) -> None:
    try:
        rendered = renderDocument(job(makeRawPagesPdf(mediaBox=mediaBox)))
    except DocumentError as error:
        assert (error.status, error.code) == (422, "damaged_pdf"), error.message
        assert "page 1" in error.message
    else:
        assert rendered.pages == [1, 2, 3]
        assert all(0 < image.width * image.height <= BUDGET for image in rendered.images)


# ------------------------------------------------------------------ the worker's answer is plain data


class UnpicklableError(RuntimeError):
    """Like MuPDF's FzError*: carries an object that cannot be pickled."""

    def __init__(self) -> None:
        super().__init__(threading.Lock())


def test_workerTurnsEveryExceptionIntoPicklablePlainData(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object) -> None:
        raise UnpicklableError

    monkeypatch.setattr(documentRender, "renderPdf", explode)
    failure = renderInWorker(job(makePdf(1)))
    assert isinstance(failure, RenderFailure)
    assert (failure.status, failure.code) == (422, "damaged_pdf")
    assert pickle.loads(pickle.dumps(failure)) == failure
    assert isinstance(renderInWorker(job(DAMAGED_PAGE_TREES["tree-lists-itself"])), RenderFailure)


async def test_poolAnswersDamagedPageTreesWith422AndKeepsServing() -> None:
    pool = RenderPool(1, 30)
    try:
        for name, data in DAMAGED_PAGE_TREES.items():
            with pytest.raises(ServiceError) as caught:
                await pool.render(job(data))
            assert (caught.value.status, caught.value.code) == (422, "damaged_pdf"), name
        assert (await pool.render(job(makePdf(2)))).pages == [1, 2]
        assert pool.restarts == 0
    finally:
        await pool.close()


# ------------------------------------------------------------------ through the routes


@pytest.fixture
async def client(makeSettings) -> AsyncIterator[httpx.AsyncClient]:
    app = createApp(makeSettings())
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://service", headers={"X-API-Key": API_KEY},
            timeout=60.0) as http:
        yield http


HOSTILE_UPLOADS = {**DAMAGED_PAGE_TREES, "inline-bomb": makePdfWithInlineImage(30000, 30000),
                   "inline-bomb-in-form": makePdfWithInlineImage(30000, 30000, inForm=True)}


async def test_previewAnswersEveryHostileUploadWithA4xxAndARequestId(client: httpx.AsyncClient) -> None:
    for name, data in HOSTILE_UPLOADS.items():
        response = await client.post("/api/preview", files={"file": ("upload.pdf", data)})
        assert response.status_code in (413, 422), (name, response.status_code, response.text)
        body = response.json()
        assert body["code"] in ("damaged_pdf", "image_too_large") and body["detail"], name
        assert response.headers.get("X-Request-ID"), name
    tall = await client.post("/api/preview", files={"file": ("tall.pdf", makeRawPagesPdf(mediaBox=b"[0 0 1 1e7]"))})
    assert tall.status_code == 200 and all(max(thumbnail["width"], thumbnail["height"]) <= 65_500
                                           for thumbnail in tall.json()["thumbnails"])
    assert (await client.post("/api/preview", files={"file": ("ok.pdf", makePdf(1))})).status_code == 200


@pytest.fixture
async def analysisClient(makeSettings, stub) -> AsyncIterator[httpx.AsyncClient]:
    """The service in-process with the Ollama stub, so /api/analyze gets as far as rendering."""
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://service", headers={"X-API-Key": API_KEY},
            timeout=60.0) as http:
        yield http


async def test_analyzeAnswersEveryHostileUploadWithA4xxAndRendersLongThinPages(
        analysisClient: httpx.AsyncClient) -> None:
    """/api/analyze renders at the model's budget (2 MP for poweron-vision-general): a 1 x 10^7 point page would be
    a 1 x 5 million pixel image there, beyond JPEG's 65,500 px (was a 500); now it is drawn within it."""
    async def analyze(data: bytes) -> httpx.Response:
        return await analysisClient.post("/api/analyze", files={"file": ("upload.pdf", data)},
                                         data={"prompt": "What is the total?"})

    for name, data in HOSTILE_UPLOADS.items():
        response = await analyze(data)
        assert response.status_code in (413, 422), (name, response.status_code, response.text)
        assert response.json()["code"] in ("damaged_pdf", "image_too_large"), name
    tall = await analyze(makeRawPagesPdf(mediaBox=b"[0 0 1 1e7]"))
    assert tall.status_code == 200, tall.text
    assert all(max(image["width"], image["height"]) <= 65_500 for image in tall.json()["images"])
