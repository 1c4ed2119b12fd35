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
from typing import Dict, List

MIB = 2 ** 20
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
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def _worker(rank: int, world: int, init_file: str, out_dir: str, method: str, depths: List[int], dim: int,
            seq: int) -> None:
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

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            if method == "fsdp per block":
                for block in model.blocks:
                    fully_shard(block)
            wrapped = fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(rank))

        def step():
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
        rows.append({"method": method, "depth": depth, "params": params,
                     "state_mib": max(float(b[0]) for b in both) / MIB,
                     "step_peak_mib": max(float(b[1]) for b in both) / MIB,
                     "step_s": max(float(b[2]) for b in both)})
        model = wrapped = opt = None  # freed before the next depth
    if rank == 0:
        pathlib.Path(out_dir, "rows.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_method(method: str, depths: List[int], dim: int, seq: int, world: int = 2) -> List[Dict]:
    """Rows for one method, measured in a fresh pair of processes."""
    import torch.multiprocessing as mp

    from revfunc.bench.measure import WORKER_ENV

    saved = {k: os.environ.get(k) for k in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # inherited by the spawned workers
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), tmp, method, depths, dim, seq),
                               nprocs=world, start_method="spawn")
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
        f"Per rank, {cfg['world']} CPU processes on gloo, torch {cfg['torch']}: `revfunc.nn.ReversibleSequence` of "
        f"causal attention + feed-forward blocks, d={cfg['dim']}, 1 x {cfg['seq']} tokens per rank, float32, AdamW. "
        "State: parameters + gradients + AdamW moments a rank keeps (its shards under FSDP2). "
        "Step peak: resident peak during one training step above the level before it (gradients already "
        "allocated). The larger of the two ranks.",
        "",
        "| method | depth | parameters | state MiB | step peak MiB | state + peak MiB | step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["sharded"]:
        lines.append(f"| {r['method']} | {r['depth']} | {r['params'] / 1e6:.2f} M | {r['state_mib']:.1f} | "
                     f"{r['step_peak_mib']:.1f} | {r['state_mib'] + r['step_peak_mib']:.1f} | {r['step_s']:.2f} |")
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
    result = {"sharded": rows, "config": {"world": 2, "dim": args.dim, "seq": args.seq, "depths": args.depths,
                                          "torch": torch.__version__.split("+")[0]}}
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
