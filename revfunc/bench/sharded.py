"""Per-rank memory of a reversible stack trained on 2 CPU processes (gloo): FSDP2 with
one unit per block, FSDP2 on the root only, and unsharded DDP, at several depths.

    python -m revfunc.bench.sharded --out docs/generated/sharded

Each method runs in its own pair of fresh processes (started with
:data:`revfunc.bench.measure.WORKER_ENV`), every depth in turn: two warm-up AdamW steps,
then one measured step. Per rank:

- ``state``: the bytes a rank keeps between steps, counted tensor by tensor: its
  parameters, gradients and AdamW moments (FSDP2: its shards).
- ``step peak``: the peak resident memory during the measured step above the level
  just before it (``VmHWM``; gradients already allocated): unsharded parameters and
  gradients in flight, activations, communication buffers.

Reported: the larger of the two ranks, and the step time. FSDP2 per block should keep
``state`` at about the unsharded state / world and ``step peak`` flat in depth (one or
two blocks unsharded at a time, activations constant in depth); root only gathers every
parameter and gradient during the step.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any, Dict, List

MIB = 2**20
METHODS = ("fsdp per block", "fsdp root only", "ddp (unsharded)")


def state_bytes(model, opt) -> int:
    """Local bytes of parameters, gradients and optimizer tensors (shards for DTensors)."""
    import torch

    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    total = 0
    for p in model.parameters():
        total += local(p) + (local(p.grad) if p.grad is not None else 0)
    for state in opt.state.values():
        total += sum(local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return total


def init_gloo(rank: int, world: int, init_file: str, hang_s: float = 60, timeout_s: float = 60) -> None:
    """A worker's start: one torch thread, a gloo group on loopback through ``init_file``,
    and a traceback dump (then exit) if the worker hangs for ``hang_s`` seconds."""
    import faulthandler
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(hang_s, exit=True)
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )


def finish_gloo(rank: int, init_file: str) -> None:
    """A worker's clean end: wait for every rank, mark this rank's work as done, tear the
    group down, and leave without interpreter teardown (gloo's threads can stall or abort
    it after the work is done). The mark, written before any teardown, is what
    :func:`run_gloo_workers` reads: a rank that dies after it has finished its work."""
    import sys

    import torch.distributed as dist

    dist.barrier()
    pathlib.Path(f"{init_file}.rank{rank}.done").touch()
    sys.stdout.flush()
    sys.stderr.flush()
    dist.destroy_process_group()
    os._exit(0)


def run_gloo_workers(fn, args: tuple, world: int, init_file: str, limit_s: float, what: str) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned processes that start with :func:`init_gloo`
    on ``init_file`` and end with :func:`finish_gloo`, and wait for all of them.

    Raises ``RuntimeError`` with every rank's exit code when one fails before it has
    finished its work, or when they have not all finished within ``limit_s`` seconds (the
    processes are killed then). A rank that exits with a signal after it has marked its
    work done (gloo's teardown) is not a failure: its results are already written.
    """
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    processes = ctx.processes
    try:
        while any(p.is_alive() for p in processes):
            failed = [
                r
                for r, p in enumerate(processes)
                if p.exitcode not in (None, 0) and not pathlib.Path(f"{init_file}.rank{r}.done").exists()
            ]
            if failed:
                time.sleep(1)  # let the others report too
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{what} did not finish within {limit_s:.0f} s; exit codes "
                    f"{[p.exitcode for p in processes]} (None: still running, killed now)"
                )
            time.sleep(0.1)
        codes = [p.exitcode for p in processes]
        unfinished = [r for r in range(world) if not pathlib.Path(f"{init_file}.rank{r}.done").exists()]
        if unfinished:
            raise RuntimeError(
                f"{what}: ranks {unfinished} failed before finishing their work; exit codes {codes} "
                "(negative: killed by that signal); their tracebacks are above"
            )
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(5)


def _worker(
    rank: int, world: int, init_file: str, out_dir: str, method: str, depths: List[int], dim: int, seq: int
) -> None:
    import torch
    import torch.distributed as dist

    import revfunc.nn as rnn
    from revfunc.bench.measure import peak_above
    from revfunc.testing.blocks import transformer_layers

    init_gloo(rank, world, init_file, hang_s=900, timeout_s=600)
    rows = []
    for depth in depths:
        torch.manual_seed(0)
        model = rnn.ReversibleSequence(transformer_layers(depth, dim, heads=4, causal=True))
        params = sum(p.numel() for p in model.parameters())  # before sharding: the whole model
        if method == "ddp (unsharded)":
            from torch.nn.parallel import DistributedDataParallel

            wrapped: Any = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            if method == "fsdp per block":
                for block in model.blocks:
                    fully_shard(block)
            wrapped = fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(rank))

        def step(wrapped=wrapped, x=x, opt=opt):  # this depth's model, batch and optimizer
            wrapped(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # gradients stay allocated: not counted in the peak

        for _ in range(2):
            step()
        dist.barrier()
        start = time.perf_counter()
        peak, _ = peak_above(step)
        seconds = time.perf_counter() - start
        mine = torch.tensor([state_bytes(model, opt), peak, seconds], dtype=torch.float64)
        both = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(both, mine)
        rows.append(
            {
                "method": method,
                "depth": depth,
                "params": params,
                "state_mib": max(float(b[0]) for b in both) / MIB,
                "step_peak_mib": max(float(b[1]) for b in both) / MIB,
                "step_s": max(float(b[2]) for b in both),
            }
        )
        del model, wrapped, opt  # freed before the next depth
    if rank == 0:
        pathlib.Path(out_dir, "rows.json").write_text(json.dumps(rows))
    finish_gloo(rank, init_file)


def run_method(method: str, depths: List[int], dim: int, seq: int, world: int = 2) -> List[Dict]:
    """Rows for one method, measured in a fresh pair of processes."""
    from revfunc.bench.measure import WORKER_ENV

    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # inherited by the spawned workers
    try:
        with tempfile.TemporaryDirectory() as tmp:
            init = os.path.join(tmp, "init")
            run_gloo_workers(
                _worker,
                (world, init, tmp, method, depths, dim, seq),
                world,
                init,
                1800,
                f"revfunc.bench.sharded ({method})",
            )
            return json.loads(pathlib.Path(tmp, "rows.json").read_text())
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def render_markdown(result: Dict) -> str:
    cfg = result["config"]
    lines = [
        (
            f"Per rank, {cfg['world']} CPU processes on gloo, torch {cfg['torch']}: `revfunc.nn.ReversibleSequence` "
            f"of causal attention + feed-forward blocks, d={cfg['dim']}, 1 x {cfg['seq']} tokens per rank, float32, "
            "AdamW. "
            "State: parameters + gradients + AdamW moments a rank keeps (its shards under FSDP2). "
            "Step peak: resident peak during one training step above the level before it (gradients already "
            "allocated). The larger of the two ranks."
        ),
        "",
        "| method | depth | parameters | state MiB | step peak MiB | state + peak MiB | step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sharded"]:
        lines.append(
            f"| {r['method']} | {r['depth']} | {r['params'] / 1e6:.2f} M | {r['state_mib']:.1f} | "
            f"{r['step_peak_mib']:.1f} | {r['state_mib'] + r['step_peak_mib']:.1f} | {r['step_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    import torch

    p = argparse.ArgumentParser(description="per-rank memory under FSDP2 per block, root only, and DDP")
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--out", default=None, help="directory for sharded.json and sharded.md")
    args = p.parse_args(argv)
    rows = []
    for method in METHODS:
        print(f"revfunc.bench.sharded: {method}, depths {args.depths}", flush=True)
        rows += run_method(method, args.depths, args.dim, args.seq)
    result = {
        "sharded": rows,
        "config": {
            "world": 2,
            "dim": args.dim,
            "seq": args.seq,
            "depths": args.depths,
            "torch": torch.__version__.split("+")[0],
        },
    }
    text = render_markdown(result)
    print(text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sharded.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "sharded.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
