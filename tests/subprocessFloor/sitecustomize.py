"""Put before tests/subprocessGuard on PYTHONPATH by the guard's own tests (tests/test_sovereignty.py): installs the
connect floor (tests/connectFloor.py) on the socket module and uvloop first, then runs the next sitecustomize on the
path, the guard's, which wraps it. Attempts that reach the floor are printed to stderr with its marker."""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("poweronConnectFloor", _HERE.parent / "connectFloor.py")
_module = importlib.util.module_from_spec(_spec)
sys.modules["poweronConnectFloor"] = _module
_spec.loader.exec_module(_module)
FLOOR = _module.ConnectFloor(reportToStderr=True).installOnModules()

_rest = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
_next = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
print(f"CONNECT-FLOOR: installed, then {_next.origin if _next else 'nothing'}", file=sys.stderr, flush=True)
if _next is not None:
    _nextModule = importlib.util.module_from_spec(_next)
    _next.loader.exec_module(_nextModule)
