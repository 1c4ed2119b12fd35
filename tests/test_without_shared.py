"""Without ../shared beside the repository, classic comparisons skip and the rest runs."""

import os
import pathlib
import shutil
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_suite_runs_without_the_classic_reference(tmp_path):
    clone = tmp_path / "repo"  # no ../shared beside it
    shutil.copytree(REPO / "tests", clone / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", clone / "pyproject.toml")
    env = {**os.environ, "HYPOTHESIS_PROFILE": "dev"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_routing.py",
            "tests/test_nn.py",
            "tests/test_numerics.py",
            "-k",
            "not ddp",
        ],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "needs the classic reversible.py at" in out.stdout
    summary = out.stdout.strip().splitlines()[-1]
    assert " passed" in summary and " skipped" in summary and "error" not in summary, summary
