"""Telemetry that libraries send from native code, past anything the service's Python code sees, switched off for
the whole process and the processes it starts (render workers inherit the environment).

onnxruntime (imported by pymupdf in the render workers, and by faster-whisper's voice activity filter) otherwise
resolves and posts to mobile.events.data.microsoft.com from its own threads, after import and at exit, and writes a
device id under ~/.cache/Microsoft. Its switch is read once, when it is first imported, so each program calls
``switchOffNativeTelemetry`` before anything can import it."""

from __future__ import annotations

import os

NATIVE_TELEMETRY_SWITCHES = {"ORT_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def switchOffNativeTelemetry() -> None:
    """Set the switches (forced, not defaults: an inherited ``=0`` does not turn telemetry back on)."""
    os.environ.update(NATIVE_TELEMETRY_SWITCHES)
