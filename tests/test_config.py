"""Settings: INI + environment, clear start-up errors, MODEL_MAPPING overrides, placeholder refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import (
    EXAMPLE_CONFIG_PATH,
    MODEL_MAPPING,
    ConfigError,
    loadSettings,
    parseNamedKeys,
    resolveModel,
    writeInitialConfig,
)


def test_environment_overrides_config_ini(makeSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    assert makeSettings().ollama.base_url == "http://127.0.0.1:9"
    monkeypatch.setenv("PRIVATE_LLM_OLLAMA__BASE_URL", "http://127.0.0.1:11500")
    monkeypatch.setenv("PRIVATE_LLM_SERVER__PORT", "8123")
    settings = makeSettings()
    assert settings.ollama.base_url == "http://127.0.0.1:11500"
    assert settings.server.port == 8123


def test_ini_values_are_read(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[documents]\nmax_pdf_pages = 9\n")
    assert loadSettings().documents.max_pdf_pages == 9


def test_missing_config_file_names_the_file(testIni: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = testIni.with_name("absent.ini")
    monkeypatch.setenv("PRIVATE_LLM_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="absent.ini: configuration file not found"):
        loadSettings()


def test_malformed_config_file_names_the_file(testIni: Path) -> None:
    testIni.write_text("this is not = an ini file\n[auth\n")
    with pytest.raises(ConfigError, match=r"config.ini, line 1: malformed"):
        loadSettings()


def test_bad_value_names_file_section_and_key(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[server]\nport = eighty\n")
    with pytest.raises(ConfigError) as info:
        loadSettings()
    assert "config.ini: [server] port" in str(info.value)
    assert "PRIVATE_LLM_SERVER__PORT" in str(info.value)


def test_unknown_key_is_refused(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[documents]\nmax_pdf_pgs = 3\n")
    with pytest.raises(ConfigError, match=r"\[documents\] max_pdf_pgs"):
        loadSettings()


def test_example_placeholders_refuse_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVATE_LLM_CONFIG", str(EXAMPLE_CONFIG_PATH))
    with pytest.raises(ConfigError, match=r"\[auth\] api_keys: key 'gateway' is still the placeholder"):
        loadSettings()


def test_init_writes_a_startable_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.ini"
    writeInitialConfig(target)
    monkeypatch.setenv("PRIVATE_LLM_CONFIG", str(target))
    settings = loadSettings()
    assert set(settings.apiKeys) == {"gateway", "backup"}
    assert all(len(key) >= 32 and "CHANGE" not in key for key in settings.openAiKeys.values())
    assert target.stat().st_mode & 0o077 == 0


def test_named_keys_parse_and_reject_bad_entries() -> None:
    assert parseNamedKeys("cursor=abc, kiva = def ,", "x") == {"cursor": "abc", "kiva": "def"}
    with pytest.raises(ConfigError, match="entry number 2 must look like name=<key>") as info:
        parseNamedKeys("cursor=abc, sk-secret-value-123", "[auth] openai_keys")
    assert "sk-secret" not in str(info.value)
    with pytest.raises(ConfigError, match="entry 'kiva' must look like name=<key>"):
        parseNamedKeys("kiva=", "[auth] openai_keys")
    with pytest.raises(ConfigError, match="entry number 1 must") as info:
        parseNamedKeys("=sk-secret-value-123", "[auth] openai_keys")
    assert "sk-secret" not in str(info.value)
    with pytest.raises(ConfigError, match="appears twice"):
        parseNamedKeys("a=1,a=2", "[auth] openai_keys")


def test_model_mapping_has_every_generation() -> None:
    expected = {"poweron-text-general": "qwen2.5:7b", "poweron-vision-general": "qwen2.5vl:7b",
                "poweron-vision-deep": "granite3.2-vision", "poweron-text-reasoning": "deepseek-r1:70b",
                "poweron-vision-multimodal": "llama4:scout", "poweron-embed": "nomic-embed-text"}
    assert {name: MODEL_MAPPING[name].ollamaName for name in expected} == expected
    assert MODEL_MAPPING["poweron-transcribe"].backend == "whisper"
    assert {spec.type for spec in MODEL_MAPPING.values()} == {"text", "vision", "reasoning", "embedding", "stt"}
    assert all(spec.purpose and spec.vramGb > 0 for spec in MODEL_MAPPING.values())


def test_models_section_overrides_and_adds_without_code_change(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[models]\npoweron-text-general = qwen2.5:14b\n"
                       "poweron-text-small = ollama=llama3.2:3b; type=text; purpose=Quick answers; vram_gb=3\n")
    settings = loadSettings()
    general = resolveModel(settings, "poweron-text-general")
    small = resolveModel(settings, "poweron-text-small")
    assert general is not None and general.ollamaName == "qwen2.5:14b" and general.type == "text"
    assert small is not None and (small.ollamaName, small.type, small.vramGb) == ("llama3.2:3b", "text", 3.0)
    assert resolveModel(settings, "poweron-unknown") is None


def test_models_section_rejects_new_entry_without_type(testIni: Path) -> None:
    testIni.write_text(testIni.read_text() + "\n[models]\npoweron-new = llama3.2:3b\n")
    with pytest.raises(ConfigError, match="poweron-new"):
        loadSettings()


@pytest.mark.parametrize(("configured", "sent"), [("30m", "30m"), ("-1", "-1s"), ("600", "600s"), ("0", "0s")])
def test_keep_alive_always_has_a_unit_for_ollama(makeSettings, configured: str, sent: str) -> None:
    assert makeSettings(ollama={"keep_alive": configured}).ollama.keep_alive == sent


@pytest.mark.parametrize(("url", "local"), [
    ("http://127.0.0.1:11434", True), ("http://localhost:11434", True), ("http://10.1.2.3", True),
    ("http://[::1]:9000", True), ("http://ollama.localhost:11434", False), ("http://203.0.113.7", False),
    ("http://ollama.example.com", False), ("http://172.32.0.1", False),
])
def test_only_loopback_and_private_addresses_count_as_local(url: str, local: bool) -> None:
    from config import isLocalUrl
    assert isLocalUrl(url) is local


def _sectionsOfSettings() -> dict[str, type]:
    from config import Settings
    return {name: field.annotation for name, field in Settings.model_fields.items() if name != "models"}


def test_every_setting_has_a_docstring_an_example_entry_and_a_readme_row() -> None:
    import configparser

    example = configparser.ConfigParser(interpolation=None)
    example.read(EXAMPLE_CONFIG_PATH, encoding="utf-8")
    readme = (EXAMPLE_CONFIG_PATH.parent / "README.md").read_text(encoding="utf-8")
    for section, model in _sectionsOfSettings().items():
        readmeRow = next((line for line in readme.splitlines() if line.startswith(f"| `[{section}]`")), "")
        assert readmeRow, f"README has no row for [{section}]"
        for key, field in model.model_fields.items():
            assert field.description, f"[{section}] {key} has no docstring"
            assert example.has_option(section, key), f"config.ini.example lacks [{section}] {key}"
            assert f"`{key}`" in readmeRow, f"README's [{section}] row lacks {key}"
