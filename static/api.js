// Calls to the service: keys from sessionStorage, errors a person can read, and an SSE reader for fetch streams.

export const KEY_CLASSES = {
  api: { storageKey: "poweron.apiKey", label: "analysis key (X-API-Key)", field: "apiKey" },
  openai: { storageKey: "poweron.openAiKey", label: "OpenAI key (Bearer)", field: "openAiKey" },
};

export class ApiError extends Error {}

export function storedKey(keyClass) {
  return sessionStorage.getItem(KEY_CLASSES[keyClass].storageKey) || "";
}

export function storeKey(keyClass, value) {
  const name = KEY_CLASSES[keyClass].storageKey;
  if (value) {
    sessionStorage.setItem(name, value);
  } else {
    sessionStorage.removeItem(name);
  }
}

export function authHeaders(keyClass) {
  const key = storedKey(keyClass);
  if (!key) {
    const { label } = KEY_CLASSES[keyClass];
    throw new ApiError(`Enter the ${label} first (Keys, on the left): every call needs it.`);
  }
  return keyClass === "api" ? { "X-API-Key": key } : { Authorization: `Bearer ${key}` };
}

async function readBody(response) {
  const text = await response.text().catch(() => "");
  try {
    return JSON.parse(text);
  } catch {
    return { detail: text.slice(0, 300) };
  }
}

function messageOf(body) {
  if (body && typeof body.error === "object" && body.error) {
    return { message: body.error.message || "", code: body.error.code || "" };
  }
  return { message: (body && (body.detail || body.message)) || "", code: (body && body.code) || "" };
}

function retryAfterSeconds(response, body) {
  const header = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  if (Number.isFinite(header)) return header;
  return Number.isFinite(body && body.retryAfter) ? Math.ceil(body.retryAfter) : null;
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

export function describeStatus(status, message, code, keyLabel, wait) {
  const detail = message ? ` (${message})` : "";
  if (status === 401) return `The ${keyLabel} was refused — check it.${detail}`;
  if (status === 429) {
    const when = wait === null ? "a moment" : `${wait} s`;
    return `Rate limited — try again in ${when}. The ${keyLabel} has used up its requests for now.`;
  }
  if (status === 404 && code === "model_not_found") return message;
  if (status === 503) {
    const retry = wait === null ? "" : ` Retry in ${wait} s.`;
    return `${sentence(message || "Ollama is not reachable right now")}${retry}`;
  }
  if (status === 504) return `The model took too long to answer.${detail}`;
  return `The request failed with status ${status}.${detail}`;
}

export async function failureText(response, keyClass) {
  const body = await readBody(response);
  const { message, code } = messageOf(body);
  const wait = retryAfterSeconds(response, body);
  return describeStatus(response.status, message, code, KEY_CLASSES[keyClass].label, wait);
}

export async function callApi(path, keyClass, options = {}) {
  const headers = { ...authHeaders(keyClass), ...(options.headers || {}) };
  let response;
  try {
    response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "omit" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(`The service did not answer: ${error.message}. Is it running?`);
  }
  if (!response.ok) throw new ApiError(await failureText(response, keyClass));
  return response;
}

export function postJson(path, keyClass, body, signal) {
  return callApi(path, keyClass, {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
  });
}

export function postForm(path, keyClass, form, signal) {
  return callApi(path, keyClass, { method: "POST", body: form, signal, headers: { Accept: "text/event-stream" } });
}

const QUEUED_COMMENT = /^: ?queued, position (\d+)/;

// A block is one event; the service's ": queued, position N" comment (a stream waiting for a model slot) becomes
// a "queued" event with {type, position}, other comments are skipped.
function parseEvent(block) {
  const data = [];
  let name = "message";
  for (const line of block.split("\n")) {
    const queued = QUEUED_COMMENT.exec(line);
    if (queued) return { event: "queued", data: JSON.stringify({ type: "queued", position: Number(queued[1]) }) };
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
    if (field === "event") name = value;
  }
  return data.length ? { event: name, data: data.join("\n") } : null;
}

// Server-sent events of a fetch response, one {event, data} at a time, as they arrive.
export async function* readSse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
      if (done) break;
    }
    const last = parseEvent(buffer.trim());
    if (last) yield last;
  } finally {
    await reader.cancel().catch(() => {});
  }
}

export function streamErrorText(error) {
  const message = (error && (error.message || error.detail)) || "unknown error";
  return `The answer broke off: ${message}`;
}
