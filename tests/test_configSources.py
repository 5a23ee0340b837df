"""Start-up errors say where the bad setting came from (issue 17): config.ini (its path, and the line for a malformed
file) or the environment variable (e.g. set by systemd from secrets.env) that overrides it."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, loadSettings

PLACEHOLDER_KEYS = "gateway=CHANGE-ME-analysis-key"


def startError() -> str:
    with pytest.raises(ConfigError) as caught:
        loadSettings()
    return str(caught.value)


@pytest.mark.parametrize(("text", "line", "what"), [
    ("[auth]\napi_keys = a=b\n\nthis line is no setting\n", 4, "this line is no setting"),
    ("no section yet = 1\n[auth]\n", 1, "no section header"),
    ("[auth]\n[server]\nport = 1\n[server]\n", 4, "section 'server' already exists"),
    ("[server]\nport = 1\nhost = 127.0.0.1\nport = 2\n", 4, "option 'port' in section 'server' already exists"),
])
def test_malformedIniNamesTheFileAndTheLine(testIni: Path, text: str, line: int, what: str) -> None:
    testIni.write_text(text)
    message = startError()
    assert message.startswith(f"{testIni}, line {line}: "), message
    assert what in message


def test_undecodableIniNamesTheLine(testIni: Path) -> None:
    testIni.write_bytes(b"[server]\nhost = 127.0.0.1\n# caf\xe9\n")
    assert startError().startswith(f"{testIni}, line 3: ")


def test_badValueFromTheFileNamesTheFile(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[server]\nport = eighty\n")
    message = startError()
    assert message.startswith(f"{testIni}: [server] port: "), message


def test_badValueFromTheEnvironmentNamesTheVariableNotTheFile(testIni: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVATE_LLM_SERVER__PORT", "eighty")
    message = startError()
    assert message.startswith("environment variable PRIVATE_LLM_SERVER__PORT"), message
    assert "[server] port" in message and str(testIni) not in message


def test_placeholderKeyNamesWhereItCameFrom(testIni: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    testIni.write_text(testIni.read_text().replace("api_keys = gateway=", f"api_keys = {PLACEHOLDER_KEYS}\n# was "))
    fromFile = startError()
    assert fromFile.startswith(f"{testIni}: [auth] api_keys: key 'gateway' is still the placeholder"), fromFile
    monkeypatch.setenv("PRIVATE_LLM_AUTH__API_KEYS", PLACEHOLDER_KEYS)
    fromEnvironment = startError()
    assert fromEnvironment.startswith("environment variable PRIVATE_LLM_AUTH__API_KEYS"), fromEnvironment
    assert "secrets.env" in fromEnvironment and str(testIni) not in fromEnvironment


def test_errorsFromSectionParsersNameTheFile(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[ratelimit]\nper_key = nobody=1/1/1\n")
    assert startError().startswith(f"{testIni}: [ratelimit] per_key: ")
    testIni.write_text(testIni.read_text().replace("per_key = nobody=1/1/1", "") + "\n[models]\npoweron-new = x:1b\n")
    assert startError().startswith(f"{testIni}: [models] poweron-new: ")
