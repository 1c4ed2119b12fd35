"""The classic reversible.py from ../shared/reference (the code revfunc replaces).

Tests that compare against it use ``CLASSIC``; when the file is absent (a clone without
``../shared`` beside it) each of those tests is skipped, naming the missing file, and
every other test still runs.
"""

import importlib.util
import pathlib

import pytest

PATH = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "reversible.py"
_loaded = []


def available() -> bool:
    return PATH.exists()


def load():
    if not PATH.exists():
        pytest.skip(f"needs the classic reversible.py at {PATH} (../shared/reference beside the repository)")
    if not _loaded:
        spec = importlib.util.spec_from_file_location("classic_reversible", PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _loaded.append(module)
    return _loaded[0]


class _Classic:
    """The classic module, loaded (or the test skipped) on first attribute access."""

    def __getattr__(self, name):
        if name.startswith("_") or name == "pytestmark":  # pytest's collection probes: not a test's use
            raise AttributeError(name)
        return getattr(load(), name)


CLASSIC = _Classic()
