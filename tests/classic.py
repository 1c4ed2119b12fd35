"""Import the classic reversible.py from ../shared/reference (the code revfunc replaces)."""

import importlib.util
import pathlib

_PATH = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "reversible.py"


def load():
    spec = importlib.util.spec_from_file_location("classic_reversible", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
