// The API reference page: Swagger UI (self-hosted) reading /openapi.json with a key this tab keeps.
import { KEY_CLASSES, storedKey } from "./api.js";

function keyHeaders() {
  const apiKey = storedKey("api");
  if (apiKey) return { "X-API-Key": apiKey };
  const openAiKey = storedKey("openai");
  return openAiKey ? { Authorization: `Bearer ${openAiKey}` } : null;
}

function showDocs(headers) {
  const status = document.getElementById("docsStatus");
  globalThis.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger",
    requestInterceptor: (request) => {
      if (new URL(request.url, location.href).pathname === "/openapi.json") Object.assign(request.headers, headers);
      return request;
    },
    onComplete: () => { status.textContent = "Each route shows the key it needs; use “Authorize” to try one."; },
  });
}

const headers = keyHeaders();
if (headers) {
  showDocs(headers);
} else {
  document.getElementById("docsStatus").textContent =
    `No key in this tab: enter an ${KEY_CLASSES.api.label} or an ${KEY_CLASSES.openai.label} on the test page, then come back.`;
}
