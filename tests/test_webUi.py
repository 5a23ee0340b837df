"""The browser test UI in a real headless Chromium (Debian's, driven by Playwright) against the real service process
and the Ollama stub: keys, model picker, streamed chat, stop, PDF/image thumbnails and analysis, errors a person can
read, and real transcriptions with the multilingual whisper base (a German upload and an English recording from
Chromium's fake microphone, each with its detected language). Every request the browser makes is routed through a
guard that aborts it and fails the test when it leaves loopback; under the guard, Chromium's resolver knows only
127.0.0.1 and localhost (BROWSER_FLOOR). Screenshots of each step go to
tests/artifacts/webui-*.png (git-ignored)."""

from __future__ import annotations

import io
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pymupdf
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import BrowserContext, Page, Playwright, Route, expect, sync_playwright

from bench.sttLanguages import UMLAUT_RATE, UMLAUT_TEXT, UMLAUT_WORDS, speakIn
from bench.whisperBaseModel import whisperBaseDir
from config import MODEL_MAPPING
from tests.conftest import API_KEY, OPENAI_KEY, OTHER_OPENAI_KEY, REPO_ROOT, ServiceProcess
from tests.ollamaStub import PROMPT_ECHO_CHARS, REPLY_TEMPLATE, StubServer
from tests.whisperSupport import MAX_WORD_ERROR_RATE, SHORT_TEXT, WhisperProcess, speak, wordErrorRate

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
BROWSER_FLOOR = "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost"
"""Under the route guard (BrowserGuard), the browser's own floor: its resolver answers "not found" for every name and
address but 127.0.0.1 and localhost (IP literals too: the rule applies before any socket), so a request the guard
missed fails with net::ERR_NAME_NOT_RESOLVED in Chromium without a DNS query or a connection."""
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", BROWSER_FLOOR]
GUARD_ABORT = "blockedbyclient"
"""How the guard aborts: the page sees net::ERR_BLOCKED_BY_CLIENT, told apart from the floor's ERR_NAME_NOT_RESOLVED."""
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
STUB_MODELS = ["qwen2.5:7b", "qwen2.5vl:7b", "deepseek-r1:70b", "nomic-embed-text:latest"]
"""granite3.2-vision and llama4:scout stay unpulled: poweron-vision-deep and -multimodal show as planned."""
STUB_CHUNK_DELAY_MS = 40
"""Paces the stub's answers like a fast GPU (8 pieces in about a third of a second), so rates are measurable."""
STUB_REPLY_START = "This is a deterministic reply from the Ollama stub to:"
WAIT_MS = 15_000
expect.set_options(timeout=WAIT_MS)  # assertions wait as long as actions: renders take seconds on a loaded machine
RECORD_MS = 7_500
"""Recording time: the espeak-ng clip Chromium's fake microphone plays lasts about 6 s."""
METRICS_WITH_USAGE = re.compile(r"TTFT [\d.]+ (?:ms|s) · total [\d.]+ (?:ms|s) · [\d.]+ tokens/s · \d+ prompt \+ "
                                r"(\d+) completion tokens")


def shoot(page: Page, step: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"webui-{step}.png"), full_page=True)


class BrowserGuard:
    """Routes every browser request: loopback goes through, anything else is aborted and remembered."""

    def __init__(self) -> None:
        self.outside: list[str] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []

    def handle(self, route: Route) -> None:
        request = route.request
        parts = urlsplit(request.url)
        if parts.scheme in ("http", "https", "ws", "wss") and parts.hostname not in LOOPBACK_HOSTS:
            self.outside.append(request.url)
            route.abort(GUARD_ABORT)
            return
        self.requests.append((request.method, parts.path, request.headers))
        route.continue_()


class Browser:
    """One fresh Chromium profile with the guard, plus the page's uncaught errors and CSP violations."""

    def __init__(self, playwright: Playwright, profileDir: str, extraArgs: tuple[str, ...] = ()) -> None:
        self.guard = BrowserGuard()
        self.problems: list[str] = []
        self.context: BrowserContext = playwright.chromium.launch_persistent_context(
            profileDir, executable_path=CHROMIUM, headless=True, args=[*LAUNCH_ARGS, *extraArgs],
            service_workers="block", viewport={"width": 1280, "height": 860})
        self.context.route("**/*", self.guard.handle)
        self.page = self.context.pages[0] if self.context.pages else self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        self.page.on("console", self._onConsole)

    def _onConsole(self, message: Any) -> None:
        if "Content Security Policy" in message.text or "Refused to" in message.text:
            self.problems.append(f"CSP: {message.text}")

    def close(self) -> None:
        self.context.close()
        assert not self.guard.outside, f"the page tried to reach other hosts: {self.guard.outside}"
        assert not self.problems, "\n".join(self.problems)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as running:
        yield running


@pytest.fixture
def openBrowser(playwright: Playwright) -> Iterator[Callable[..., Browser]]:
    opened: list[Browser] = []
    profiles: list[tempfile.TemporaryDirectory] = []

    def factory(*extraArgs: str) -> Browser:
        profiles.append(tempfile.TemporaryDirectory(prefix="webui-chromium-"))
        opened.append(Browser(playwright, profiles[-1].name, extraArgs))
        return opened[-1]

    yield factory
    try:
        for browser in opened:
            browser.close()
    finally:
        for profile in profiles:
            profile.cleanup()


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with StubServer(models=STUB_MODELS, chunkDelayMs=STUB_CHUNK_DELAY_MS) as server:
        yield server


def waitForHealth(service: ServiceProcess, ready: Callable[[dict], bool], timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(service.baseUrl + "/health", timeout=5, headers={"X-API-Key": API_KEY}).json()
        if ready(health):
            return health
        assert time.monotonic() < deadline, f"the service did not get ready: {health}"
        time.sleep(0.1)


def startService(serviceFactory: Callable, stub: StubServer, **env: str) -> ServiceProcess:
    service = serviceFactory({"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl, **env})
    waitForHealth(service, lambda health: health["models"]["available"] >= len(STUB_MODELS))
    return service


def enterKeys(page: Page, apiKey: str = API_KEY, openAiKey: str = OPENAI_KEY) -> None:
    page.fill("#apiKey", apiKey)
    page.fill("#openAiKey", openAiKey)
    page.click("#keySave")


def openPage(browser: Browser, service: ServiceProcess, model: str | None = None) -> Page:
    """The page with both keys entered, the models loaded and ``model`` picked."""
    page = browser.page
    page.goto(service.baseUrl + "/")
    enterKeys(page)
    expect(page.locator("#models .model")).to_have_count(len(MODEL_MAPPING))
    if model:
        pickModel(page, model)
    return page


def pickModel(page: Page, name: str) -> None:
    page.check(f'#models input[name="model"][value="{name}"]')


def sendChat(page: Page, text: str) -> None:
    page.fill("#chatPrompt", text)
    page.click("#chatSend")


def lastAnswer(page: Page, within: str = "#conversation") -> Any:
    return page.locator(f"{within} .message.assistant").last


def waitUntilDone(answer: Any, timeout: float = WAIT_MS) -> None:
    expect(answer).not_to_have_class(re.compile(r"\bstreaming\b"), timeout=timeout)


def alertOf(page: Page) -> Any:
    return page.get_by_role("alert")


PIECE_WATCHER = """() => {
  window.webUiPieces = [];
  const conversation = document.getElementById("conversation");
  new MutationObserver(() => {
    const answers = conversation.querySelectorAll(".message.assistant .answerText");
    const last = answers[answers.length - 1];
    const pieces = window.webUiPieces;
    if (last && (!pieces.length || pieces[pieces.length - 1][0] !== last.textContent.length)) {
      pieces.push([last.textContent.length, performance.now()]);
    }
  }).observe(conversation, { childList: true, subtree: true, characterData: true });
}"""
"""Records each length the newest answer's text takes, with the time, as the page updates it."""


def makePdf(pageCount: int) -> bytes:
    document = pymupdf.open()
    for number in range(1, pageCount + 1):
        page = document.new_page(width=595, height=842)
        page.insert_text((72, 110), f"Invoice 2025-{number:03d}", fontsize=30)
        page.draw_rect(pymupdf.Rect(72, 160, 523, 420), color=(0.1, 0.3, 0.7), fill=(0.85, 0.9, 1.0))
        page.insert_text((90, 300), f"Page {number} of {pageCount} - total CHF {number * 100}.00", fontsize=18)
    return document.tobytes()


def makePng() -> bytes:
    image = Image.new("RGB", (640, 420), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 600, 380), outline=(31, 95, 191), width=8)
    draw.text((80, 180), "Receipt CHF 42.00", fill=(0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def stubChats(stub: StubServer) -> list[dict]:
    return [entry for entry in stub.state.requests if entry["path"] == "/api/chat"]


# --- tests --------------------------------------------------------------------------------------------------------

def test_chatStreamsTheAnswerInPiecesWithMetricsAndKeepsTheConversation(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub)
    browser = openBrowser()
    page = browser.page
    page.goto(service.baseUrl + "/")
    expect(page.locator("#health")).to_contain_text("Ollama reachable")  # the details need a key
    expect(page.locator("#models")).to_contain_text("Enter a key")
    shoot(page, "01-page-loaded")

    page.fill("#apiKey", API_KEY)
    page.fill("#openAiKey", OPENAI_KEY)
    shoot(page, "02-keys-entered")
    page.click("#keySave")
    models = page.locator("#models .model")
    expect(models).to_have_count(len(MODEL_MAPPING))
    for modelType in ("text", "vision", "reasoning", "embedding", "stt"):
        expect(page.locator(f"#models .badge-{modelType}").first).to_have_text(modelType)
    planned = page.locator("#models .model.unavailable", has_text="poweron-vision-multimodal")
    expect(planned).to_contain_text("planned — not pulled in Ollama yet")
    expect(planned.locator("input")).to_be_disabled()
    expect(page.locator("#models .model:not(.unavailable) input")).to_have_count(len(STUB_MODELS))
    shoot(page, "03-model-picker")

    assert page.evaluate("sessionStorage.getItem('poweron.apiKey')") == API_KEY
    assert page.evaluate("sessionStorage.getItem('poweron.openAiKey')") == OPENAI_KEY
    assert page.evaluate("localStorage.length") == 0 and browser.context.cookies() == []
    assert API_KEY not in page.url and OPENAI_KEY not in page.url

    pickModel(page, "poweron-text-general")
    page.evaluate(PIECE_WATCHER)
    sendChat(page, "[[slow]] What does PowerOn do?")
    answer = lastAnswer(page)
    expect(answer.locator(".answerText")).to_have_text(re.compile(r"\S"))
    expect(answer).to_have_class(re.compile(r"\bstreaming\b"))
    shoot(page, "04-chat-streaming")
    waitUntilDone(answer)
    shoot(page, "05-chat-answer")

    text = answer.locator(".answerText").text_content()
    assert text.startswith(STUB_REPLY_START) and "What does PowerOn do?" in text
    pieces = [(length, at) for length, at in page.evaluate("window.webUiPieces") if length > 0]
    lengths = [length for length, _ in pieces]
    assert len(lengths) >= 4 and lengths == sorted(lengths) and lengths[-1] == len(text), lengths
    assert pieces[-1][1] - pieces[0][1] >= 600, f"the pieces came too close together: {pieces}"
    metrics = METRICS_WITH_USAGE.search(answer.locator(".metrics").text_content())
    assert metrics and int(metrics.group(1)) == 8, answer.locator(".metrics").text_content()

    sendChat(page, "And in one word?")
    second = lastAnswer(page)
    waitUntilDone(second)
    expect(page.locator("#conversation .message.assistant")).to_have_count(2)
    messages = stubChats(stub)[-1]["body"]["messages"]
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == text and messages[2]["content"] == "And in one word?"
    shoot(page, "06-chat-second-turn")

    calls = [(path, headers) for _, path, headers in browser.guard.requests if path.startswith(("/api/", "/v1/"))]
    assert {path for path, _ in calls} >= {"/api/models", "/v1/chat/completions"}
    for path, headers in calls:
        expected = ("x-api-key", API_KEY) if path.startswith("/api/") else ("authorization", f"Bearer {OPENAI_KEY}")
        assert headers.get(expected[0]) == expected[1] and "cookie" not in headers, (path, headers)

    page.reload()
    expect(models).to_have_count(len(MODEL_MAPPING))
    expect(page.locator('#models input[value="poweron-text-general"]')).to_be_checked()


def test_reasoningIsFoldedAndStopEndsTheUpstreamGeneration(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub)
    page = openPage(openBrowser(), service, "poweron-text-reasoning")
    sendChat(page, "Why is the sky blue?")
    answer = lastAnswer(page)
    waitUntilDone(answer)
    thinking = answer.locator("details.thinking")
    expect(thinking).to_be_visible()
    assert thinking.get_attribute("open") is None
    assert "The user asks about" in thinking.locator(".thinkingText").text_content()
    assert "The user asks about" not in answer.locator(".answerText").text_content()
    shoot(page, "07-reasoning-folded")
    thinking.locator("summary").click()
    expect(thinking.locator(".thinkingText")).to_be_visible()
    shoot(page, "08-reasoning-open")

    pickModel(page, "poweron-text-general")
    stub.state.events.clear()
    prompt = "[[slow]] Tell me a long story about the grid"
    sendChat(page, prompt)
    answer = lastAnswer(page)
    expect(answer.locator(".answerText")).to_have_text(re.compile(r"\S"))
    page.click("#chatStop")
    expect(answer).to_have_class(re.compile(r"\bstopped\b"))
    expect(answer.locator(".metrics")).to_contain_text("Stopped")
    expect(page.locator("#chatSend")).to_be_enabled()
    expect(page.locator("#chatStop")).to_be_disabled()
    deadline = time.monotonic() + 5
    while not (stops := [event for event in stub.state.events if event["type"] == "disconnect"]):
        assert time.monotonic() < deadline, f"the upstream generation was not stopped: {stub.state.events}"
        time.sleep(0.05)
    assert stops[0]["afterChunks"] < 8, stops
    fullReply = REPLY_TEMPLATE.format(prompt=prompt[:PROMPT_ECHO_CHARS])
    assert 0 < len(answer.locator(".answerText").text_content()) < len(fullReply)
    expect(alertOf(page)).to_be_hidden()
    shoot(page, "09-chat-stopped")


def test_pdfShowsThumbnailsOfTheAnalysedPagesThenTheAnswer(serviceFactory, stub, openBrowser,
                                                         tmp_path: Path) -> None:
    service = startService(serviceFactory, stub)
    pdf = tmp_path / "invoices-7-pages.pdf"
    pdf.write_bytes(makePdf(7))
    browser = openBrowser()
    page = openPage(browser, service, "poweron-vision-general")
    page.click("#tabDocument")
    page.set_input_files("#documentFile", str(pdf))
    thumbnails = page.locator("#thumbnails img")
    summary = page.locator("#documentSummary")
    expect(thumbnails).to_have_count(5)
    expect(summary).to_contain_text("Pages 1–5 of 7 will be analysed by poweron-vision-general")
    assert all(src.startswith("data:image/jpeg;base64,") for src in
               page.eval_on_selector_all("#thumbnails img", "images => images.map(i => i.src)"))
    widths = page.eval_on_selector_all("#thumbnails img", "images => images.map(i => i.naturalWidth)")
    assert all(50 < width <= 200 for width in widths), widths
    shoot(page, "10-pdf-thumbnails")

    page.fill("#documentPages", "6-7")
    page.press("#documentPages", "Tab")
    expect(thumbnails).to_have_count(2)
    expect(page.locator("#thumbnails figcaption")).to_have_text(["Page 6", "Page 7"])
    expect(summary).to_contain_text("Pages 6–7 of 7 will be analysed")
    shoot(page, "11-pdf-pages-chosen")

    page.fill("#documentPrompt", "What is the invoice total?")
    page.click("#documentSend")
    answer = lastAnswer(page, "#documentResult")
    waitUntilDone(answer)
    expect(answer.locator(".answerText")).to_contain_text(STUB_REPLY_START)
    expect(answer).to_contain_text("Analysing page(s) 6–7 of 7")
    assert METRICS_WITH_USAGE.search(answer.locator(".metrics").text_content())
    assert len(stubChats(stub)[-1]["images"]) == 2
    expect(alertOf(page)).to_be_hidden()
    shoot(page, "12-pdf-answer")

    png = tmp_path / "receipt.png"
    png.write_bytes(makePng())
    page.fill("#documentPages", "")
    page.set_input_files("#documentFile", str(png))
    expect(thumbnails).to_have_count(1)
    assert thumbnails.first.get_attribute("src").startswith("blob:")
    expect(summary).to_contain_text("The image will be analysed by poweron-vision-general")
    shoot(page, "13-image-thumbnail")
    page.fill("#documentPrompt", "What is the total on the receipt?")
    page.click("#documentSend")
    imageAnswer = lastAnswer(page, "#documentResult")
    waitUntilDone(imageAnswer)
    expect(imageAnswer.locator(".answerText")).to_contain_text(STUB_REPLY_START)
    expect(imageAnswer.locator(".answerText")).to_contain_text("What is the total on the receipt?")
    lastChat = stubChats(stub)[-1]
    assert len(lastChat["images"]) == 1
    assert lastChat["body"]["model"] == MODEL_MAPPING["poweron-vision-general"].ollamaName
    expect(alertOf(page)).to_be_hidden()
    previews = [headers for _, path, headers in browser.guard.requests if path == "/api/preview"]
    assert len(previews) == 2 and all(headers.get("x-api-key") == API_KEY for headers in previews)


def test_onlyTheOpenAiKeyShowsTheAvailableModelsWithTypesFromTheirNames(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub)
    page = openBrowser().page
    page.goto(service.baseUrl + "/")
    enterKeys(page, apiKey="")
    available = httpx.get(service.baseUrl + "/v1/models", headers={"Authorization": f"Bearer {OPENAI_KEY}"},
                          timeout=5).json()["data"]
    rows = page.locator("#models .model")
    expect(rows).to_have_count(len(available))
    expect(page.locator("#models .model.unavailable")).to_have_count(0)
    for model in available:
        badge = page.locator(f'#models .model:has(input[value="{model["id"]}"]) .badge')
        expect(badge).to_have_text(MODEL_MAPPING[model["id"]].type)
    expect(page.locator("#models .badge-unknown")).to_have_count(0)
    expect(page.locator("#models .modelsNote")).to_contain_text("Enter the analysis key too")
    shoot(page, "14a-openai-key-only-models")
    pickModel(page, "poweron-text-reasoning")
    sendChat(page, "Hello")
    waitUntilDone(lastAnswer(page))
    expect(lastAnswer(page).locator(".answerText")).to_contain_text(STUB_REPLY_START)


def test_wrongKeysAreNamedInAClearMessage(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub)
    page = openBrowser().page
    page.goto(service.baseUrl + "/")
    enterKeys(page, apiKey="wrong-analysis-key-0000", openAiKey=OPENAI_KEY)
    alert = alertOf(page)
    expect(alert).to_contain_text("The analysis key (X-API-Key) was refused — check it.")
    expect(page.locator("#models")).to_contain_text("could not be loaded")
    shoot(page, "14-wrong-analysis-key")

    enterKeys(page, apiKey=API_KEY, openAiKey="wrong-openai-key-00000")
    expect(page.locator("#models .model")).to_have_count(len(MODEL_MAPPING))
    expect(alert).to_be_hidden()
    pickModel(page, "poweron-text-general")
    sendChat(page, "Hello")
    expect(alert).to_contain_text("The OpenAI key (Bearer) was refused — check it.")
    expect(lastAnswer(page)).to_have_class(re.compile(r"\bfailed\b"))
    shoot(page, "15-wrong-openai-key")


def test_rateLimitedKeyShowsHowLongToWait(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub, PRIVATE_LLM_RATELIMIT__PER_KEY="cursor=1/1")
    page = openPage(openBrowser(), service, "poweron-text-general")
    sendChat(page, "First question")
    waitUntilDone(lastAnswer(page))
    expect(alertOf(page)).to_be_hidden()
    sendChat(page, "Second question")
    alert = alertOf(page)
    expect(alert).to_contain_text(re.compile(r"Rate limited — try again in \d+ s\. The OpenAI key \(Bearer\)"))
    wait = int(re.search(r"try again in (\d+) s", alert.text_content()).group(1))
    assert 1 <= wait <= 60
    shoot(page, "16-rate-limited")


def test_modelNotPulledAndOllamaDownAreExplained(serviceFactory, stub, openBrowser) -> None:
    service = startService(serviceFactory, stub)
    page = openPage(openBrowser(), service, "poweron-text-general")
    httpx.post(stub.url("/_stub/remove"), json={"name": "qwen2.5:7b"}, timeout=5).raise_for_status()
    waitForHealth(service, lambda health: "poweron-text-general" not in health["models"]["names"])
    sendChat(page, "Hello")
    alert = alertOf(page)
    expect(alert).to_contain_text("configured but not available yet")
    shoot(page, "17-model-not-pulled")

    stub.stop()
    waitForHealth(service, lambda health: health["status"] == "degraded")
    sendChat(page, "Hello again")
    expect(alert).to_contain_text(re.compile(r"Ollama is not reachable\. Retry in \d+ s"))
    shoot(page, "18-ollama-down")
    page.click("#keySave")
    expect(page.locator("#health")).to_contain_text("Ollama is not reachable")
    expect(page.locator("#models .model.unavailable")).to_have_count(len(MODEL_MAPPING))
    expect(page.locator("#models .model").first).to_contain_text("Ollama is not reachable")
    shoot(page, "19-models-while-ollama-is-down")


@pytest.mark.stt
def test_audioUploadGivesTheTranscriptAndItsLanguage(serviceFactory, stub, openBrowser, tmp_path: Path) -> None:
    """Multilingual whisper base: an uploaded German clip (umlauts intact, German detected), then an English
    recording from Chromium's fake microphone (English detected)."""
    whisper = WhisperProcess(tmp_path, model=str(whisperBaseDir())).start()
    try:
        service = startService(serviceFactory, stub, PRIVATE_LLM_WHISPER__BASE_URL=whisper.baseUrl,
                               PRIVATE_LLM_WHISPER__ENABLED="true")
        waitForHealth(service, lambda health: health["whisper"]["reachable"])
        german = speakIn(UMLAUT_TEXT, tmp_path / "german.wav", UMLAUT_RATE, voice="de")
        speech = speak(SHORT_TEXT, tmp_path / "speech.wav")
        microphone = ("--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                      f"--use-file-for-fake-audio-capture={speech}%noloop")
        page = openPage(openBrowser(*microphone), service, "poweron-transcribe")
        expect(page.locator("#tabAudio")).to_have_attribute("aria-selected", "true")
        page.set_input_files("#audioFile", str(german))
        expect(page.locator("#audioPlayer")).to_be_visible()
        page.click("#audioSend")
        answer = lastAnswer(page, "#audioResult")
        waitUntilDone(answer, timeout=90_000)
        expect(alertOf(page)).to_be_hidden()
        transcript = answer.locator(".answerText").text_content()
        assert all(word in transcript for word in UMLAUT_WORDS), transcript
        expect(answer.locator(".transcriptLanguage")).to_have_text("Language: German (detected)")
        expect(answer.locator(".metrics")).to_contain_text(re.compile(r"first text [\d.]+ m?s · total"))
        shoot(page, "20-audio-transcript")

        page.set_input_files("#audioFile", [])
        page.click("#recordStart")
        expect(page.locator("#recordState")).to_have_text("Recording…")
        page.wait_for_timeout(RECORD_MS)
        page.click("#recordStop")
        expect(page.locator("#recordState")).to_contain_text("Recorded")
        page.click("#audioSend")
        recorded = lastAnswer(page, "#audioResult")
        waitUntilDone(recorded, timeout=90_000)
        expect(alertOf(page)).to_be_hidden()
        heard = recorded.locator(".answerText").text_content()
        assert wordErrorRate(SHORT_TEXT, heard) < MAX_WORD_ERROR_RATE, heard
        expect(recorded.locator(".transcriptLanguage")).to_have_text("Language: English (detected)")
        shoot(page, "21-audio-recorded")
    finally:
        whisper.stop()


def test_guardAbortsAndReportsRequestsThatLeaveLoopback(openBrowser) -> None:
    """The route guard stops a request for another host before Chromium's network stack: the page sees the guard's
    abort (not the resolver floor's "not resolved"), and the guard reports the URL. The target is an .invalid name
    (RFC 6761), never a real address, and the floor (BROWSER_FLOOR) would stop it without a DNS query anyway."""
    browser = openBrowser()
    failed: list[tuple[str, str | None]] = []
    browser.page.on("requestfailed", lambda request: failed.append((request.url, request.failure)))
    outside = "http://pixel.invalid/pixel.png"
    browser.page.set_content(f'<img id="leak" src="{outside}">')
    expect(browser.page.locator("#leak")).to_have_js_property("complete", True)
    assert browser.page.eval_on_selector("#leak", "image => image.naturalWidth") == 0
    assert [url for url, _ in failed] == [outside], failed
    assert failed[0][1].startswith("net::ERR_BLOCKED_BY_CLIENT"), failed  # Chromium adds ".Inspector"
    assert browser.guard.outside == [outside]
    browser.guard.outside.clear()  # reported as intended: the teardown check must not fail this test


def test_apiReferenceShowsTheDocumentReadWithTheTabsKey(serviceFactory, stub, openBrowser) -> None:
    """/docs: Swagger UI from the service itself reads /openapi.json with the key entered on the test page."""
    service = startService(serviceFactory, stub)
    browser = openBrowser()
    page = browser.page
    page.goto(service.baseUrl + "/docs")
    expect(page.locator("#docsStatus")).to_contain_text("No key in this tab")
    page.goto(service.baseUrl + "/")
    enterKeys(page, openAiKey="")
    page.goto(service.baseUrl + "/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("PowerOn private LLM service")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()
    expect(page.locator("#swagger")).to_contain_text("/v1/chat/completions")
    shoot(page, "api-docs")
    fetched = [headers for method, path, headers in browser.guard.requests if path == "/openapi.json"]
    assert fetched and all(headers.get("x-api-key") == API_KEY for headers in fetched)



def test_aChatWaitingForAModelSlotShowsItsPlaceInTheQueue(serviceFactory, stub, openBrowser) -> None:
    """One Ollama slot, held by another key's slow stream: the browser's chat shows "queued (position 1)" from the
    stream's queue comments, then the answer (and the note goes)."""
    service = startService(serviceFactory, stub, PRIVATE_LLM_OLLAMA__NUM_PARALLEL="1",
                           PRIVATE_LLM_OLLAMA__QUEUE_NOTICE_SECONDS="0.2")
    page = openPage(openBrowser(), service, "poweron-text-general")
    httpx.post(stub.baseUrl + "/_stub/config", json={"chunks": 30, "chunkDelayMs": 150}).raise_for_status()
    body = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "hold"}]}
    holder = threading.Thread(target=lambda: httpx.post(
        service.baseUrl + "/v1/chat/completions", json=body, timeout=60,
        headers={"Authorization": f"Bearer {OTHER_OPENAI_KEY}"}))
    holder.start()
    try:
        waitForHealth(service, lambda health: any(q["slotsBusy"] == 1 for q in health.get("queues", [])))
        sendChat(page, "Am I queued?")
        answer = lastAnswer(page)
        expect(answer.locator(".queued")).to_have_text("queued (position 1)", timeout=WAIT_MS)
        shoot(page, "17-chat-queued")
        waitUntilDone(answer, timeout=30_000)
        expect(answer.locator(".queued")).to_have_count(0)
        assert answer.locator(".answerText").text_content().startswith(STUB_REPLY_START)
    finally:
        holder.join(60)
        httpx.post(stub.baseUrl + "/_stub/reset")
