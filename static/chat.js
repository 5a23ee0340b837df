// Chat: multi-turn, streamed from POST /v1/chat/completions (SSE), reasoning folded, a stop button that aborts.

import { ApiError, postJson, readSse, streamErrorText } from "./api.js";
import { AnswerView, addUserMessage } from "./answerView.js";

function chatModelProblem(model) {
  if (!model) return "Pick a model first (Model, on the left).";
  const canChat = model.type === "unknown" || model.capabilities.includes("completion");
  return canChat ? null : `${model.name} is a ${model.type} model and cannot chat; pick a text, reasoning or `
    + "vision model.";
}

function applyChunk(answer, chunk, result) {
  if (chunk.error) throw new ApiError(streamErrorText(chunk.error));
  if (chunk.usage) {
    result.usage = { promptTokens: chunk.usage.prompt_tokens, completionTokens: chunk.usage.completion_tokens };
  }
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    answer.addThinking(delta.reasoning_content);
    answer.addText(delta.content);
    if (choice.finish_reason === "length") result.note = "cut off by the token limit";
  }
}

async function streamAnswer(request, answer, signal) {
  const response = await postJson("/v1/chat/completions", "openai", request, signal);
  const result = { usage: null, note: "" };
  for await (const event of readSse(response)) {
    if (event.data === "[DONE]") return result;
    if (event.event === "queued") {
      answer.setQueued(JSON.parse(event.data).position);
      continue;
    }
    applyChunk(answer, JSON.parse(event.data), result);
  }
  throw new ApiError("The answer broke off: the stream ended without [DONE].");
}

export function setupChat(ui) {
  const form = document.getElementById("chatForm");
  const prompt = document.getElementById("chatPrompt");
  const conversation = document.getElementById("conversation");
  const sendButton = document.getElementById("chatSend");
  const stopButton = document.getElementById("chatStop");
  const chat = { history: [], controller: null };

  function setBusy(controller) {
    chat.controller = controller;
    sendButton.disabled = controller !== null;
    stopButton.disabled = controller === null;
  }

  async function send(text) {
    const model = ui.models.selected;
    const problem = chatModelProblem(model);
    if (problem) return ui.showAlert(problem);
    ui.clearAlert();
    document.getElementById("chatEmpty")?.remove();
    addUserMessage(conversation, text);
    chat.history.push({ role: "user", content: text });
    const answer = new AnswerView(conversation, model.name);
    const controller = new AbortController();
    setBusy(controller);
    const request = { model: model.name, messages: chat.history, stream: true,
      stream_options: { include_usage: true } };
    try {
      const result = await streamAnswer(request, answer, controller.signal);
      answer.finish(result.usage);
      if (result.note) answer.addNote(result.note);
    } catch (error) {
      answer.end(error, ui.showAlert);
    } finally {
      setBusy(null);
      if (answer.content()) {
        chat.history.push({ role: "assistant", content: answer.content() });
      } else {
        chat.history.pop();
      }
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || chat.controller) return;
    prompt.value = "";
    send(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => chat.controller?.abort());
  document.getElementById("chatClear").addEventListener("click", () => {
    chat.controller?.abort();
    chat.history = [];
    conversation.replaceChildren();
  });
}
