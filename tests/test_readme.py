"""Every Python block of README.md runs as written, top to bottom, in one namespace.

A block preceded by ``<!-- skip: reason -->`` (it needs a GPU or a file the reader
brings) is skipped with that reason; every other block must run.
"""

import os
import pathlib
import re

import pytest
import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- skip: (?P<skip>[^>]*) -->\s*)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    return [(m.group("skip"), m.group("code")) for m in BLOCK.finditer(README.read_text())]


def test_readme_has_python_examples():
    assert len(blocks()) >= 6


def test_every_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files (a checkpoint)
    torch._dynamo.reset()
    namespace = {"__name__": "readme"}
    skipped = []
    for n, (skip, code) in enumerate(blocks()):
        if skip:
            if "CUDA" in skip and torch.cuda.is_available():
                skip = None
            else:
                skipped.append(f"block {n}: {skip}")
                continue
        try:
            exec(compile(code, f"README.md block {n}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"README.md python block {n} failed:\n{code}") from error
    assert all("CUDA" in s for s in skipped), skipped
    assert os.path.exists("checkpoint.pt")
