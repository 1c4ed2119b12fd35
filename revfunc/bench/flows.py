"""A normalizing flow side by side with FrEIA: ``python -m revfunc.bench.flows``.

The same flow in three ways: FrEIA 0.2's ``SequenceINN`` of ``GLOWCouplingBlock(clamp=2.0)``
+ ``PermuteRandom``; the same weights in revfunc (:func:`revfunc.invertible.from_freia`)
with the memory-saving backward (``revfunc``); and in plain autograd
(``revfunc.sequential_sequence``, ``plain`` = 1.0 for time). One maximum-likelihood step
(``.backward()`` of the mean NLL) per point. Activation: the step's peak above the level
before it, with the gradients pre-allocated, each point in a fresh process
(:func:`revfunc.bench.measure.activation_bytes`, the benchmark's recipe). Time: the
median of ``--repeats`` rounds, each running every method once in one process; the time
ratios are the median over rounds of the ratio within a round (robust to the machine's
drift between rounds).

Writes ``OUT/flows.json`` and ``OUT/flows.md``. Without FrEIA (``pip install FrEIA==0.2``,
the ``bench`` extra) it says so in one line and measures revfunc and plain only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

METHODS = ("freia", "plain", "revfunc")


def have_freia() -> bool:
    try:
        import FrEIA  # noqa: F401
    except ImportError:
        return False
    return True


def build(depth: int, dims: int, hidden: int, batch: int, device: str):
    """``(step, prepare)`` per method: one NLL step and the gradient pre-allocation."""
    import torch
    from torch import nn

    import revfunc
    from revfunc.couplings import affine

    torch.manual_seed(0)
    x = torch.randn(batch, dims, device=device)

    def subnet(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, c_out))

    if have_freia():
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        inn = Ff.SequenceINN(dims)
        for k in range(depth):
            inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=2.0)
            inn.append(Fm.PermuteRandom, seed=k)
        model = inn.to(device)
        blocks, params = revfunc.invertible.from_freia(inn)
    else:  # the same flow without FrEIA: GLOW subnets and fixed permutations
        model = nn.ModuleList(subnet(dims // 2, dims) for _ in range(2 * depth)).to(device)
        g = torch.Generator().manual_seed(0)
        blocks, params = [], []
        for k in range(depth):
            (f, fp), (gg, gp) = revfunc.pure(model[2 * k + 1]), revfunc.pure(model[2 * k])
            blocks += [(f, gg), revfunc.invertible.permute(torch.randperm(dims, generator=g))]
            params += [(fp, gp), {}]
    weights = [p for p in model.parameters() if p.requires_grad]

    def nll(z, logdet):
        return (0.5 * (z**2).sum(-1) - logdet).mean()

    def freia_step():
        nll(*model(x)).backward()

    def stack_step(run):
        def step():
            y1, y2, logdet = run(blocks, params, *x.chunk(2, -1), coupling=affine(clamp=2.0), return_logdet=True)
            nll(torch.cat([y1, y2], -1), logdet).backward()

        return step

    def prepare():
        for w in weights:
            w.grad = torch.zeros_like(w)

    steps = {
        "freia": freia_step if have_freia() else None,
        "plain": stack_step(revfunc.sequential_sequence),
        "revfunc": stack_step(revfunc.reversible_sequence),
    }
    return steps, prepare


def _worker(args) -> None:
    from revfunc.bench.measure import activation_bytes

    steps, prepare = build(args.depth, args.dims, args.hidden, args.batch, args.device)
    act, _ = activation_bytes(steps[args.worker], args.device, prepare)
    print(json.dumps({"activation_bytes": act}))


def _memory(args, method: str, depth: int) -> int:
    from revfunc.bench.measure import WORKER_ENV

    argv = [sys.executable, "-m", "revfunc.bench.flows", "--worker", method, "--depth", str(depth)]
    argv += ["--dims", str(args.dims), "--hidden", str(args.hidden), "--batch", str(args.batch)]
    argv += ["--device", args.device]
    out = subprocess.run(argv, env={**os.environ, **WORKER_ENV}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["activation_bytes"]


def _times(args, depth: int, methods) -> tuple:
    import torch

    steps, prepare = build(depth, args.dims, args.hidden, args.batch, args.device)
    seconds: dict = {m: [] for m in methods}
    for m in methods:  # warm-up
        prepare()
        steps[m]()
    for _ in range(args.repeats):
        for m in methods:
            prepare()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[m]()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds[m].append(time.perf_counter() - start)
    base = "freia" if "freia" in methods else "plain"
    ratios = {m: statistics.median(s / b for s, b in zip(seconds[m], seconds[base])) for m in methods}
    return {m: statistics.median(v) for m, v in seconds.items()}, ratios


def render(result: dict) -> str:
    methods, rows = result["methods"], result["rows"]
    mib = 2**20
    head = "| depth | " + " | ".join(f"{m} activation (MiB)" for m in methods) + " | "
    head += " | ".join(f"{m} time (ms)" for m in methods) + " |"
    lines = [head, "|" + " --- |" * (1 + 2 * len(methods))]
    for r in rows:
        mem = " | ".join(f"{r['activation'][m] / mib:.1f}" for m in methods)
        tim = " | ".join(f"{1000 * r['time'][m]:.1f}" for m in methods)
        lines.append(f"| {r['depth']} | {mem} | {tim} |")
    if "freia" in methods:
        last = rows[-1]
        lines += [
            "",
            (
                f"At depth {last['depth']}: revfunc/FrEIA activation "
                f"{last['activation']['revfunc'] / last['activation']['freia']:.3f}x, time "
                f"{last['time_ratio']['revfunc']:.2f}x; plain/FrEIA time "
                f"{last['time_ratio']['plain']:.2f}x (time ratios: the median over rounds of "
                "the ratio within a round)."
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="8,16,32")
    parser.add_argument("--dims", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench_out/flows")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return {}
    methods = [m for m in METHODS if m != "freia" or have_freia()]
    if "freia" not in methods:
        print("revfunc.bench.flows: FrEIA is not installed (pip install FrEIA==0.2): measuring revfunc and plain only")
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        activation = {m: _memory(args, m, depth) for m in methods}
        seconds, ratios = _times(args, depth, methods)
        row = {"depth": depth, "activation": activation, "time": seconds, "time_ratio": ratios}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "methods": methods,
        "rows": rows,
        "config": {k: getattr(args, k) for k in ("dims", "hidden", "batch", "repeats", "device")},
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flows.json").write_text(json.dumps(result, indent=1))
    (out / "flows.md").write_text(render(result))
    print(render(result))
    return result


if __name__ == "__main__":
    main()
