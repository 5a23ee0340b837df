"""Installed into processes the tests start (service, stubs) via PYTHONPATH: the same loopback-only network guard
as in the test process; refusals are printed to stderr with a marker the fixtures look for."""

import importlib.util
import sys
from pathlib import Path

_GUARD_PATH = Path(__file__).resolve().parent.parent / "networkGuard.py"
_spec = importlib.util.spec_from_file_location("poweronNetworkGuard", _GUARD_PATH)
_module = importlib.util.module_from_spec(_spec)
sys.modules["poweronNetworkGuard"] = _module
_spec.loader.exec_module(_module)
_module.NetworkGuard(reportToStderr=True).install()
