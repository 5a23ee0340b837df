// The model picker: every configured model with its type badge; planned models that are not pulled are greyed out.

import { ApiError, callApi, storedKey } from "./api.js";
import { element } from "./answerView.js";

const SELECTED_MODEL_KEY = "poweron.model";
const TYPE_ORDER = ["text", "reasoning", "vision", "embedding", "stt"];
// With only the OpenAI key the list comes from /v1/models (names only): the type is inferred from the name.
const NAME_TYPES = [[/transcri|whisper|stt/, "stt"], [/embed/, "embedding"], [/vision|multimodal|vl\b/, "vision"],
  [/reason|think/, "reasoning"], [/text|chat|general/, "text"]];
const TYPE_CAPABILITIES = { text: ["completion"], reasoning: ["completion", "thinking"],
  vision: ["completion", "vision"], embedding: ["embedding"], stt: [] };
const INFERRED_NOTE = "Only the OpenAI key is entered: these are the available models, typed from their names. "
  + "Enter the analysis key too to see every configured model, its purpose and the planned ones not pulled yet.";

function inferredModel(name) {
  const match = NAME_TYPES.find(([pattern]) => pattern.test(name.toLowerCase()));
  const type = match ? match[1] : "unknown";
  return { name, type, purpose: "", available: true, capabilities: TYPE_CAPABILITIES[type] || [], inferred: true };
}

async function fetchModels() {
  if (storedKey("api")) {
    const body = await (await callApi("/api/models", "api")).json();
    return body.models;
  }
  if (storedKey("openai")) {
    const body = await (await callApi("/v1/models", "openai")).json();
    return body.data.map((model) => inferredModel(model.id));
  }
  throw new ApiError("Enter a key first (Keys, on the left): the model list needs the analysis key.");
}

function unavailableHint(model, health) {
  if (model.type === "stt") return "speech-to-text service not running";
  if (health && health.ollama && !health.ollama.reachable) return "Ollama is not reachable";
  return "planned — not pulled in Ollama yet";
}

function modelRow(model, health, onPick) {
  const row = element("label", `model${model.available ? "" : " unavailable"}`);
  const input = element("input");
  Object.assign(input, { type: "radio", name: "model", value: model.name, disabled: !model.available });
  input.addEventListener("change", () => onPick(model));
  const name = element("span", "modelName", model.name);
  const badge = element("span", `badge badge-${model.type}`, model.type);
  if (model.inferred) badge.title = "type inferred from the model name";
  const head = element("span", "modelHead");
  head.append(input, name, badge);
  row.append(head);
  const hint = model.available ? model.purpose : `${unavailableHint(model, health)} · ${model.purpose}`;
  if (hint) row.append(element("span", "modelHint", hint));
  row.title = model.available ? model.purpose : unavailableHint(model, health);
  return row;
}

function sortModels(models) {
  const rank = (model) => [model.available ? 0 : 1, TYPE_ORDER.indexOf(model.type)];
  return [...models].sort((a, b) => {
    const [x, y] = [rank(a), rank(b)];
    return x[0] - y[0] || x[1] - y[1];
  });
}

export class ModelPicker {
  constructor(container, onChange) {
    this.container = container;
    this.onChange = onChange;
    this.models = [];
    this.selected = null;
  }

  async load(health) {
    this.container.replaceChildren(element("p", "hint", "Loading the models…"));
    try {
      this.models = await fetchModels();
    } catch (error) {
      this.reset("The models could not be loaded (see the message above).");
      throw error;
    }
    const pick = (model) => this.select(model);
    this.container.replaceChildren(...sortModels(this.models).map((model) => modelRow(model, health, pick)));
    if (this.models.some((model) => model.inferred)) this.container.append(element("p", "hint modelsNote", INFERRED_NOTE));
    this.restoreSelection();
  }

  reset(text) {
    this.models = [];
    this.selected = null;
    this.container.replaceChildren(element("p", "hint", text));
    this.onChange(null);
  }

  restoreSelection() {
    const wanted = sessionStorage.getItem(SELECTED_MODEL_KEY);
    const usable = this.models.filter((model) => model.available);
    const model = usable.find((m) => m.name === wanted) || usable.find((m) => m.type === "text") || usable[0];
    if (model) this.select(model);
  }

  select(model) {
    this.selected = model;
    sessionStorage.setItem(SELECTED_MODEL_KEY, model.name);
    const input = this.container.querySelector(`input[value="${CSS.escape(model.name)}"]`);
    if (input) input.checked = true;
    this.onChange(model);
  }

  // The selected model when it has the capability, else the first available one that has it.
  withCapability(capability, fallbackName) {
    const fits = (model) => model && model.available && (model.capabilities.includes(capability)
      || model.type === capability);
    if (fits(this.selected)) return this.selected.name;
    const other = this.models.find(fits);
    return other ? other.name : fallbackName;
  }
}
