"""LiteLLM proxy, the anchor of the benchmark: its own venv (bench/.litellm-venv, git-ignored), a config with
``ollama_chat/<model>`` on the bench upstream, no database, telemetry off, one uvicorn worker, quiet logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

LITELLM_VERSION = os.environ.get("BENCH_LITELLM_VERSION", "1.74.4")
VENV_DIR = Path(__file__).resolve().parent / ".litellm-venv"
INSTALL_TIMEOUT_SECONDS = 600
QUIET_LOGGERS = ("LiteLLM", "LiteLLM Proxy", "LiteLLM Router", "httpx", "httpcore")
LOG_CONFIG = {
    "version": 1, "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
    "loggers": {"uvicorn": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
                "uvicorn.error": {"level": "WARNING"},
                "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
                **{name: {"level": "WARNING"} for name in QUIET_LOGGERS}},
}


def litellmExecutable() -> Path:
    return VENV_DIR / "bin" / "litellm"


def installedVersion() -> str | None:
    python = VENV_DIR / "bin" / "python"
    if not python.exists() or not litellmExecutable().exists():
        return None
    probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                           capture_output=True, text=True, timeout=60)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensureLitellm(log: Path) -> str:
    """Install ``litellm[proxy]==LITELLM_VERSION`` into its venv unless it is there; returns the version.
    Raises RuntimeError with pip's last lines when the install fails."""
    if installedVersion() == LITELLM_VERSION:
        return LITELLM_VERSION
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV_DIR} (first run only, a few minutes)", flush=True)
    if not (VENV_DIR / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV_DIR)], check=True, timeout=120,
                       env=_venvEnv())
    with open(log, "wb") as out:
        completed = subprocess.run([str(VENV_DIR / "bin" / "pip"), "install", "--disable-pip-version-check", "-q",
                                    f"litellm[proxy]=={LITELLM_VERSION}"], stdout=out, stderr=subprocess.STDOUT,
                                   timeout=INSTALL_TIMEOUT_SECONDS)
    if completed.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"pip install litellm[proxy]=={LITELLM_VERSION} failed: " + " | ".join(tail))
    version = installedVersion()
    if version != LITELLM_VERSION:
        raise RuntimeError(f"litellm installed but reports version {version!r}")
    return version


def _venvEnv() -> dict[str, str]:
    """``python -m venv`` from inside the service venv must not inherit it."""
    return {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONHOME")}


def configYaml(externalName: str, ollamaName: str, upstreamUrl: str, masterKey: str) -> str:
    """The proxy config: one model on the upstream, master key auth, no database, telemetry off."""
    return (f"model_list:\n"
            f"  - model_name: {externalName}\n"
            f"    litellm_params:\n"
            f"      model: ollama_chat/{ollamaName}\n"
            f"      api_base: {upstreamUrl}\n"
            f"litellm_settings:\n"
            f"  telemetry: false\n"
            f"general_settings:\n"
            f"  master_key: {masterKey}\n")


def writeConfig(directory: Path, externalName: str, ollamaName: str, upstreamUrl: str,
                masterKey: str) -> tuple[Path, Path]:
    configPath = directory / "litellm.yaml"
    configPath.write_text(configYaml(externalName, ollamaName, upstreamUrl, masterKey), encoding="utf-8")
    logConfigPath = directory / "litellm-logging.json"
    logConfigPath.write_text(json.dumps(LOG_CONFIG), encoding="utf-8")
    return configPath, logConfigPath


def litellmCommand(configPath: Path, logConfigPath: Path, port: int) -> list[str]:
    return [str(litellmExecutable()), "--config", str(configPath), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1", "--log_config", str(logConfigPath)]


def litellmEnv() -> dict[str, str]:
    """Offline cost map, no telemetry, no database, quiet logging."""
    env = _venvEnv()
    for name in ("DATABASE_URL", "DIRECT_URL", "REDIS_URL", "REDIS_HOST"):
        env.pop(name, None)
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_LOG="ERROR")
    return env
