// One answer on the page: folded reasoning, the text as it streams in, and its timings and token counts.

const MIN_RATE_WINDOW_MS = 20; // below this the tokens came in one burst: a rate would be noise

export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

export function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

export function addUserMessage(container, text) {
  const message = element("article", "message user");
  message.append(element("div", "role", "You"), element("div", "text", text));
  container.append(message);
  message.scrollIntoView({ block: "end" });
  return message;
}

export class AnswerView {
  // firstLabel names the first-piece time: "TTFT" for model answers, "first text" for transcripts.
  constructor(container, title, firstLabel = "TTFT") {
    this.firstLabel = firstLabel;
    this.startedAt = performance.now();
    this.firstAt = null;
    this.root = element("article", "message assistant streaming");
    this.head = element("div", "role", title);
    this.thinking = element("details", "thinking");
    this.thinking.hidden = true;
    this.thinkingText = element("pre", "thinkingText");
    this.thinking.append(element("summary", "", "Reasoning"), this.thinkingText);
    this.text = element("div", "text answerText");
    this.metrics = element("div", "metrics");
    this.root.append(this.head, this.thinking, this.text, this.metrics);
    container.append(this.root);
  }

  markFirst() {
    if (this.firstAt === null) this.firstAt = performance.now();
    this.queued?.remove();
  }

  // The request waits in the service for a model slot (the stream's ": queued, position N" comments).
  setQueued(position) {
    if (!this.queued) {
      this.queued = element("div", "note queued");
      this.root.insertBefore(this.queued, this.text);
    }
    this.queued.textContent = `queued (position ${position})`;
  }

  addText(piece) {
    if (!piece) return;
    this.markFirst();
    this.text.textContent += piece;
    this.root.scrollIntoView({ block: "end" });
  }

  addThinking(piece) {
    if (!piece) return;
    this.markFirst();
    this.thinking.hidden = false;
    this.thinkingText.textContent += piece;
  }

  addNote(text, className = "") {
    const note = element("div", `note ${className}`.trim(), text);
    this.root.insertBefore(note, this.text);
    return note;
  }

  content() {
    return this.text.textContent;
  }

  timings() {
    const endedAt = performance.now();
    const ttft = this.firstAt === null ? null : this.firstAt - this.startedAt;
    const generationMs = this.firstAt === null ? null : endedAt - this.firstAt;
    return { ttft, total: endedAt - this.startedAt, generationMs };
  }

  // usage: {promptTokens, completionTokens} or null
  finish(usage) {
    this.root.classList.remove("streaming");
    this.queued?.remove();
    const { ttft, total, generationMs } = this.timings();
    const parts = [`${this.firstLabel} ${ttft === null ? "–" : formatMs(ttft)}`, `total ${formatMs(total)}`];
    if (usage) {
      const rate = generationMs >= MIN_RATE_WINDOW_MS ? usage.completionTokens / (generationMs / 1000) : null;
      parts.push(rate === null ? "tokens/s – (arrived at once)" : `${rate.toFixed(1)} tokens/s`);
      parts.push(`${usage.promptTokens} prompt + ${usage.completionTokens} completion tokens`);
    }
    this.metrics.textContent = parts.join(" · ");
  }

  stop(reason = "Stopped", cssClass = "stopped") {
    this.finish(null);
    this.root.classList.add(cssClass);
    this.metrics.textContent = `${reason} · ${this.metrics.textContent}`;
  }

  fail(message) {
    this.stop("Failed", "failed");
    this.root.insertBefore(element("div", "errorText", message), this.metrics);
  }

  // An aborted request (the stop button) is stopped; anything else failed, with the message shown.
  end(error, showAlert) {
    if (error.name === "AbortError") {
      this.stop();
      return;
    }
    this.fail(error.message);
    showAlert(error.message);
  }
}
