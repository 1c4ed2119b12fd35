"""Activation memory stays flat in depth on every gradient path (measured, not assumed).

Each figure is the peak RSS of one gradient step in a fresh process, minus the level
before it and the returned gradients (``tests/memprobe.py``). Every path is measured
for revfunc and for the same math in plain autograd, which must grow in the same
measurement: that is what makes the flatness check able to fail.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

PROBE = pathlib.Path(__file__).with_name("memprobe.py")
EAGER_PATHS = ("backward", "autograd_grad", "func_grad", "func_grad_live", "grad_and_value", "vjp", "vmap_grad")
COMPILED_PATHS = ("compile_step", "compile_model_backward")
DEPTHS = {**{p: (4, 16) for p in EAGER_PATHS}, **{p: (2, 8) for p in COMPILED_PATHS}}
CASES = [(p, m, d) for p in EAGER_PATHS + COMPILED_PATHS for m in ("revfunc", "plain") for d in DEPTHS[p]]


def _probe(case):
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(PROBE), *map(str, case)], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise RuntimeError(f"memprobe {case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["activation_bytes"]


@pytest.fixture(scope="module")
def measured():
    # Compiled cases first: they take longest, and two run at a time on 2 cores.
    order = sorted(CASES, key=lambda c: c[0] not in COMPILED_PATHS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(order, pool.map(_probe, order)))


@pytest.mark.parametrize("path", EAGER_PATHS + COMPILED_PATHS)
def test_activation_memory_is_flat_in_depth(measured, path):
    shallow, deep = DEPTHS[path]
    mib = {k: round(v / 2 ** 20, 1) for k, v in measured.items() if k[0] == path}
    rev_s, rev_d = measured[path, "revfunc", shallow], measured[path, "revfunc", deep]
    plain_s, plain_d = measured[path, "plain", shallow], measured[path, "plain", deep]
    # The measurement sees depth: plain autograd stores every block's activations.
    assert plain_d > 2 * plain_s, f"plain autograd did not grow with depth: {mib}"
    assert rev_d <= 1.2 * max(rev_s, 2 ** 20), f"revfunc grew with depth on {path}: {mib}"
    assert rev_d <= 0.25 * plain_d, f"revfunc stores more than a quarter of plain autograd on {path}: {mib}"


def render(results, torch_version: str, date: str, command: str) -> str:
    """The measured table as markdown, with its command, date and torch version."""
    lines = [f"Command: `{command}`; measured {date}, "
             f"torch {torch_version}. Activation MiB of one gradient step (peak RSS minus the level before "
             "and the returned gradients), depth shallow → deep.", "",
             "| path | depths | revfunc | plain autograd |", "| --- | --- | --- | --- |"]
    for path in EAGER_PATHS + COMPILED_PATHS:
        s, d = DEPTHS[path]

        def mib(method):
            return " → ".join(f"{results[path, method, k] / 2 ** 20:.1f}" for k in (s, d))

        lines.append(f"| {path} | {s} → {d} | {mib('revfunc')} | {mib('plain')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print (or with ``--out FILE`` write) the measured table (about 2 minutes on 2 cores)."""
    import argparse
    import time

    import torch

    parser = argparse.ArgumentParser(prog="python tests/test_memory.py")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args()
    command = " ".join(["python tests/test_memory.py", *sys.argv[1:]])
    text = render(measured.__wrapped__(), torch.__version__, time.strftime("%Y-%m-%d"), command)
    if args.out:
        pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
