"""CI plumbing: .ci/run fails a run without tests; make test's Debian step installs or names missing packages."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT


def fakeCommand(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + script + "\n", encoding="utf-8")
    path.chmod(0o755)


def runWithFakes(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_ciRunFailsWhenPytestCollectedNoTests(tmp_path: Path) -> None:
    fakeCommand(tmp_path, "make", 'echo "no tests ran in 0.01s"; exit 2')
    result = runWithFakes(tmp_path, ["bash", ".ci/run"])
    assert result.returncode == 1
    assert "pytest collected no tests" in result.stderr


def test_ciRunPassesMakeTestsStatusThrough(tmp_path: Path) -> None:
    fakeCommand(tmp_path, "make", 'echo "3 passed in 0.10s"; exit 0')
    assert runWithFakes(tmp_path, ["bash", ".ci/run"]).returncode == 0
    fakeCommand(tmp_path, "make", 'echo "1 failed, 2 passed in 0.10s"; exit 2')
    assert runWithFakes(tmp_path, ["bash", ".ci/run"]).returncode == 2


def test_debianStepNamesMissingPackagesWhenItCannotInstall(tmp_path: Path) -> None:
    fakeCommand(tmp_path, "dpkg", 'exit 1')  # nothing is installed
    fakeCommand(tmp_path, "id", 'echo 1000')  # not root
    result = runWithFakes(tmp_path, ["bash", ".ci/installDebianPackages", "chromium", "espeak-ng"])
    assert result.returncode == 1
    assert "sudo apt-get install chromium espeak-ng" in result.stderr


def test_debianStepDoesNothingWhenEverythingIsInstalled(tmp_path: Path) -> None:
    fakeCommand(tmp_path, "dpkg", 'exit 0')
    fakeCommand(tmp_path, "apt-get", 'echo "apt-get must not run" >&2; exit 9')
    result = runWithFakes(tmp_path, ["bash", ".ci/installDebianPackages", "chromium", "espeak-ng"])
    assert result.returncode == 0 and result.stderr == ""


def test_makeTestInstallsTheDebianPackagesFirst() -> None:
    dryRun = subprocess.run(["make", "-n", "test"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    lines = dryRun.stdout.splitlines()
    install = next(i for i, line in enumerate(lines) if ".ci/installDebianPackages" in line)
    pytest = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert install < pytest and "chromium" in lines[install] and "espeak-ng" in lines[install]
