"""docu/ and the operations files tell the truth: workflows, units, proxy configs and YAML snippets are parsed and
checked; every shell and Python block marked ``<!-- tested -->`` runs against the real service (Ollama played by
the stub, the real whisper service with tiny.en); config keys, environment variables, routes and files the docs
name exist.

Convention for fenced blocks in the operations docs: the line before the fence is one of
``<!-- tested -->`` (run here), ``<!-- validated: <kind> -->`` (YAML checked by a test below),
``<!-- server -->`` (runs on the real server only; bash syntax is checked) or ``<!-- example -->`` (placeholders
or output; bash syntax is checked).
"""

from __future__ import annotations

import configparser
import http.server
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from config import MODEL_MAPPING, LimitsSettings, ServerSettings, Settings
from tests.conftest import (
    API_KEY,
    OPENAI_KEY,
    REPO_ROOT,
    TEST_INI,
    ServiceProcess,
    freePort,
    guardedEnv,
    stopProcess,
    waitForHttp,
)
from tests.documentSamples import makeImage, makePdf
from tests.ollamaStub import StubServer

DOCU = REPO_ROOT / "docu"
OPERATIONS_DOCS = ("architecture.md", "setupserver.md", "migration.md", "integration.md", "analysis-api.md",
                   "speech-to-text.md", "security.md")
WORKFLOWS = REPO_ROOT / ".forgejo" / "workflows"
SERVICE_UNITS = ("poweron-llm.service", "poweron-llm@.service", "poweron-whisper.service")
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes", "ProtectHome": "yes",
             "Restart": "on-failure", "User": "poweron", "KillMode": "mixed", "CapabilityBoundingSet": "",
             "IPAddressDeny": "any", "IPAddressAllow": "localhost"}
OLLAMA_VARIABLES = ("OLLAMA_HOST", "OLLAMA_NUM_PARALLEL", "OLLAMA_MAX_LOADED_MODELS", "OLLAMA_KEEP_ALIVE",
                    "OLLAMA_MAX_QUEUE", "OLLAMA_NO_CLOUD", "OLLAMA_CONTEXT_LENGTH")
MARKER = re.compile(r"^<!-- (tested|server|example|validated: [a-z0-9-]+) -->$|^<!-- [a-z]+-(example) -->$")
FENCE = re.compile(r"^\s*```(\w*)\s*$")
BLOCK_TIMEOUT_SECONDS = 180
STUB_MODELS = ["qwen2.5:7b", "qwen2.5vl:7b", "granite3.2-vision", "nomic-embed-text"]
OLLAMA_PATHS = {"/api/tags", "/api/chat", "/api/show", "/api/version", "/api/ps", "/api/generate", "/api/pull"}
"""Ollama's own API, named where the docs explain what the service sends upstream."""
LITELLM_MODES = {"text": "chat", "vision": "chat", "reasoning": "chat", "embedding": "embedding",
                 "stt": "audio_transcription"}


@dataclass(frozen=True)
class DocBlock:
    """One fenced block of a markdown file and the marker line before it."""

    path: Path
    line: int
    language: str
    marker: str | None
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def docBlocks(path: Path) -> list[DocBlock]:
    """Every fenced block of ``path`` with the marker comment on the line right before its opening fence."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip().startswith("```"))
        previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
        marker = MARKER.match(previous)
        text = textwrap.dedent("\n".join(lines[index + 1:end])) + "\n"
        kind = (marker.group(1) or marker.group(2)) if marker else None
        blocks.append(DocBlock(path, index + 1, opening.group(1), kind, text))
        index = end + 1
    return blocks


def allBlocks() -> list[DocBlock]:
    return [block for name in OPERATIONS_DOCS for block in docBlocks(DOCU / name)]


def blocksMarked(marker: str) -> list[DocBlock]:
    return [block for block in allBlocks() if block.marker == marker]


def loadYaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def workflowTriggers(workflow: dict) -> dict:
    """The ``on:`` section (YAML 1.1 reads the bare key ``on`` as True)."""
    triggers = workflow.get("on", workflow.get(True))
    return {name: None for name in triggers} if isinstance(triggers, list) else triggers


def stepCommands(job: dict) -> str:
    return "\n".join(str(step.get("run", "")) for step in job["steps"])


def unitSections(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys such as Environment may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"{path.name}: not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def parsedByConfigParser(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text(encoding="utf-8"), source=str(path))
    return parser


def sizeInBytes(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)\s*([a-zA-Z]*)", text.strip()).groups()  # type: ignore[union-attr]
    factors = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
    return int(number) * factors[unit.lower()]


# ------------------------------------------------------------------------------------------------ workflows


def test_testWorkflowRunsTheReadmeTestCommandOnEveryPushAndPullRequest():
    workflow = loadYaml(WORKFLOWS / "test.yml")
    triggers = workflowTriggers(workflow)
    assert "push" in triggers and "pull_request" in triggers
    assert (triggers["push"] or {}).get("branches") is None  # every branch
    commands = stepCommands(workflow["jobs"]["test"])
    assert ".ci/run" in commands
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    assert "make test" in (REPO_ROOT / "README.md").read_text()
    assert any(str(step.get("uses", "")).startswith("actions/checkout") for step in workflow["jobs"]["test"]["steps"])


def test_deployWorkflowDeploysMainAfterTheTestsOverSsh():
    workflow = loadYaml(WORKFLOWS / "deploy.yml")
    assert workflowTriggers(workflow) == {"push": {"branches": ["main"]}}
    jobs = workflow["jobs"]
    assert stepCommands(jobs["test"]) == stepCommands(loadYaml(WORKFLOWS / "test.yml")["jobs"]["test"])
    deploy = jobs["deploy"]
    assert deploy["needs"] in ("test", ["test"])
    text = (WORKFLOWS / "deploy.yml").read_text()
    for secret in ("DEPLOY_HOST", "DEPLOY_USER", "DEPLOY_SSH_KEY", "DEPLOY_KNOWN_HOSTS"):
        assert "${{ secrets." + secret + " }}" in text
    assert 'deploy/push.sh "$DEPLOY_USER@$DEPLOY_HOST"' in stepCommands(deploy)


def test_deployScriptsInstallRestartWaitForReadinessAndRollBack():
    push = REPO_ROOT / "deploy" / "push.sh"
    activate = REPO_ROOT / "deploy" / "activate.sh"
    for script in (push, activate):
        assert os.access(script, os.X_OK), f"{script.name} is not executable"
        subprocess.run(["bash", "-n", str(script)], check=True)
    assert "deploy/activate.sh" in push.read_text()
    text = activate.read_text()
    for needed in ("venv/bin/pip\" install", "sudo systemctl restart", "/health/readiness", "rolled back to"):
        assert needed in text


# ------------------------------------------------------------------------------------------------ systemd units


@pytest.mark.parametrize("unitName", SERVICE_UNITS)
def test_serviceUnitsAreHardenedAndReadSecretsFromAnEnvironmentFile(unitName):
    path = DOCU / "systemd" / unitName
    parser = parsedByConfigParser(path)
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    service = unitSections(path)["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == [value], f"{unitName}: {key}={value} missing"
    assert service["EnvironmentFile"] == ["/etc/poweron-llm/secrets.env"]
    assert "PRIVATE_LLM_CONFIG=/etc/poweron-llm/config.ini" in service["Environment"]
    command = service["ExecStart"][0].split()
    assert service["WorkingDirectory"] == ["/opt/poweron-llm/current"]
    if command[-2] == "-m":  # a program package, run from the release directory
        assert (REPO_ROOT / command[-1] / "__main__.py").is_file()
    else:
        assert command[-1].startswith("/opt/poweron-llm/current/")
        assert (REPO_ROOT / command[-1].removeprefix("/opt/poweron-llm/current/")).is_file()
    assert float(service["TimeoutStopSec"][0]) > ServerSettings().graceful_shutdown_seconds


def test_ollamaDropInKeepsOllamaOnLoopbackWithoutCloud():
    path = DOCU / "systemd" / "ollama.service.d" / "override.conf"
    parsedByConfigParser(path)
    environment = dict(value.split("=", 1) for value in unitSections(path)["Service"]["Environment"])
    assert set(OLLAMA_VARIABLES) <= set(environment)
    assert environment["OLLAMA_HOST"].startswith("127.0.0.1:")
    assert environment["OLLAMA_NO_CLOUD"] == "1"


def test_ollamaValuesInTheDocsAreTheDropInsValues():
    path = DOCU / "systemd" / "ollama.service.d" / "override.conf"
    environment = dict(value.split("=", 1) for value in unitSections(path)["Service"]["Environment"])
    for name in ("setupserver.md", "migration.md"):
        rows = re.findall(r"^\| `(OLLAMA_[A-Z_]+)` \| `([^`]+)` \|", (DOCU / name).read_text(), re.M)
        assert rows, name
        for variable, value in rows:
            assert environment[variable] == value, f"{name}: {variable}"


def test_systemdAcceptsTheUnitsWhereSystemdAnalyzeExists(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(DOCU / "systemd" / unit)
                                                                      for unit in SERVICE_UNITS)],
                            capture_output=True, text=True)
    problems = [line for line in result.stderr.splitlines()
                if "Unknown key" in line or "Unknown section" in line or "Invalid" in line]
    assert not problems


# ------------------------------------------------------------------------------------------------ reverse proxies


def test_caddyfileStreamsUnbufferedAndLimitsUploadsLikeTheService():
    text = (DOCU / "Caddyfile").read_text()
    maxSize = re.search(r"max_size\s+(\S+)", text).group(1)  # type: ignore[union-attr]
    assert sizeInBytes(maxSize) == LimitsSettings().max_body_bytes
    assert re.search(r"flush_interval\s+-1", text)
    assert f"reverse_proxy 127.0.0.1:{ServerSettings().port}" in text
    assert re.search(r"@metrics path /metrics\s+respond @metrics 404", text)


def test_caddyAdaptsTheCaddyfileWhereCaddyExists():
    if shutil.which("caddy") is None:
        pytest.skip("caddy is not installed here")
    result = subprocess.run(["caddy", "adapt", "--config", str(DOCU / "Caddyfile"), "--adapter", "caddyfile"],
                            capture_output=True, text=True, check=True)
    adapted = yaml.safe_load(result.stdout)
    handlers = str(adapted["apps"]["http"]["servers"])
    assert "'flush_interval': -1" in handlers
    assert f"'max_size': {LimitsSettings().max_body_bytes}" in handlers


def test_nginxConfStreamsUnbufferedAndLimitsUploadsLikeTheService():
    text = (DOCU / "nginx.conf").read_text()
    maxSize = re.search(r"client_max_body_size\s+(\S+);", text).group(1)  # type: ignore[union-attr]
    assert sizeInBytes(maxSize) == LimitsSettings().max_body_bytes
    for directive in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;",
                      f"server 127.0.0.1:{ServerSettings().port} ",
                      "proxy_next_upstream error timeout non_idempotent;"):
        assert directive in text
    assert re.search(r"location = /metrics \{\s+return 404;", text)


def test_nginxAcceptsTheSiteWhereNginxExists(tmp_path):
    if shutil.which("nginx") is None or shutil.which("openssl") is None:
        pytest.skip("nginx or openssl is not installed here")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=llm.example.org", "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
                   check=True, capture_output=True)
    site = (DOCU / "nginx.conf").read_text().replace("/var/log/nginx/", f"{tmp_path}/")
    site = site.replace("/etc/letsencrypt/live/llm.example.org/fullchain.pem", str(tmp_path / "cert.pem"))
    site = site.replace("/etc/letsencrypt/live/llm.example.org/privkey.pem", str(tmp_path / "key.pem"))
    (tmp_path / "site.conf").write_text(site)
    temp = " ".join(f"{kind}_temp_path {tmp_path / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                      "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\nevents {{}}\n"
        f"http {{\n access_log off;\n {temp}\n include {tmp_path / 'site.conf'};\n}}\n")
    result = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------ doc blocks


def test_everyBlockInTheOperationsDocsSaysHowItIsChecked():
    unmarked = [block.id for block in allBlocks() if block.marker is None]
    assert not unmarked, f"fenced blocks without a marker comment: {unmarked}"
    assert len(blocksMarked("tested")) >= 10


@pytest.mark.parametrize("block", [b for b in allBlocks() if b.language == "bash" and b.marker != "tested"],
                         ids=lambda block: block.id)
def test_serverAndExampleShellBlocksParse(block):
    result = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("block", [b for b in allBlocks() if b.language == "yaml"], ids=lambda block: block.id)
def test_yamlBlocksParse(block):
    assert yaml.safe_load(block.text) is not None


def validatedBlock(kind: str) -> list[DocBlock]:
    blocks = blocksMarked(f"validated: {kind}")
    assert blocks, f"no block marked validated: {kind}"
    return blocks


def test_liteLlmModelListPointsEachModelAtOurV1():
    for block in validatedBlock("litellm"):
        config = yaml.safe_load(block.text)
        names = [entry["model_name"] for entry in config["model_list"]]
        assert len(names) == len(set(names))
        for entry in config["model_list"]:
            spec = MODEL_MAPPING[entry["model_name"]]
            params = entry["litellm_params"]
            assert params["model"] == "openai/" + spec.externalName
            assert re.fullmatch(r"https://[a-z0-9.-]+/v1", params["api_base"])
            assert params["api_key"].startswith("os.environ/")
            assert entry["model_info"]["mode"] == LITELLM_MODES[spec.type]
        assert {"poweron-text-general", "poweron-embed"} <= set(names)


def test_f13ModelsPointAtOurV1WithTheLivelinessProbe():
    for block in validatedBlock("f13"):
        models = yaml.safe_load(block.text)
        for name, entry in models.items():
            assert name in MODEL_MAPPING
            assert re.fullmatch(r"https://[a-z0-9.-]+/v1", entry["api"]["url"])
            assert entry["api"]["health_check"] == "/health/liveliness"
            assert entry["auth"]["type"] == "token"
            assert set(entry["inference"]) <= {"temperature", "top_p", "max_new_tokens"}


def test_prometheusScrapesMetricsOnLoopbackWithAKey():
    for block in validatedBlock("prometheus"):
        config = yaml.safe_load(block.text)
        job = next(job for job in config["scrape_configs"] if job.get("metrics_path") == "/metrics")
        assert job["static_configs"][0]["targets"] == [f"127.0.0.1:{ServerSettings().port}"]
        assert job["authorization"]["type"] == "Bearer"
        assert job["authorization"]["credentials_file"].startswith("/")


def test_sudoersLineAllowsExactlyTheRestartTheDeployRuns():
    activate = (REPO_ROOT / "deploy" / "activate.sh").read_text()
    units = re.search(r'POWERON_UNITS:-([^}"]+)', activate).group(1)  # type: ignore[union-attr]
    setup = (DOCU / "setupserver.md").read_text()
    assert f"NOPASSWD: /usr/bin/systemctl restart {units}" in setup


def test_vramTableMatchesModelMapping():
    text = (DOCU / "migration.md").read_text()
    rows = re.findall(r"^\| `(poweron-[a-z-]+)` \| `?([^|`]*)`? \| ([0-9.]+) GB \|", text, re.M)
    assert {name for name, _, _ in rows} == set(MODEL_MAPPING)
    for name, ollamaName, vram in rows:
        spec = MODEL_MAPPING[name]
        assert float(vram) == spec.vramGb
        assert ollamaName.strip() == (spec.ollamaName or "large-v3-turbo")


# ------------------------------------------------------------------------------------------------ truth checks


def docsText() -> str:
    return "\n".join((DOCU / name).read_text(encoding="utf-8") for name in OPERATIONS_DOCS)


def settingNames(section: str) -> set[str]:
    """The keys of one config.ini section (empty for an unknown section)."""
    field = Settings.model_fields.get(section)
    annotation = field.annotation if field is not None else None
    return set(getattr(annotation, "model_fields", {}))


def test_configKeysNamedInTheDocsExist():
    mentioned = set(re.findall(r"\[([a-z]+)\] ([a-z_]+)", docsText()))
    assert mentioned
    for section, key in mentioned:
        if section != "models":
            assert key in settingNames(section), f"[{section}] {key} is not a setting"


def test_environmentVariablesNamedInTheDocsExist():
    mentioned = set(re.findall(r"PRIVATE_LLM_([A-Z]+)__([A-Z_]+)", docsText()))
    assert mentioned
    for section, key in mentioned:
        assert key.lower() in settingNames(section.lower()), f"PRIVATE_LLM_{section}__{key}"


def test_routesNamedInTheDocsExist(makeSettings):
    from app import createApp

    routes = set(createApp(makeSettings()).openapi()["paths"]) | {"/metrics", "/"}
    for path in set(re.findall(r"`(?:GET |POST )?(/(?:v1|api|health)[a-z/{}A-Z_-]*)`", docsText())):
        path = path.rstrip("/")
        known = path in routes | OLLAMA_PATHS or any(route.startswith(path + "/") for route in routes)
        assert known, f"{path} is not a route (nor a prefix of one)"


def test_repositoryFilesNamedInTheDocsExist():
    for relative in set(re.findall(r"(?<![\w/.-])((?:docu|deploy|tests|\.forgejo/workflows)/[\w./@-]*\w)", docsText())):
        assert (REPO_ROOT / relative).exists(), relative


def test_relativeLinksResolve():
    for name in OPERATIONS_DOCS:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (DOCU / name).read_text()):
            assert (DOCU / target).exists(), f"{name} links to missing {target}"


# ------------------------------------------------------------------------------------------------ tested blocks


def neutralisationExample() -> str:
    """The request body analysis-api.md shows for neutralising personal data (its curl block posts the file)."""
    return next(block.text for block in docBlocks(DOCU / "analysis-api.md")
                if block.marker == "example" and '"replacements"' in block.text and block.language == "json")


@pytest.fixture(scope="module")
def workDir(tmp_path_factory) -> Path:
    """The directory the tested blocks run in, with the sample files they name."""
    from tests.whisperSupport import SHORT_TEXT, speak

    directory = tmp_path_factory.mktemp("docs")
    (directory / "invoice.png").write_bytes(makeImage(800, 600))
    (directory / "note.png").write_bytes(makeImage(600, 400))
    (directory / "receipt.jpg").write_bytes(makeImage(600, 800, fmt="JPEG"))
    for name in ("letter.pdf", "invoice.pdf", "scan.pdf"):
        (directory / name).write_bytes(makePdf(3))
    (directory / "neutralise.json").write_text(neutralisationExample(), encoding="utf-8")
    speak(SHORT_TEXT, directory / "meeting.wav")
    return directory


@pytest.fixture(scope="module")
def docService(workDir: Path) -> Iterator[ServiceProcess]:
    """The real service with the stub as Ollama and the real whisper service (tiny.en), CORS as setupserver.md says."""
    from tests.whisperSupport import WhisperProcess

    with StubServer(models=STUB_MODELS) as stub:
        whisper = WhisperProcess(workDir).start()
        iniPath = workDir / "config.ini"
        iniPath.write_text(TEST_INI, encoding="utf-8")
        service = ServiceProcess(iniPath, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl,
                                           "PRIVATE_LLM_WHISPER__BASE_URL": whisper.baseUrl,
                                           "PRIVATE_LLM_WHISPER__ENABLED": "true",
                                           "PRIVATE_LLM_SERVER__CORS_ORIGINS": "*"})
        try:
            service.start()
            waitForHttp(service.baseUrl + "/health/liveliness")
            yield service
        finally:
            service.stop()
            whisper.stop()


def blockEnvironment(service: ServiceProcess) -> dict[str, Any]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PRIVATE_LLM_")}
    return guardedEnv({**environment, "POWERON_URL": service.baseUrl, "POWERON_API_KEY": API_KEY,
                       "POWERON_OPENAI_KEY": OPENAI_KEY})


def waitUntilModelsAreListed(service: ServiceProcess) -> None:
    """Discovery is asynchronous: wait until the stub's models and the whisper service are listed."""
    deadline = time.monotonic() + 30
    names: list[str] = []
    while time.monotonic() < deadline:
        names = httpx.get(service.baseUrl + "/health", timeout=5,
                          headers={"X-API-Key": API_KEY}).json()["models"]["names"]
        if {"poweron-transcribe", "poweron-vision-deep", "poweron-embed"} <= set(names):
            return
        time.sleep(0.1)
    raise AssertionError(f"models never became available: {names}")


@pytest.mark.e2e
@pytest.mark.parametrize("block", blocksMarked("tested"), ids=lambda block: block.id)
def test_testedBlockRunsAgainstTheService(block: DocBlock, docService: ServiceProcess, workDir: Path):
    waitUntilModelsAreListed(docService)
    if block.language == "bash":
        command = ["bash", "-e", "-u", "-o", "pipefail", "-c", block.text]
    elif block.language == "python":
        command = [sys.executable, "-c", block.text]
    else:
        pytest.fail(f"{block.id}: only bash and python blocks can be tested, not {block.language!r}")
    result = subprocess.run(command, cwd=workDir, env=blockEnvironment(docService), capture_output=True, text=True,
                            timeout=BLOCK_TIMEOUT_SECONDS)
    assert result.returncode == 0, f"{block.id} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert result.stdout.strip(), f"{block.id} printed nothing"


@pytest.mark.e2e
def test_caddyProxiesStreamsAndLogsNoKeys(docService: ServiceProcess, tmp_path: Path):
    """docu/Caddyfile on plain HTTP in front of the real service: streams pass, /metrics is hidden, no key is logged."""
    if shutil.which("caddy") is None:
        pytest.skip("caddy is not installed here")
    port = freePort()
    logPath = tmp_path / "access.log"
    (tmp_path / "Caddyfile").write_text(caddySite(docService.port, port, logPath))
    caddy = subprocess.Popen(["caddy", "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
                             cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proxy = f"http://127.0.0.1:{port}"
        waitForHttp(proxy + "/health/liveliness", process=caddy)
        openAi = {"Authorization": f"Bearer {OPENAI_KEY}"}
        chat = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "Hallo"}]}
        with httpx.Client(base_url=proxy, timeout=60) as client:
            streamed = client.post("/v1/chat/completions", json=chat, headers=openAi)
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
            assert client.get("/api/models", headers={"X-API-Key": API_KEY}).status_code == 200
            assert client.get("/metrics", headers={"X-API-Key": API_KEY}).status_code == 404
    finally:
        caddy.terminate()
        caddy.wait(10)
    logged = logPath.read_text()
    assert "/v1/chat/completions" in logged and "/api/models" in logged
    assert API_KEY not in logged and OPENAI_KEY not in logged


def test_everyTopLevelModuleAndPackageIsDescribedInTheReadmeAndTheArchitecture():
    modules = sorted(path.name for path in REPO_ROOT.glob("*.py"))
    modules += sorted(f"{path.parent.name}/" for path in REPO_ROOT.glob("*/__init__.py") if path.parent.name != "tests"
                      and path.parent.name != "bench")
    for document in ("README.md", "docu/architecture.md"):
        text = (REPO_ROOT / document).read_text(encoding="utf-8")
        missing = [name for name in modules if f"`{name}`" not in text and f"{name}" not in text]
        assert not missing, f"{document} does not describe {missing}"


# ------------------------------------------------------------------------------------------------ proxies in front


PACED_CHUNKS = 12
PACED_DELAY_MS = 150
STREAM_SECONDS = PACED_CHUNKS * PACED_DELAY_MS / 1000.0
FIRST_CHUNK_MARGIN_SECONDS = 1.0
"""The first content chunk must arrive at least this long before the stream ends (a buffering proxy sends all at the
end, so the gap would be ~0)."""


@pytest.fixture(scope="module")
def pacedService(tmp_path_factory) -> Iterator[ServiceProcess]:
    """The service with the stub pacing PACED_CHUNKS chunks PACED_DELAY_MS apart (no whisper)."""
    directory = tmp_path_factory.mktemp("paced")
    with StubServer(models=STUB_MODELS, chunks=PACED_CHUNKS, chunkDelayMs=PACED_DELAY_MS) as stub:
        iniPath = directory / "config.ini"
        iniPath.write_text(TEST_INI, encoding="utf-8")
        service = ServiceProcess(iniPath, {"PRIVATE_LLM_OLLAMA__BASE_URL": stub.baseUrl})
        try:
            service.start()
            waitForHttp(service.baseUrl + "/health/liveliness")
            yield service
        finally:
            service.stop()


def caddySite(servicePort: int, port: int, logPath: Path, host: str = "127.0.0.1") -> str:
    """docu/Caddyfile adapted as docu/setupserver.md describes: plain HTTP on <host>:<port>, admin API off, the
    access log in the test directory, the service on its test port. Everything else as documented."""
    site = (DOCU / "Caddyfile").read_text()
    assert site.count("\n{\n") == 1, "docu/Caddyfile has one global options block"
    site = site.replace("\n{\n", "\n{\n\tadmin off\n", 1)
    site = site.replace("llm.example.org {", f"http://{host}:{port} {{")
    site = site.replace("/var/log/caddy/poweron-access.log", str(logPath))
    return re.sub(r"reverse_proxy 127\.0\.0\.1:\d+( 127\.0\.0\.1:\d+)+ \{", f"reverse_proxy 127.0.0.1:{servicePort} {{",
                  site, count=1)


def nginxSite(servicePort: int, port: int) -> str:
    """docu/nginx.conf adapted: the port-80 redirect server dropped, the TLS listen lines and certificate lines
    replaced by a plain ``listen 127.0.0.1:<port>``, the service on its test port. Everything else as documented."""
    site = (DOCU / "nginx.conf").read_text()
    site = re.sub(r"server \{\s+listen 80;.*?return 301 [^}]*\}\n", "", site, flags=re.S)
    site = re.sub(r"\s+listen (\[::\]:)?443 ssl http2;", "", site, count=1)
    site = re.sub(r"\s+listen \[::\]:443 ssl http2;", f"\n    listen 127.0.0.1:{port};", site, count=1)
    site = re.sub(r"\n\s+ssl_[a-z_]+ [^;]+;", "", site)
    return nginxUpstreams(site, [servicePort])


def nginxUpstreams(site: str, ports: list[int]) -> str:
    """The upstream block's server lines pointed at the given ports (their parameters kept)."""
    lines = re.findall(r"\n    server 127\.0\.0\.1:\d+([^;]*);", site)
    assert lines, "docu/nginx.conf names the instances as server 127.0.0.1:<port> lines"
    block = "".join(f"\n    server 127.0.0.1:{port}{lines[0]};" for port in ports)
    return re.sub(r"(\n    server 127\.0\.0\.1:\d+[^;]*;)+", lambda _: block, site, count=1)


@pytest.mark.e2e
def test_caddyLogsNoKeyForAHostInOtherLetterCase(tmp_path: Path):
    """Caddy serves LLM.EXAMPLE.ORG as llm.example.org (hosts match case-insensitively) but maps access lines to the
    site's logger case-sensitively: with the documented config neither spelling's key reaches any log (the journal
    is Caddy's stderr here), and both requests are in the access log."""
    if shutil.which("caddy") is None:
        pytest.skip("caddy is not installed here")
    port, logPath = freePort(), tmp_path / "access.log"
    with BodySink() as sink:
        (tmp_path / "Caddyfile").write_text(caddySite(sink.port, port, logPath, host="llm.example.org"))
        home = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path)}
        caddy = subprocess.Popen(["caddy", "run", "--config", str(tmp_path / "Caddyfile"), "--adapter", "caddyfile"],
                                 cwd=tmp_path, env={**os.environ, **home}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        try:
            keys = {"llm.example.org": "key-lower-case-0123456789", "LLM.EXAMPLE.ORG": "key-upper-case-0123456789",
                    "Llm.Example.Org": "key-mixed-case-0123456789"}
            deadline = time.monotonic() + 20
            while not logPath.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            for host, key in keys.items():
                response = httpx.get(f"http://127.0.0.1:{port}/api/models", timeout=10, headers={
                    "Host": f"{host}:{port}", "X-API-Key": key, "Authorization": f"Bearer {key}"})
                assert response.status_code == 200, host
        finally:
            caddy.terminate()
            stdout, stderr = caddy.communicate(timeout=10)
    logged = logPath.read_text() + stdout.decode() + stderr.decode()
    assert not [key for key in keys.values() if key in logged]
    assert all(f'"host":"{host}:{port}"' in logPath.read_text() for host in keys)


@pytest.mark.e2e
def test_nginxLogsNoKeyForAnyHostSpelling(tmp_path: Path):
    """docu/nginx.conf with Ubuntu's default logging (access_log in the combined format, here error_log at info):
    nginx logs no request header but Referer and User-Agent, so no spelling of the host name, nor a foreign one,
    puts X-API-Key or Authorization in a log; a misspelt key header (X_API_Key, dropped by nginx) is logged with its
    value at info, so the site keeps its error log at warn."""
    if shutil.which("nginx") is None:
        pytest.skip("nginx is not installed here")
    with BodySink() as sink:
        process, proxy = startNginx(sink.port, tmp_path)
        logs = (tmp_path / "nginx.conf").read_text().replace(
            " access_log off;", f" access_log {tmp_path / 'access.log'};").replace(
            f"error_log {tmp_path / 'error.log'};", f"error_log {tmp_path / 'main-error.log'} info;")
        stopProcess(process)
        (tmp_path / "nginx.conf").write_text(logs)
        process = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            waitForHttp(proxy + "/health/liveliness", process=process)
            keys = {host: f"key-{index}-for-{host.lower()}" for index, host in enumerate(
                ("llm.example.org", "LLM.EXAMPLE.ORG", "Llm.Example.Org", "evil.example"))}
            for host, key in keys.items():
                response = httpx.get(proxy + "/api/models", timeout=10, headers={
                    "Host": host, "X-API-Key": key, "Authorization": f"Bearer {key}", "X_API_Key": key})
                assert response.status_code == 200, host
        finally:
            stopProcess(process)
    access = (tmp_path / "access.log").read_text()
    logged = access + "".join(path.read_text() for path in tmp_path.glob("*error.log"))
    assert access.count("/api/models") == len(keys)
    assert not [key for key in keys.values() if key in logged]


def startCaddy(servicePort: int, directory: Path) -> tuple[subprocess.Popen, str]:
    port = freePort()
    (directory / "Caddyfile").write_text(caddySite(servicePort, port, directory / "access.log"))
    caddy = subprocess.Popen(["caddy", "run", "--config", str(directory / "Caddyfile"), "--adapter", "caddyfile"],
                             cwd=directory, env={**os.environ, "HOME": str(directory), "XDG_DATA_HOME": str(directory)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return caddy, f"http://127.0.0.1:{port}"


def startNginx(servicePort: int, directory: Path) -> tuple[subprocess.Popen, str]:
    port = freePort()
    (directory / "site.conf").write_text(nginxSite(servicePort, port).replace("/var/log/nginx/", f"{directory}/"))
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                         "scgi"))
    user = "user root;\n" if os.geteuid() == 0 else ""
    (directory / "nginx.conf").write_text(
        f"{user}daemon off;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'};\nevents {{}}\n"
        f"http {{\n access_log off;\n {temp}\n include {directory / 'site.conf'};\n}}\n")
    nginx = subprocess.Popen(["nginx", "-p", str(directory), "-c", str(directory / "nginx.conf")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return nginx, f"http://127.0.0.1:{port}"


PROXIES = {"caddy": startCaddy, "nginx": startNginx}


def firstChunkAndEnd(proxy: str) -> tuple[float, float, int]:
    """Seconds until the first content chunk and until the end of one streamed chat, and the content chunks seen."""
    chat = {"model": "poweron-text-general", "stream": True, "messages": [{"role": "user", "content": "Hallo"}]}
    started, first, chunks = time.monotonic(), 0.0, 0
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", proxy + "/v1/chat/completions", json=chat,
            headers={"Authorization": f"Bearer {OPENAI_KEY}"}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                chunks += 1
                first = first or time.monotonic() - started
    return first, time.monotonic() - started, chunks


OVERSIZED_PIECE = b"x" * (1024 * 1024)
OVERSIZED_HEAD = b'--b\r\nContent-Disposition: form-data; name="file"; filename="scan.pdf"\r\n\r\n'


def postOversized(proxy: str, chunked: bool) -> httpx.Response:
    """One byte over [limits] max_body_bytes: chunked (no length, as a streaming upload) or with Content-Length."""
    total = LimitsSettings().max_body_bytes + 1 - len(OVERSIZED_HEAD)
    pieces = [OVERSIZED_HEAD] + [OVERSIZED_PIECE] * (total // len(OVERSIZED_PIECE))
    pieces.append(b"x" * (total % len(OVERSIZED_PIECE)))
    content = iter(pieces) if chunked else b"".join(pieces)
    return httpx.post(proxy + "/api/analyze", content=content, timeout=60,
                      headers={"X-API-Key": API_KEY, "Content-Type": "multipart/form-data; boundary=b"})


@pytest.mark.e2e
@pytest.mark.parametrize("proxyName", sorted(PROXIES))
def test_documentedProxyStreamsUnbufferedAndRefusesOversizedUploads(proxyName: str, pacedService: ServiceProcess,
                                                                    tmp_path: Path):
    """The documented proxy config in front of the service (adapted as caddySite/nginxSite say): with a paced stub
    the first chunk arrives well before the stream ends, and an upload over max_body_bytes is refused by the proxy
    (no X-Request-ID: the service never answered)."""
    if shutil.which(proxyName) is None:
        pytest.skip(f"{proxyName} is not installed here")
    process, proxy = PROXIES[proxyName](pacedService.port, tmp_path)
    try:
        waitForHttp(proxy + "/health/liveliness", process=process)
        first, total, chunks = firstChunkAndEnd(proxy)
        assert chunks == PACED_CHUNKS
        assert total >= STREAM_SECONDS * 0.9
        assert first <= total - FIRST_CHUNK_MARGIN_SECONDS, f"first chunk at {first:.2f} s of {total:.2f} s"
        assert postOversized(proxy, chunked=False).status_code == 413  # the service behind refuses it, too
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.e2e
@pytest.mark.parametrize("proxyName", sorted(PROXIES))
def test_documentedProxyRefusesOversizedUploadsOnItsOwn(proxyName: str, tmp_path: Path):
    """In front of a sink that accepts any size (so the service's own limit cannot answer first), the documented
    proxy cuts an upload at max_body_bytes: a chunked one gets 413, one with a Content-Length over the limit 413
    (nginx, before forwarding) or 502 (Caddy, which cuts the forwarded body at the limit)."""
    if shutil.which(proxyName) is None:
        pytest.skip(f"{proxyName} is not installed here")
    with BodySink() as sink:
        process, proxy = PROXIES[proxyName](sink.port, tmp_path)
        try:
            waitForHttp(proxy + "/health/liveliness", process=process)
            assert postOversized(proxy, chunked=True).status_code == 413
            assert postOversized(proxy, chunked=False).status_code in (413, 502)
        finally:
            process.terminate()
            process.wait(10)
        assert max(sink.received, default=0) <= LimitsSettings().max_body_bytes


class BodySink:
    """An HTTP/1.1 server on 127.0.0.1 that reads any body (chunked or not) and answers 200; notes the sizes."""

    def __init__(self) -> None:
        sink = self
        self.received: list[int] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self.answer()

            def do_POST(self) -> None:
                sink.received.append(readBody(self.rfile, self.headers))
                self.answer()

            def answer(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> BodySink:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def readBody(stream: Any, headers: Any) -> int:
    """Bytes of a request body until its end or until the connection is cut."""
    if headers.get("Transfer-Encoding", "").lower() != "chunked":
        return len(stream.read(int(headers.get("Content-Length", 0))))
    size, received = 1, 0
    while size:
        sizeLine = stream.readline()
        size = int(sizeLine.split(b";")[0] or b"0", 16)
        received += len(stream.read(size + 2 if size else 0)) - (2 if size else 0)
    return received
