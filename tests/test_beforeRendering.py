"""What /api/analyze refuses before any page is rendered, and what the pre-render checks look at:
- issue 15: a prompt (system + prompt) too long for the model's context window is a 413 before the render workers
  do anything (the pages are still counted after rendering, as before);
- issue 17: the inline-image pixel check scans only the pages that will be rendered (the renderer's own page
  selection), so a pixel bomb on a page left out neither refuses the document nor costs a scan."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pymupdf
import pytest

from app import createApp
from documents import documentRender, pdfInlineImages
from documents.documentRender import DocumentError, RenderJob, renderDocument
from tests.conftest import API_KEY
from tests.documentSamples import inlineImageContent, makePdf, pdfStream, rawPdf
from upstream.contextWindow import SAFETY

API = {"X-API-Key": API_KEY}
VISION = "poweron-vision-general"
MAX_PIXELS = 50_000_000
BOMB_PAGE = 150


@pytest.fixture(scope="module", autouse=True)
def quietWorkerSettings() -> None:
    documentRender.initWorker()


@pytest.fixture
async def service(stub, stubControl: httpx.Client, makeSettings) -> AsyncIterator:
    app = createApp(makeSettings(ollama={"base_url": stub.baseUrl}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service",
                                     timeout=60) as http:
            http.app = app
            yield http


def renderCount(http: httpx.AsyncClient) -> int:
    """Renders the pool admitted (every render takes a worker slot first)."""
    return http.app.state.renderPool.slots.admittedTotal


def chatCalls(stubControl: httpx.Client) -> list[dict]:
    return stubControl.get("/_stub/requests", params={"path": "/api/chat"}).json()["requests"]


async def promptOfTokens(http: httpx.AsyncClient, share: float) -> tuple[str, int]:
    """A prompt whose estimated tokens are ``share`` of (window - answer budget) of the vision model, and that
    room."""
    resolved = await http.app.state.registry.resolve(VISION)
    room = resolved.window - http.app.state.settings.ollama.num_predict
    chars = int(room * share * http.app.state.registry.tokens.ratio(resolved.ollamaName) / SAFETY)
    return ("word " * (chars // 5 + 1))[:chars], room


# ------------------------------------------------------------------ issue 15: the text is checked before rendering


async def test_anOverlongPromptIs413BeforeTheRenderPoolDoesAnyWork(service, stubControl) -> None:
    prompt, room = await promptOfTokens(service, 1.3)
    response = await service.post("/api/analyze", headers=API, files={"file": ("a.pdf", makePdf(3))},
                                  data={"prompt": prompt})
    assert response.status_code == 413, response.text[:300]
    body = response.json()
    assert body["code"] == "context_length_exceeded"
    assert body["promptTokens"] + body["answerTokens"] > body["contextWindow"]
    assert renderCount(service) == 0  # refused at once: no worker rendered a page
    assert chatCalls(stubControl) == []


async def test_theSystemPromptCountsToo(service, stubControl) -> None:
    system, _ = await promptOfTokens(service, 1.3)
    response = await service.post("/api/analyze", headers=API, files={"file": ("a.pdf", makePdf(1))},
                                  data={"prompt": "Describe", "system": system})
    assert (response.status_code, response.json()["code"]) == (413, "context_length_exceeded")
    assert renderCount(service) == 0


async def test_aLowerMaxTokensLetsTheSamePromptThrough(service, stubControl) -> None:
    """The answer budget is part of the early check: the caller's maxTokens, as after rendering."""
    prompt, room = await promptOfTokens(service, 1.1)
    response = await service.post("/api/analyze", headers=API, files={"file": ("a.png", makePngBytes())},
                                  data={"prompt": prompt, "maxTokens": "64"})
    assert response.status_code == 200, response.text[:300]
    assert renderCount(service) == 1


async def test_pagesAreStillCountedAfterRendering(service, stubControl) -> None:
    """A prompt that fits alone but not with the page image passes the early check and is refused after the render
    (the page's cost is known only then), as before."""
    prompt, _ = await promptOfTokens(service, 0.9)
    response = await service.post("/api/analyze", headers=API, files={"file": ("a.pdf", makePdf(1))},
                                  data={"prompt": prompt})
    assert (response.status_code, response.json()["code"]) == (413, "context_length_exceeded")
    assert renderCount(service) == 1
    assert chatCalls(stubControl) == []


def makePngBytes() -> bytes:
    from tests.documentSamples import makeImage

    return makeImage(64, 64)


# ------------------------------------------------------------------ issue 17: only the selected pages are scanned


def pdfWithBombOnPage(pages: int = 200, bombPage: int = BOMB_PAGE) -> tuple[bytes, int]:
    """A text PDF whose page ``bombPage`` draws an inline image declaring 30000x30000 pixels; and that page's
    content xref."""
    doc = pymupdf.open(stream=makePdf(pages))
    contentXref = doc[bombPage - 1].get_contents()[0]
    doc.update_stream(contentXref, inlineImageContent(30000, 30000))
    return doc.tobytes(), contentXref


def job(data: bytes, pages: tuple = ()) -> RenderJob:
    return RenderJob(data, pages, 5, 200_000, MAX_PIXELS)


def test_aBombOnAPageLeftOutDoesNotRefuseTheDocument() -> None:
    data, _ = pdfWithBombOnPage()
    assert renderDocument(job(data)).pages == [1, 2, 3, 4, 5]
    assert renderDocument(job(data, ((148, 149), (151, 152)))).pages == [148, 149, 151, 152]


def test_aBombOnASelectedPageIsStillRefused() -> None:
    data, _ = pdfWithBombOnPage()
    for pages in (((BOMB_PAGE, BOMB_PAGE),), ((1, 2), (BOMB_PAGE, BOMB_PAGE + 1)), ((BOMB_PAGE - 2, BOMB_PAGE + 2),)):
        with pytest.raises(DocumentError) as caught:
            renderDocument(job(data, pages))
        error = caught.value
        assert (error.status, error.code) == (413, "image_too_large")
        assert "inline image of 30000x30000 pixels" in error.message and "max_image_pixels" in error.message
        assert f"page {BOMB_PAGE}" in error.message


def test_onlyTheSelectedPagesStreamsAreScanned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts the streams the inline-image scan reads: scanning the whole file would read 200 page contents."""
    data, bombXref = pdfWithBombOnPage()
    scanned: list[int] = []
    original = pdfInlineImages._streamChunks

    def countingChunks(doc, xref):  # noqa: ANN001, ANN202
        scanned.append(xref)
        return original(doc, xref)

    monkeypatch.setattr(pdfInlineImages, "_streamChunks", countingChunks)
    renderDocument(job(data))
    assert bombXref not in scanned
    assert 5 <= len(scanned) <= 15, scanned  # the 5 pages' contents (and their fonts), not 200 pages


def _bombForm() -> bytes:
    return pdfStream(b"/Type /XObject /Subtype /Form /BBox [0 0 595 842]", inlineImageContent(30000, 30000))


def test_inheritedResourcesAndAnnotationAppearancesOfASelectedPageAreScanned() -> None:
    catalog = b"<< /Type /Catalog /Pages 2 0 R >>"
    inherited = rawPdf([catalog, b"<< /Type /Pages /Kids [3 0 R] /Count 1 /Resources << /XObject << /Fx 5 0 R >> >> >>",
                        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R >>",
                        pdfStream(b"", b"q /Fx Do Q"), _bombForm()])
    annotated = rawPdf([catalog, b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R /Annots [5 0 R] >>",
                        pdfStream(b"", b"BT ET"),
                        b"<< /Type /Annot /Subtype /Stamp /Rect [0 0 200 200] /P 3 0 R /AP << /N 6 0 R >> >>",
                        _bombForm()])
    for data in (inherited, annotated):
        with pytest.raises(DocumentError) as caught:
            renderDocument(job(data))
        assert caught.value.code == "image_too_large"


def test_aLinkToAPageWithABombDoesNotPullThatPageIn() -> None:
    """Page 1 links to page 2 (its /Dest names page 2's object); page 2 is not rendered, so its bomb is not seen."""
    data = rawPdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >>",
                   b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 5 0 R /Annots [7 0 R] >>",
                   b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 6 0 R >>",
                   pdfStream(b"", b"BT ET"), pdfStream(b"", inlineImageContent(30000, 30000)),
                   b"<< /Type /Annot /Subtype /Link /Rect [0 0 100 100] /Dest [4 0 R /Fit] >>"])
    assert renderDocument(job(data, ((1, 1),))).pages == [1]
    with pytest.raises(DocumentError):
        renderDocument(job(data))


async def test_analyzeRendersTheSelectedPagesOfAPdfWithABombElsewhere(service, stubControl) -> None:
    data, _ = pdfWithBombOnPage()
    answer = await service.post("/api/analyze", headers=API, files={"file": ("big.pdf", data)},
                                data={"prompt": "Describe"})
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["pagesAnalysed"] == [1, 2, 3, 4, 5]
    refused = await service.post("/api/analyze", headers=API, files={"file": ("big.pdf", data)},
                                 data={"prompt": "Describe", "pages": f"1,{BOMB_PAGE}"})
    assert (refused.status_code, refused.json()["code"]) == (413, "image_too_large")
    assert "max_image_pixels" in refused.json()["detail"] and f"page {BOMB_PAGE}" in refused.json()["detail"]
