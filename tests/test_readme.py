"""Every Python block of the README and of docs/*.md runs alone, as written, in a fresh
interpreter: a newcomer can copy any one of them.

A block preceded by ``<!-- skip: reason -->`` (it needs a GPU) is skipped with that
reason unless CUDA is available. Blocks run without the ``CI`` variable, so the README's
property test runs under hypothesis's default profile, as on a user's machine.
"""

import os
import pathlib
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- skip: (?P<skip>[^>]*) -->\s*)?```python\n(?P<code>.*?)```", re.S)


def blocks():
    """``(doc name, index, skip reason or None, code)`` for every python block."""
    for doc in DOCS:
        for n, m in enumerate(BLOCK.finditer(doc.read_text())):
            skip = m.group("skip")
            if skip and "CUDA" in skip and torch.cuda.is_available():
                skip = None
            yield doc.name, n, skip, m.group("code")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HYPOTHESIS_PROFILE")}
    with tempfile.TemporaryDirectory() as cwd:  # blocks may write files (a checkpoint)
        return subprocess.run(
            [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )


@pytest.fixture(scope="module")
def runs():
    todo = [(doc, n, code) for doc, n, skip, code in blocks() if not skip]
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda item: _run(item[2]), todo)
        return {(doc, n): (code, result) for (doc, n, code), result in zip(todo, done)}


@pytest.mark.parametrize("doc, n, skip", [(d, n, s) for d, n, s, _ in blocks()], ids=lambda v: str(v))
def test_each_block_runs_alone_in_a_fresh_interpreter(runs, doc, n, skip):
    if skip:
        pytest.skip(skip)
    code, result = runs[doc, n]
    assert result.returncode == 0, f"{doc} python block {n} failed alone:\n{code}\n{result.stderr[-3000:]}"


def test_the_readme_leads_with_short_runnable_examples():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    codes = [code for doc, _, skip, code in blocks() if doc == "README.md" and not skip]
    assert len(codes) >= 3 and "pip install" in text
    assert any("@given" in code and "test_stack()" in code for code in codes)  # the property test
