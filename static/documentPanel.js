// Image / PDF: thumbnails of the pages that will be analysed (POST /api/preview renders them on the server; an
// image is shown as it is), then the streamed answer of POST /api/analyze.

import { ApiError, postForm, readSse } from "./api.js";
import { AnswerView, element } from "./answerView.js";

const DEFAULT_VISION_MODEL = "poweron-vision-general";
const MODE_TEXT = { single: "in one image", combined: "together in one message", perPage: "one page at a time" };

function isImage(file) {
  return file.type.startsWith("image/") && file.type !== "image/svg+xml";
}

function thumbnail(src, caption) {
  const figure = element("figure", "thumbnail");
  const image = element("img");
  Object.assign(image, { src, alt: caption });
  figure.append(image, element("figcaption", "", caption));
  return figure;
}

function pageList(pages) {
  const ranges = [];
  for (const page of pages) {
    const last = ranges[ranges.length - 1];
    if (last && page === last[1] + 1) last[1] = page;
    else ranges.push([page, page]);
  }
  return ranges.map(([a, b]) => (a === b ? `${a}` : `${a}–${b}`)).join(", ");
}

function previewSummary(preview) {
  const pages = preview.pagesAnalysed;
  const what = `Page${pages.length === 1 ? "" : "s"} ${pageList(pages)} of ${preview.pageCount}`;
  const rest = preview.truncated ? " (the first pages only: choose others with Pages)" : "";
  return `${what} will be analysed by ${preview.model}, ${MODE_TEXT[preview.mode] || preview.mode}${rest}.`;
}

function applyEvent(answer, event, result) {
  if (event.type === "error") throw new ApiError(`The analysis failed: ${event.detail}`);
  if (event.type === "start") {
    answer.addNote(`Analysing page(s) ${pageList(event.pagesAnalysed)} of ${event.pageCount} · rendered in `
      + `${Math.round(event.durations.renderMs)} ms`);
  }
  if (event.type === "queued") answer.setQueued(event.position);
  if (event.type === "page") answer.addText(`${answer.content() ? "\n\n" : ""}${event.marker}\n`);
  if (event.type === "thinking") answer.addThinking(event.text);
  if (event.type === "delta") answer.addText(event.text);
  if (event.type === "done") {
    result.usage = event.usage;
    result.warnings = event.warnings || [];
  }
}

export function setupDocument(ui) {
  const fileInput = document.getElementById("documentFile");
  const pagesInput = document.getElementById("documentPages");
  const summary = document.getElementById("documentSummary");
  const thumbnails = document.getElementById("thumbnails");
  const results = document.getElementById("documentResult");
  const sendButton = document.getElementById("documentSend");
  const stopButton = document.getElementById("documentStop");
  const state = { objectUrl: null, controller: null, previewRun: 0 };

  const modelName = () => ui.models.withCapability("vision", DEFAULT_VISION_MODEL);

  function formFor(extra) {
    const form = new FormData();
    form.append("file", fileInput.files[0]);
    if (pagesInput.value.trim()) form.append("pages", pagesInput.value.trim());
    form.append("model", modelName());
    for (const [name, value] of Object.entries(extra)) form.append(name, value);
    return form;
  }

  function showImage(file) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(file);
    thumbnails.replaceChildren(thumbnail(state.objectUrl, file.name));
    summary.textContent = `The image will be analysed by ${modelName()} (scaled to the model's pixel budget).`;
  }

  async function showPages() {
    const run = ++state.previewRun;
    summary.textContent = "Rendering the page thumbnails…";
    thumbnails.replaceChildren();
    try {
      const preview = await (await postForm("/api/preview", "api", formFor({}))).json();
      if (run !== state.previewRun) return;
      thumbnails.replaceChildren(...preview.thumbnails.map((t) => thumbnail(t.dataUrl, `Page ${t.page}`)));
      summary.textContent = previewSummary(preview);
    } catch (error) {
      if (run !== state.previewRun) return;
      summary.textContent = "No preview: see the message above.";
      ui.showAlert(error.message);
    }
  }

  function refreshPreview() {
    const file = fileInput.files[0];
    ui.clearAlert();
    if (!file) return;
    if (isImage(file)) showImage(file);
    else showPages();
  }

  async function analyse() {
    if (!fileInput.files[0]) return ui.showAlert("Choose an image or PDF first.");
    ui.clearAlert();
    const answer = new AnswerView(results, `${modelName()} · ${fileInput.files[0].name}`);
    results.replaceChildren(answer.root);
    const controller = new AbortController();
    setBusy(controller);
    const prompt = document.getElementById("documentPrompt").value.trim() || "Describe this document.";
    try {
      const response = await postForm("/api/analyze", "api", formFor({ prompt, stream: "sse" }), controller.signal);
      const result = { usage: null, warnings: [] };
      for await (const event of readSse(response)) applyEvent(answer, JSON.parse(event.data), result);
      answer.finish(result.usage);
      result.warnings.forEach((warning) => answer.addNote(warning));
    } catch (error) {
      answer.end(error, ui.showAlert);
    } finally {
      setBusy(null);
    }
  }

  function setBusy(controller) {
    state.controller = controller;
    sendButton.disabled = controller !== null;
    stopButton.disabled = controller === null;
  }

  fileInput.addEventListener("change", refreshPreview);
  pagesInput.addEventListener("change", refreshPreview);
  stopButton.addEventListener("click", () => state.controller?.abort());
  document.getElementById("documentForm").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.controller) analyse();
  });
  return {
    modelChanged() {
      document.getElementById("documentModel").textContent = `with ${modelName()}`;
      if (fileInput.files[0] && !isImage(fileInput.files[0])) refreshPreview();
    },
  };
}
