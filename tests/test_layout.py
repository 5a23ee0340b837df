"""The layout shows the architecture: only the design card's modules at the top, one package per concept, and
imports that point one way (routes -> domain packages -> observe -> guard/upstream -> core -> config -> settings).

Read from the source with ``ast``, so a later change cannot quietly add a back-edge, a flat module or a room
too big to read whole."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL_MODULES = {"app.py", "config.py", "routeApi.py", "routeOpenAi.py", "routeWeb.py", "routeHealth.py",
                     "runAll.py"}
RANKS = {
    "settings": 0, "config": 1, "core": 2, "state": 2, "guard": 3, "upstream": 3, "observe": 4,
    "documents": 5, "openaiCompat": 5, "speech": 5, "whisperServer": 5,
    "apidoc": 6, "routeApi": 7, "routeOpenAi": 7, "routeWeb": 7, "routeHealth": 7, "app": 8, "runAll": 8,
}
"""Lower ranks never import higher ones; packages of one rank never import each other."""
WHISPER_PROGRAM_MAY_IMPORT = {"whisperServer", "core", "config", "settings"}
"""The whisper service is a program of its own: it shares only the ground both programs stand on."""
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def trackedPythonFiles() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.split() if (REPO_ROOT / name).exists()]


def serviceModules() -> list[Path]:
    """Every module of the two programs (tests and benchmarks aside)."""
    return [REPO_ROOT / name for name in trackedPythonFiles() if not name.startswith(("tests/", "bench/"))]


def unitOf(path: Path) -> str:
    """The top-level unit a module belongs to: its package, or its own name at the top level."""
    relative = path.relative_to(REPO_ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def importedUnits(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            units.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            units.add(node.module.split(".")[0])
    return units & RANKS.keys()


def test_onlyTheDesignCardsModulesSitAtTheTop():
    topLevel = {name for name in trackedPythonFiles() if "/" not in name}
    assert topLevel == TOP_LEVEL_MODULES


def test_everyPackageIsAKnownConceptWithAOneLineDocstring():
    packages = {unitOf(path) for path in serviceModules() if len(path.relative_to(REPO_ROOT).parts) > 1}
    assert packages <= RANKS.keys(), f"packages without a rank in this test: {packages - RANKS.keys()}"
    for package in packages:
        initFile = REPO_ROOT / package / "__init__.py"
        tree = ast.parse(initFile.read_text(encoding="utf-8"))
        docstring = ast.get_docstring(tree)
        assert docstring and "\n" not in docstring, f"{package}/__init__.py: one-line docstring expected"
        assert len(tree.body) == 1, f"{package}/__init__.py holds more than its docstring"


@pytest.mark.parametrize("path", serviceModules(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_importsPointOneWay(path: Path):
    unit = unitOf(path)
    for imported in importedUnits(path) - {unit}:
        assert RANKS[imported] < RANKS[unit], f"{unit} (rank {RANKS[unit]}) imports {imported} ({RANKS[imported]})"
    if unit == "whisperServer":
        assert importedUnits(path) <= WHISPER_PROGRAM_MAY_IMPORT


def test_theRankCheckCatchesABackEdge(tmp_path):
    """The check above can fail: a guard module importing a route is reported."""
    module = REPO_ROOT / "guard" / "security.py"
    assert "guard" == unitOf(module)
    backEdge = tmp_path / "backEdge.py"
    backEdge.write_text("import routeApi\nfrom upstream.ollamaClient import OllamaClient\n", encoding="utf-8")
    units = importedUnits(backEdge)
    assert units == {"routeApi", "upstream"}
    assert any(RANKS[imported] >= RANKS["guard"] for imported in units)


@pytest.mark.parametrize("path", serviceModules(), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_everyModuleAndFunctionCanBeReadWhole(path: Path):
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{node.name} has {length} lines"
