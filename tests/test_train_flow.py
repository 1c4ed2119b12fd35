"""examples/train_flow.py in a short run: the loss goes down, the two methods give the same
losses, metrics.json and both PNGs are written, and the samples come from the inverse."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("sklearn", reason="scikit-learn is not installed (the digits)")
pytest.importorskip("matplotlib")


def _script():
    spec = importlib.util.spec_from_file_location("train_flow", ROOT / "examples" / "train_flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_short_run_learns_and_writes_its_outputs(tmp_path):
    script = _script()
    args = ["--steps", "30", "--depth", "2", "--hidden", "32", "--batch", "64", "--lr", "3e-3"]
    rev = script.main([*args, "--out", str(tmp_path / "rev")])
    plain = script.main([*args, "--method", "plain", "--out", str(tmp_path / "plain")])
    written = json.loads((tmp_path / "rev" / "metrics.json").read_text())
    assert written["loss"] == rev["loss"] and len(written["loss"]) == 30
    assert sum(written["loss"][-5:]) / 5 < sum(written["loss"][:5]) / 5 - 0.3  # the NLL goes down
    assert 0 < written["test_bits_per_dim"] < written["loss"][0]
    # the memory-saving backward trains the same model as plain autograd (float32)
    assert plain["loss"] == pytest.approx(rev["loss"], rel=1e-3)
    for name in ("loss.png", "samples.png"):
        data = (tmp_path / "rev" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
