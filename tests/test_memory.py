"""Activation memory stays flat in depth on every gradient path (measured, not assumed).

Each figure is the activation peak of one gradient step in a fresh process, measured
with the benchmark's own code (``tests/memprobe.py``, ``revfunc.bench.measure``). Every
path is measured for revfunc and for the same math in plain autograd, which must grow in
the same measurement: that is what makes the flatness check able to fail. The
``torch.func`` paths are measured with detached and with live parameters (``*_live``).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

PROBE = pathlib.Path(__file__).with_name("memprobe.py")
FUNC_PATHS = ("func_grad", "grad_and_value", "vjp", "vmap_grad")
AFFINE_PATHS = ("backward_affine", "func_grad_affine")  # affine couplings, the log-det in the loss
FLOW_PATHS = ("backward_flow", "func_grad_flow")  # with a permutation layer after each block
EAGER_PATHS = (
    "backward",
    "backward_save_on_cpu",
    "backward_checkpointed",
    "autograd_grad",
    *FUNC_PATHS,
    *(p + "_live" for p in FUNC_PATHS),
    *AFFINE_PATHS,
    *FLOW_PATHS,
)
COMPILED_PATHS = ("compile_step", "compile_model_backward")
# Depths per path and method: plain autograd at two depths shows that the measurement
# sees depth; revfunc, whose steps are cheap at any depth, over a longer range, so that a
# stream tensor per block would stand well above the RSS noise.
DEPTHS = {
    **{(p, "plain"): (4, 16) for p in EAGER_PATHS},
    **{(p, "revfunc"): (4, 32) for p in EAGER_PATHS},
    **{(p, m): (2, 8) for p in COMPILED_PATHS for m in ("revfunc", "plain")},
}
CASES = [(p, m, d) for p in EAGER_PATHS + COMPILED_PATHS for m in ("revfunc", "plain") for d in DEPTHS[p, m]]
#: One stream tensor of the memprobe cases (batch 4 x 256 tokens x d=64, float32).
STREAM = 4 * 256 * 64 * 4
#: Flat: revfunc grows by at most a quarter of a stream tensor per block (a path that
#: kept one stream tensor per block would grow four times that: 7 MiB over 4 → 32), plus
#: the RSS noise of fresh-process measurements: 2 MiB (measured on vmap_grad, whose
#: per-sample gradients are the largest returned values: 6.0, 7.3 and 7.5 MiB at depth
#: 4, 16 and 32, a one-off step, flat after it).
STREAMS_PER_BLOCK = 0.25
RSS_NOISE = 2 * 2**20
# Training setups on the wide, short case (d=128, 1 x 512 tokens; one block's gradients
# are about 3 stream tensors): gradients pre-allocated (accumulation), and an optimizer
# step in a post-accumulate-grad hook that frees each gradient (optimizer in backward).
TRAINING_PATHS = ("accumulate", "optimizer_in_backward")
TRAINING_DEPTHS = (8, 32)
STREAM_BYTES = 1 * 512 * 128 * 4
CASES += [(p, m, d) for p in TRAINING_PATHS for m in ("revfunc", "checkpoint") for d in TRAINING_DEPTHS]


@pytest.fixture(scope="module")
def measured():
    """``{(path, method, depth): activation bytes}``, each case in a fresh process: forked,
    two at a time, from one interpreter that has imported torch and run nothing."""
    from revfunc.bench.measure import WORKER_ENV

    # Compiled cases first: they take longest.
    order = sorted(CASES, key=lambda c: c[0] not in COMPILED_PATHS)
    env = {**os.environ, **WORKER_ENV, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(PROBE), "--all", *(":".join(map(str, c)) for c in order)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if out.returncode:
        raise RuntimeError(f"memprobe failed:\n{out.stderr[-3000:]}")
    records = [json.loads(line) for line in out.stdout.strip().splitlines()]
    return {(r["path"], r["method"], r["depth"]): r["activation_bytes"] for r in records}


@pytest.mark.parametrize("path", EAGER_PATHS + COMPILED_PATHS)
def test_activation_memory_is_flat_in_depth(measured, path):
    (rs, rd), (ps, pd) = DEPTHS[path, "revfunc"], DEPTHS[path, "plain"]
    mib = {k: round(v / 2**20, 1) for k, v in measured.items() if k[0] == path}
    rev_s, rev_d = measured[path, "revfunc", rs], measured[path, "revfunc", rd]
    plain_s, plain_d = measured[path, "plain", ps], measured[path, "plain", pd]
    # The measurement sees depth: plain autograd stores every block's activations.
    assert plain_d > 2 * plain_s, f"plain autograd did not grow with depth: {mib}"
    allowed = STREAMS_PER_BLOCK * STREAM * (rd - rs) + RSS_NOISE
    assert rev_d - rev_s <= allowed, (
        f"revfunc grew {(rev_d - rev_s) / STREAM / (rd - rs):.2f} stream tensors per "
        f"block on {path} (allowed {STREAMS_PER_BLOCK} plus {RSS_NOISE} B): {mib}"
    )
    assert rev_d <= 0.25 * plain_d, f"revfunc stores more than a quarter of plain autograd on {path}: {mib}"


@pytest.mark.parametrize("path", TRAINING_PATHS)
def test_gradients_leave_block_by_block_so_training_setups_stay_flat(measured, path):
    """Each block's gradients reach their accumulators right after its backward: with
    pre-allocated gradients or an optimizer step in backward, no second copy of the
    gradients builds up, so the peak grows by at most 0.1 stream tensors per block (a
    whole-stack node would add a full gradient copy, about 3 stream tensors per block)."""
    shallow, deep = TRAINING_DEPTHS
    streams = {k: round(v / STREAM_BYTES, 2) for k, v in measured.items() if k[0] == path}
    growth = (measured[path, "revfunc", deep] - measured[path, "revfunc", shallow]) / STREAM_BYTES
    assert growth <= 0.1 * (deep - shallow), f"revfunc grew {growth:.1f} stream tensors on {path}: {streams}"
    assert measured[path, "revfunc", deep] < measured[path, "checkpoint", deep], streams
    assert measured[path, "checkpoint", deep] > measured[path, "checkpoint", shallow] + (deep - shallow) * STREAM_BYTES


def render(results, torch_version: str, date: str, command: str) -> str:
    """The measured table as markdown, with its command, date and torch version."""
    lines = [
        (
            f"Command: `{command}`; measured {date}, "
            f"torch {torch_version}. Activation MiB of one gradient step (peak RSS above the level before, "
            "with gradients pre-allocated on `.backward()` and returned gradients subtracted elsewhere; "
            "`_live`: live parameters), depth shallow → deep."
        ),
        "",
        "| path | depths (revfunc / plain) | revfunc | plain autograd |",
        "| --- | --- | --- | --- |",
    ]
    for path in EAGER_PATHS + COMPILED_PATHS:

        def mib(method, path=path):
            return " → ".join(f"{results[path, method, k] / 2**20:.1f}" for k in DEPTHS[path, method])

        depths = " / ".join(" → ".join(map(str, DEPTHS[path, m])) for m in ("revfunc", "plain"))
        lines.append(f"| {path} | {depths} | {mib('revfunc')} | {mib('plain')} |")
    lines += [
        "",
        (
            "Training setups, d=128, 1 x 512 tokens (one stream tensor = 0.25 MiB), depth "
            f"{' → '.join(map(str, TRAINING_DEPTHS))}, activation MiB:"
        ),
        "",
        "| setup | revfunc | checkpoint |",
        "| --- | --- | --- |",
    ]
    for path in TRAINING_PATHS:
        cells = [
            " → ".join(f"{results[path, m, k] / 2**20:.1f}" for k in TRAINING_DEPTHS) for m in ("revfunc", "checkpoint")
        ]
        lines.append(f"| {path} | " + " | ".join(cells) + " |")
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
