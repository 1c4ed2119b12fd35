"""The command line: ``python -m revfunc.bench [--preset long|short|overhead] ...``.

Presets (``--preset``; explicit flags override them):

- ``long`` (default): the regime reversible layers are chosen for. d=64, 4 heads, 1 x 2048
  tokens, depths 8, 16, 32; activations dominate (batch * tokens >> 6 d). Adds a
  memory-vs-sequence-length sweep at depth 8 (``--seqs``) and a memory-budget table.
- ``wide``: d=128, 1 x 512 tokens, depths 8 to 32: one block's parameter gradients are
  about 3 stream tensors, so the training setups (gradient accumulation, optimizer in
  backward) show who holds a second copy of the gradients.
- ``short``: d=128, 4 x 64 tokens, depths 4 to 32, with the functional methods: a quick
  run where parameters and one block's internals dominate.
- ``affine``: a flow's stack: affine couplings (``--coupling affine``) of MLP subnets
  (d=64 halves, hidden 256, twice the half's width out), 2 x 1024 tokens, depths 8 to 32,
  the log-det in the loss; revfunc against plain autograd on the same blocks.
- ``overhead``: a CPU proxy for a launch-bound accelerator step, 1 thread, depth 32,
  d=16, 2 heads, input (1, 1, 16), 15 rounds; the column to read is the extra time per
  block over plain.

``--functional`` adds ``plain/func.grad`` and ``revfunc/func.grad`` (``torch.func.grad``
of a loss over ``sequential_sequence`` / ``reversible_sequence`` with the live
parameters from ``pure_blocks``); ``--compile`` adds every module method as
``torch.compile(model)`` plus eager ``loss.backward()`` (``plain+compile``, ...), and
with ``--functional`` the compiled gradient steps ``plain/func.grad+compile`` and
``revfunc/vjp+compile`` (:func:`revfunc.bench.cases.vjp_train_step`). Compilation is
timed apart: the first call's time minus the steady median.

Reported per depth: fwd+bwd time ratio to plain (median over rounds of the ratio within a
round; methods run in rotated order each round), extra microseconds per block over
plain, activation bytes saved for backward (``saved_tensors_hooks``, parameters
excluded; n/a where hooks cannot see them: the classic code's ``ctx`` attributes,
torch.func, compiled graphs), and the activation peak of one step measured in a fresh
worker process (:mod:`revfunc.bench.measure`), also in units of one stream tensor
(batch x tokens x d elements), next to the one-branch floor.

Writes ``bench.json``, ``bench.md`` (the tables with the command, date and machine, which
the docs embed), ``headline.md`` and ``bench.png`` to ``--out``; ``--drift`` writes
``drift.json`` and ``drift.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from revfunc.bench.cases import (
    COMPILED_STEPS,
    FUNCTIONAL_METHODS,
    MODULE_METHODS,
    SELECTIVE_METHODS,
    coupling_of,
    is_flow,
)
from revfunc.bench.drift import drift
from revfunc.bench.measure import peak_memory, timings, worker
from revfunc.bench.report import _machine, plot, render_drift_markdown, render_headline, render_markdown, report

DEFAULT_CLASSIC = pathlib.Path(__file__).resolve().parents[3] / "shared" / "reference" / "reversible.py"
PRESETS = {
    "long": dict(
        depths=[8, 16, 32],
        dim=64,
        heads=4,
        seq=2048,
        batch=1,
        causal=True,
        repeats=3,
        warmup=1,
        seqs=[512],
        sweep_depth=8,
        functional=False,
        threads=0,
        memory=True,
        selective=True,
    ),
    "short": dict(
        depths=[4, 8, 16, 32],
        dim=128,
        heads=4,
        seq=64,
        batch=4,
        causal=False,
        repeats=7,
        warmup=2,
        seqs=[],
        sweep_depth=8,
        functional=True,
        threads=0,
        memory=True,
    ),
    "wide": dict(
        depths=[8, 16, 32],
        dim=128,
        heads=4,
        seq=512,
        batch=1,
        causal=True,
        repeats=3,
        warmup=1,
        seqs=[],
        sweep_depth=8,
        functional=False,
        threads=0,
        memory=True,
        setups=True,
    ),
    "affine": dict(
        depths=[8, 16, 32],
        dim=64,
        heads=4,
        seq=1024,
        batch=2,
        causal=False,
        repeats=3,
        warmup=1,
        seqs=[],
        sweep_depth=8,
        functional=False,
        threads=0,
        memory=True,
        coupling="affine",
    ),
    "overhead": dict(
        depths=[32],
        dim=16,
        heads=2,
        seq=1,
        batch=1,
        causal=False,
        repeats=15,
        warmup=2,
        seqs=[],
        sweep_depth=8,
        functional=False,
        threads=1,
        memory=False,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m revfunc.bench", description="What reversibility costs in time and saves in memory."
    )
    parser.add_argument(
        "--preset",
        default="long",
        choices=sorted(PRESETS),
        help="named configuration (default long); the flags below override it",
    )
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--dim", type=int, help="model width d")
    parser.add_argument("--heads", type=int)
    parser.add_argument("--seq", type=int, help="tokens per example")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None, help="causal attention")
    parser.add_argument(
        "--seqs",
        type=int,
        nargs="*",
        help="extra sequence lengths for the memory sweep at --sweep-depth (none: no sweep)",
    )
    parser.add_argument("--sweep-depth", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--amp", choices=["bf16", "fp16"], help="autocast around the forward")
    parser.add_argument("--repeats", type=int, help="timed fwd+bwd per method and depth")
    parser.add_argument("--warmup", type=int, help="untimed rounds first")
    parser.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--classic", default=str(DEFAULT_CLASSIC), help="path of the classic reversible.py ('' to skip)"
    )
    parser.add_argument(
        "--functional", action=argparse.BooleanOptionalAction, default=None, help="also the torch.func.grad paths"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory workers")
    parser.add_argument(
        "--selective",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also revfunc+attn and checkpoint+attn: attention outputs kept per block",
    )
    parser.add_argument(
        "--setups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure each module method with an optimizer step in backward",
    )
    parser.add_argument(
        "--compile", action="store_true", help="also every method as torch.compile(model) plus eager backward"
    )
    parser.add_argument(
        "--coupling",
        help="additive (default), scaled:A, momentum:G or affine[:CLAMP] (affine: MLP subnets, log-det in the loss)",
    )
    parser.add_argument("--out", default="bench_out", help="folder for bench.json, bench.md and bench.png")
    parser.add_argument(
        "--drift",
        action="store_true",
        help="instead: reconstruction drift by dtype and depth, and bf16 autocast gradient error",
    )
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DEPTH", "SEQ"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if key == "memory":
            args.no_memory = args.no_memory or not value
        elif getattr(args, key) is None:
            setattr(args, key, value)
    return args


def methods(args) -> list:
    if coupling_of(args) is not None:
        # The classic code is additive only; a flow (affine) compares revfunc with plain
        # autograd on the same blocks; checkpointing and selective saving are the additive
        # transformer's.
        return ["plain", "revfunc"] if is_flow(args) else ["plain", "checkpoint", "revfunc"]
    names = (
        list(MODULE_METHODS)
        + (list(SELECTIVE_METHODS) if args.selective else [])
        + (list(FUNCTIONAL_METHODS) if args.functional else [])
    )
    if args.compile:
        names += [m + "+compile" for m in MODULE_METHODS] + (list(COMPILED_STEPS) if args.functional else [])
    has_classic = bool(args.classic) and os.path.exists(args.classic)
    return [m for m in names if has_classic or not m.startswith("classic")]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m revfunc.bench" + "".join(f" {a}" for a in argv)
    date = time.strftime("%Y-%m-%d")
    if args.drift:
        result = drift(args)
        result.update(command=command, date=date, machine=_machine(args))
        (out / "drift.json").write_text(json.dumps(result, indent=2))
        (out / "drift.md").write_text(render_drift_markdown(result))
        print(f"\nwrote {out / 'drift.json'} and {out / 'drift.md'}")
        return result
    print(
        f"revfunc.bench --preset {args.preset}: depths {args.depths}, d={args.dim}, seq={args.seq}, "
        f"batch={args.batch}, {args.dtype}{' ' + args.amp + ' autocast' if args.amp else ''} on {args.device}; "
        f"methods {methods(args)}",
        flush=True,
    )
    activations = {} if args.no_memory else peak_memory(args, argv, methods(args))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    timed = timings(args, methods(args))
    result = report(args, methods(args), timed, activations)
    result.update(command=command, date=date, machine=_machine(args))
    result["config"]["classic"] = os.path.basename(args.classic)  # no path of the machine it ran on
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(render_markdown(result))
    if activations:
        (out / "headline.md").write_text(render_headline(result))
    wrote_plot = plot(result, out / "bench.png")
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}" + (f" and {out / 'bench.png'}" if wrote_plot else ""))
    return result


if __name__ == "__main__":
    main()
