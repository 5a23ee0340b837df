"""bench/whisperBaseModel.py: the multilingual base model directory is assembled from the two packages' parts once,
checked (size and SHA-256 when built; size and the verification stamp when reused) and rebuilt when damaged."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from bench import whisperBaseModel
from bench.whisperBaseModel import ModelAssemblyError, assemble, isComplete

PART1, PART2 = b"first half of the weights|", b"|second half"


@pytest.fixture
def fakeParts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two small package data directories and the pins that match their concatenation."""
    part1Dir, part2Dir = tmp_path / "part1", tmp_path / "part2"
    part1Dir.mkdir(), part2Dir.mkdir()
    (part1Dir / "model.bin.part1").write_bytes(PART1)
    (part2Dir / "model.bin.part2").write_bytes(PART2)
    for name in whisperBaseModel.SMALL_FILES:
        (part1Dir / name).write_text(f"{name} content", encoding="utf-8")
    monkeypatch.setattr(whisperBaseModel, "packageParts", lambda: (part1Dir, part2Dir))
    monkeypatch.setattr(whisperBaseModel, "MODEL_BIN_BYTES", len(PART1 + PART2))
    monkeypatch.setattr(whisperBaseModel, "MODEL_BIN_SHA256", hashlib.sha256(PART1 + PART2).hexdigest())
    return tmp_path / "cache" / "whisper-base"


def test_assemblesOnceConcatenatedInOrderWithTheSmallFiles(fakeParts: Path) -> None:
    assert not isComplete(fakeParts)
    assemble(fakeParts)
    assert (fakeParts / "model.bin").read_bytes() == PART1 + PART2
    assert (fakeParts / "tokenizer.json").read_text(encoding="utf-8") == "tokenizer.json content"
    assert isComplete(fakeParts)
    assert [p.name for p in fakeParts.parent.iterdir()] == ["whisper-base"], "no temporary directory is left"


def test_aTruncatedOrUnstampedModelIsNotComplete(fakeParts: Path) -> None:
    assemble(fakeParts)
    (fakeParts / "model.bin").write_bytes(PART1)
    assert not isComplete(fakeParts)
    assemble(fakeParts)
    assert isComplete(fakeParts)
    (fakeParts / whisperBaseModel.STAMP_NAME).unlink()
    assert not isComplete(fakeParts)


def test_partsThatDoNotMakeThePinnedHashAreRefused(fakeParts: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whisperBaseModel, "MODEL_BIN_SHA256", "0" * 64)
    with pytest.raises(ModelAssemblyError, match="expected 38 bytes, 0000"):
        assemble(fakeParts)
    assert not fakeParts.exists() and list(fakeParts.parent.iterdir()) == []


def test_theCacheFallsBackToTheTemporaryDirectoryWhenHomeIsUnusable(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(whisperBaseModel.CACHE_ENV, raising=False)
    notADirectory = tmp_path / "home-cache"
    notADirectory.write_text("a file where the cache directory would go", encoding="utf-8")
    monkeypatch.setenv("XDG_CACHE_HOME", str(notADirectory))
    monkeypatch.setattr(whisperBaseModel.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert whisperBaseModel.cacheRoot() == tmp_path / "tmp" / f"poweron-{os.getuid()}"
    monkeypatch.setenv(whisperBaseModel.CACHE_ENV, str(tmp_path / "chosen"))
    assert whisperBaseModel.cacheRoot() == tmp_path / "chosen"


def test_theInstalledPackagesMakeTheRealModel() -> None:
    """The real packages (requirements-dev.txt) give the pinned model.bin and a directory faster-whisper reads."""
    modelDir = whisperBaseModel.whisperBaseDir()
    assert isComplete(modelDir)
    assert (modelDir / "model.bin").stat().st_size == 145_217_532
