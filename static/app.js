// The browser test UI: keys (sessionStorage only), health, tabs and the model picker; the panels do the calls.

import { KEY_CLASSES, authHeaders, storedKey, storeKey } from "./api.js";
import { setupAudio } from "./audioPanel.js";
import { setupChat } from "./chat.js";
import { setupDocument } from "./documentPanel.js";
import { ModelPicker } from "./models.js";

const TABS = { chat: "tabChat", document: "tabDocument", audio: "tabAudio" };

function createAlert() {
  const box = document.getElementById("alert");
  const text = document.getElementById("alertText");
  document.getElementById("alertClose").addEventListener("click", () => { box.hidden = true; });
  return {
    showAlert(message) {
      text.textContent = message;
      box.hidden = false;
    },
    clearAlert() {
      box.hidden = true;
      text.textContent = "";
    },
  };
}

function unreachableText(reason) {
  if (!reason) return "Ollama is not reachable";
  return /ollama/i.test(reason) ? reason : `Ollama is not reachable: ${reason}`;
}

async function readHealth() {
  const pill = document.getElementById("health");
  try {
    const keyClass = ["api", "openai"].find((name) => storedKey(name));
    const headers = keyClass ? authHeaders(keyClass) : {};  // the details (version, models) need a key
    const health = await (await fetch("/health", { cache: "no-store", credentials: "omit", headers })).json();
    const reachable = health.ollama && health.ollama.reachable;
    const models = health.models ? ` · ${health.models.available} of ${health.models.configured} models` : "";
    pill.textContent = reachable
      ? (health.models ? `Ollama ${health.ollama.version || ""}${models}` : "Ollama reachable")
      : unreachableText(health.ollama.reason);
    pill.className = `pill ${reachable ? "ok" : "bad"}`;
    return health;
  } catch (error) {
    pill.textContent = "The service does not answer";
    pill.className = "pill bad";
    return null;
  }
}

function selectTab(name) {
  for (const [tab, id] of Object.entries(TABS)) {
    const button = document.getElementById(id);
    button.setAttribute("aria-selected", String(tab === name));
    document.getElementById(button.getAttribute("aria-controls")).hidden = tab !== name;
  }
}

function setupTabs() {
  for (const [name, id] of Object.entries(TABS)) {
    document.getElementById(id).addEventListener("click", () => selectTab(name));
  }
}

function keyStateText() {
  const present = Object.entries(KEY_CLASSES).filter(([keyClass]) => storedKey(keyClass)).map(([, c]) => c.label);
  return present.length ? `Using the ${present.join(" and the ")} (this tab's sessionStorage only).`
    : "Kept in this tab's sessionStorage only: never in a cookie or the URL.";
}

function setupKeys(ui, reload) {
  const form = document.getElementById("keyForm");
  const stateText = document.getElementById("keyState");
  for (const [keyClass, { field }] of Object.entries(KEY_CLASSES)) {
    document.getElementById(field).value = storedKey(keyClass);
  }
  stateText.textContent = keyStateText();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    for (const [keyClass, { field }] of Object.entries(KEY_CLASSES)) {
      storeKey(keyClass, document.getElementById(field).value.trim());
    }
    stateText.textContent = keyStateText();
    reload();
  });
  document.getElementById("keyForget").addEventListener("click", () => {
    for (const [keyClass, { field }] of Object.entries(KEY_CLASSES)) {
      storeKey(keyClass, "");
      document.getElementById(field).value = "";
    }
    stateText.textContent = keyStateText();
    ui.models.reset("Enter a key to see the models.");
  });
}

function main() {
  const ui = createAlert();
  const panels = {};
  ui.models = new ModelPicker(document.getElementById("models"), (model) => {
    document.getElementById("chatModel").textContent = model ? `with ${model.name}` : "";
    panels.document?.modelChanged();
    if (model && model.type === "stt") selectTab("audio");
  });
  setupTabs();
  setupChat(ui);
  panels.document = setupDocument(ui);
  setupAudio(ui);
  const reload = async () => {
    ui.clearAlert();
    const health = await readHealth();
    try {
      await ui.models.load(health);
    } catch (error) {
      ui.showAlert(error.message);
    }
  };
  setupKeys(ui, reload);
  if (storedKey("api") || storedKey("openai")) reload();
  else readHealth();
}

main();
