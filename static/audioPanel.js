// Audio: upload a file or record from the microphone, then the transcript from POST /v1/audio/transcriptions
// (poweron-transcribe, streamed segment by segment) and the language it was heard in.

import { ApiError, postForm, readSse, streamErrorText } from "./api.js";
import { AnswerView } from "./answerView.js";

const TRANSCRIBE_MODEL = "poweron-transcribe";
const RECORDING_TYPES = ["audio/webm;codecs=opus", "audio/ogg;codecs=opus", "audio/webm", "audio/mp4"];

function recordingType() {
  return RECORDING_TYPES.find((type) => MediaRecorder.isTypeSupported(type)) || "";
}

function fileNameFor(blob) {
  const extension = blob.type.includes("ogg") ? "ogg" : blob.type.includes("mp4") ? "m4a" : "webm";
  return `recording.${extension}`;
}

// The done event names the language as verbose_json does ("german"): detected, or the one the form gave.
function languageNote(name, given) {
  const shown = name ? name.charAt(0).toUpperCase() + name.slice(1) : "unknown";
  return `Language: ${shown} (${given ? "as given" : "detected"})`;
}

function applyEvent(answer, payload, languageGiven) {
  if (payload.error) throw new ApiError(streamErrorText(payload.error));
  if (payload.type === "transcript.text.delta") answer.addText(payload.delta);
  if (payload.type === "transcript.text.done") {
    answer.text.textContent = payload.text;
    if (payload.language) answer.addNote(languageNote(payload.language, languageGiven), "transcriptLanguage");
    return true;
  }
  return false;
}

export function setupAudio(ui) {
  const fileInput = document.getElementById("audioFile");
  const player = document.getElementById("audioPlayer");
  const recordState = document.getElementById("recordState");
  const startButton = document.getElementById("recordStart");
  const stopButton = document.getElementById("recordStop");
  const results = document.getElementById("audioResult");
  const state = { recording: null, recorder: null, objectUrl: null };

  function play(blob) {
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    state.objectUrl = URL.createObjectURL(blob);
    player.src = state.objectUrl;
    player.hidden = false;
  }

  async function startRecording() {
    if (!navigator.mediaDevices || !window.MediaRecorder) {
      return ui.showAlert("Recording needs a browser with a microphone, over HTTPS or on localhost.");
    }
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (error) {
      return ui.showAlert(`The microphone is not available: ${error.message}`);
    }
    const chunks = [];
    const recorder = new MediaRecorder(stream, { mimeType: recordingType() });
    recorder.addEventListener("dataavailable", (event) => chunks.push(event.data));
    recorder.addEventListener("stop", () => {
      stream.getTracks().forEach((track) => track.stop());
      state.recording = new Blob(chunks, { type: recorder.mimeType });
      fileInput.value = "";
      play(state.recording);
      recordState.textContent = `Recorded ${(state.recording.size / 1024).toFixed(0)} KiB: press Transcribe.`;
    });
    recorder.start();
    state.recorder = recorder;
    startButton.disabled = true;
    stopButton.disabled = false;
    recordState.textContent = "Recording…";
  }

  function stopRecording() {
    state.recorder?.stop();
    state.recorder = null;
    startButton.disabled = false;
    stopButton.disabled = true;
  }

  function audioForm() {
    const form = new FormData();
    const file = fileInput.files[0];
    if (file) form.append("file", file);
    else form.append("file", state.recording, fileNameFor(state.recording));
    form.append("model", TRANSCRIBE_MODEL);
    form.append("stream", "true");
    const language = document.getElementById("audioLanguage").value.trim();
    if (language) form.append("language", language);
    return form;
  }

  async function transcribe() {
    if (!fileInput.files[0] && !state.recording) return ui.showAlert("Choose an audio file or record first.");
    ui.clearAlert();
    const answer = new AnswerView(results, `${TRANSCRIBE_MODEL} · transcript`, "first text");
    results.replaceChildren(answer.root);
    const button = document.getElementById("audioSend");
    button.disabled = true;
    try {
      const form = audioForm();
      const response = await postForm("/v1/audio/transcriptions", "openai", form);
      const languageGiven = form.has("language");
      let complete = false;
      for await (const event of readSse(response)) {
        complete = applyEvent(answer, JSON.parse(event.data), languageGiven) || complete;
      }
      if (!complete) throw new ApiError("The transcript broke off before it was complete.");
      answer.finish(null);
    } catch (error) {
      answer.end(error, ui.showAlert);
    } finally {
      button.disabled = false;
    }
  }

  fileInput.addEventListener("change", () => {
    state.recording = null;
    if (fileInput.files[0]) play(fileInput.files[0]);
  });
  startButton.addEventListener("click", startRecording);
  stopButton.addEventListener("click", stopRecording);
  document.getElementById("audioForm").addEventListener("submit", (event) => {
    event.preventDefault();
    transcribe();
  });
}
