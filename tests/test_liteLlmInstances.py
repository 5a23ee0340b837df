"""KIVA/LiteLLM in front of two instances: the two-deployment config of docu/integration.md, loaded by a real
LiteLLM 1.74.4 proxy (bench/litellmProxy.py's venv, installed on first use), with the instance paths pointed at two
real service processes. A killed instance: every request is still answered (by the other). An instance answering
429 with Retry-After: LiteLLM cools it down and answers from the other; it stays away for our Retry-After (60 s),
not only for the router's cooldown_time (10 s)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench import litellmProxy
from tests.conftest import OPENAI_KEY, ServiceProcess, freePort, stopProcess, waitForHttp
from tests.test_docs import validatedBlock

MASTER_KEY = "sk-poweron-test-master-key"
CHAT = {"model": "poweron-text-general", "messages": [{"role": "user", "content": "Hallo"}]}
GENEROUS = "cursor=600000/10000/1000"
LITELLM_START_SECONDS = 240
LITELLM_VENV = Path(os.environ.get("POWERON_LITELLM_VENV")
                    or Path.home() / ".cache" / "poweron-llm" / f"litellm-{litellmProxy.LITELLM_VERSION}")
"""Used when the checkout has no bench/.litellm-venv of that version (make bench builds it): outside the checkout, so
a fresh clone (CI) on the same machine reuses it; the install takes minutes."""


@pytest.fixture(scope="module")
def litellmInstalled(tmp_path_factory) -> str:
    if litellmProxy.installedVersion() != litellmProxy.LITELLM_VERSION:
        litellmProxy.VENV_DIR = LITELLM_VENV  # read at call time by ensureLitellm and litellmCommand
    try:
        return litellmProxy.ensureLitellm(tmp_path_factory.mktemp("litellm-install") / "pip.log")
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"LiteLLM {litellmProxy.LITELLM_VERSION} cannot be installed here: {exc}")


def documentedConfig(ports: list[int]) -> str:
    """docu/integration.md's two-instance block, instance-a/-b pointed at the two test instances."""
    config = yaml.safe_load(validatedBlock("litellm-instances")[0].text)
    for entry in config["model_list"]:
        params = entry["litellm_params"]
        instance = re.search(r"/instance-([ab])/v1$", params["api_base"]).group(1)  # type: ignore[union-attr]
        params["api_base"] = f"http://127.0.0.1:{ports['ab'.index(instance)]}/v1"
    config["litellm_settings"] = {"telemetry": False}
    config["general_settings"] = {"master_key": MASTER_KEY}
    return yaml.safe_dump(config)


def startInstance(testIni: Path, stub, perKey: str, port: int | None = None) -> ServiceProcess:
    service = ServiceProcess(testIni, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                                       "PRIVATE_LLM_RATELIMIT__PER_KEY": perKey})
    if port is not None:
        service.port, service.baseUrl = port, f"http://127.0.0.1:{port}"
        service.env["PRIVATE_LLM_SERVER__PORT"] = str(port)
        service.logPath = testIni.with_name(f"service-{port}-again.log")
    return service.start(timeout=90)


def chatStatuses(client: httpx.Client, count: int) -> list[int]:
    return [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(count)]


def chatLines(service: ServiceProcess) -> list[int]:
    """Statuses of the chat requests in an instance's access log, in order."""
    statuses = []
    for line in service.logText().splitlines():
        if line.startswith("{") and '"/v1/chat/completions"' in line:
            statuses.append(json.loads(line)["status"])
    return statuses


@pytest.mark.e2e
def test_liteLlmKeepsAnsweringThroughTheOtherInstance(litellmInstalled, tmp_path, testIni, stub, stubControl):
    first, second = startInstance(testIni, stub, GENEROUS), startInstance(testIni, stub, GENEROUS)
    instances = [first, second]
    (tmp_path / "litellm.yaml").write_text(documentedConfig([first.port, second.port]))
    (tmp_path / "logging.json").write_text(json.dumps(litellmProxy.LOG_CONFIG))
    port = freePort()
    command = litellmProxy.litellmCommand(tmp_path / "litellm.yaml", tmp_path / "logging.json", port)
    with open(tmp_path / "litellm.log", "wb") as log:
        proxy = subprocess.Popen(command,
                                 env={**litellmProxy.litellmEnv(), "POWERON_KIVA_KEY": OPENAI_KEY}, cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        waitForHttp(f"http://127.0.0.1:{port}/health/liveliness", LITELLM_START_SECONDS, proxy)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {MASTER_KEY}"}) as client:
            assert chatStatuses(client, 6) == [200] * 6
            first.process.kill()  # no shutdown: connections to it are refused from now on
            first.process.wait()
            assert chatStatuses(client, 12) == [200] * 12
            assert len(chatLines(second)) >= 12

            # The killed instance comes back with the key over its limit: one request spends its only token.
            limited = startInstance(testIni, stub, "cursor=1/1/1000", port=first.port)
            instances.append(limited)
            assert httpx.post(limited.baseUrl + "/v1/chat/completions", json=CHAT, timeout=30,
                              headers={"Authorization": f"Bearer {OPENAI_KEY}"}).status_code == 200
            time.sleep(11)  # the router's cooldown_time (10 s) of the killed instance has run out
            assert chatStatuses(client, 12) == [200] * 12
            assert chatLines(limited) == [200, 429], "one 429 (Retry-After: 60), then no request during the cooldown"
            time.sleep(10.5)  # longer than the router's cooldown_time: the 60 s of our Retry-After decide
            assert chatStatuses(client, 4) == [200] * 4
            assert chatLines(limited) == [200, 429]
    finally:
        stopProcess(proxy)
        for instance in instances:
            instance.stop()
