"""Train a byte-level causal language model on real text, reversible or not, on one
process or sharded.

    python examples/train_lm.py                                  # reversible, CPU, the stdlib's source
    python examples/train_lm.py --method plain                   # same model, plain autograd
    torchrun --nproc-per-node 2 examples/train_lm.py --shard fsdp # FSDP2, one unit per block
    torchrun --nproc-per-node 8 examples/train_lm.py --device cuda --amp bf16 --shard fsdp \\
        --depth 24 --dim 1024 --seq 8192 --batch 16                 # a multi-GPU run (NCCL)

The model: a byte embedding, a stack of reversible coupling blocks (causal SDPA attention
as ``f``, a GELU feed-forward as ``g``; ``revfunc.nn.ReversibleSequence``), a LayerNorm
and a head over the 256 bytes. ``--method`` only changes how gradients are computed,
not the function: ``reversible`` (revfunc, activations constant in depth), ``checkpoint``
(the same coupling, each block under ``torch.utils.checkpoint``) and ``plain`` (the same
coupling in plain autograd). With one seed the three log the same losses (float32,
within 1e-4 relative: ``tests/test_train_lm.py``), and so does ``--shard fsdp`` or
``ddp`` under ``torchrun``: every rank draws the same global batch and trains on its
slice; gradients are averaged over ranks.

Data: the Python standard library's own source files, found from the running
interpreter (works offline), or ``--data PATH...`` (files or directories). The last 5%
of the bytes are held out for a validation loss at the end.

Writes ``--out DIR``: ``metrics.json`` (``loss``, the global-batch mean loss per step;
``val_loss``; ``tokens_per_s``; ``peak_memory_bytes``; the configuration) and
``loss.png`` (the loss curve; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sysconfig
import time
from typing import List, Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import revfunc.nn as rnn
from revfunc.testing.blocks import transformer_layers


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--method", choices=["reversible", "checkpoint", "plain"], default="reversible")
    p.add_argument("--depth", type=int, default=4, help="coupling blocks (default 4)")
    p.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256, help="tokens (bytes) per sequence (default 256)")
    p.add_argument("--batch", type=int, default=8, help="global batch, split over ranks (default 8)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shard",
        choices=["none", "ddp", "fsdp"],
        default="none",
        help="under torchrun: DDP, or FSDP2 with one unit per block (gloo on CPU, NCCL on CUDA)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument(
        "--amp",
        choices=["none", "bf16"],
        default="none",
        help="bf16: autocast (FSDP: bf16 parameters, float32 gradient reduction)",
    )
    p.add_argument("--data", nargs="+", default=None, help="text files or directories (default: the stdlib)")
    p.add_argument("--data-mb", type=float, default=8.0, help="read at most this much text (default 8 MB)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="train_lm_out", help="directory for metrics.json and loss.png")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def text_files(paths: Optional[List[str]]) -> List[pathlib.Path]:
    """The files to read: ``paths`` (directories searched for ``*.py``, ``*.txt``, ``*.md``)
    or, by default, the standard library's own ``*.py`` files (not its site-packages)."""
    roots = [pathlib.Path(p) for p in paths] if paths else [pathlib.Path(sysconfig.get_paths()["stdlib"])]
    patterns = ("*.py", "*.txt", "*.md") if paths else ("*.py",)
    files: List[pathlib.Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
        elif root.is_dir():
            found = (f for ext in patterns for f in root.rglob(ext) if f.is_file())
            files += sorted(f for f in found if not {"site-packages", "dist-packages"} & set(f.parts))
        else:
            raise SystemExit(f"train_lm.py: --data {root}: no such file or directory")
    return files


def load_bytes(paths: Optional[List[str]], max_mb: float) -> torch.Tensor:
    """The text as one uint8 tensor, files in sorted order, at most ``max_mb`` MB."""
    chunks, size, limit = [], 0, int(max_mb * 2**20)
    for f in text_files(paths):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data[: limit - size])
        size += len(chunks[-1])
        if size >= limit:
            break
    if size < 4096:
        raise SystemExit(f"train_lm.py: found only {size} bytes of text; pass --data PATH")
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)


def global_batch(data: torch.Tensor, step: int, batch: int, seq: int, seed: int):
    """``(inputs, targets)`` of shape (batch, seq): the same on every rank for a step."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
    rows = torch.stack([data[s : s + seq + 1] for s in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


# ---------------------------------------------------------------- model


class Coupling(nn.Module):
    """One coupling block in plain autograd: ``y1 = x1 + f(x2); y2 = x2 + g(y1)``."""

    def __init__(self, f: nn.Module, g: nn.Module, checkpointed: bool):
        super().__init__()
        self.f, self.g, self.checkpointed = f, g, checkpointed

    def coupling(self, x1: torch.Tensor, x2: torch.Tensor):
        y1 = x1 + self.f(x2)
        return y1, x2 + self.g(y1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        if self.checkpointed:
            return checkpoint(self.coupling, x1, x2, use_reentrant=False)
        return self.coupling(x1, x2)


class PlainStack(nn.Module):
    """The same stack as ``revfunc.nn.ReversibleSequence``: ``(x, x)`` in, ``y1 + y2`` out."""

    def __init__(self, layers: nn.ModuleList, checkpointed: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Coupling(f, g, checkpointed) for f, g in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x, x
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return x1 + x2


class ByteLM(nn.Module):
    """Embedding -> coupling stack -> LayerNorm -> head. Shapes: (b, n) int -> (b, n, 256)."""

    def __init__(self, method: str, depth: int, dim: int, heads: int):
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        layers = transformer_layers(depth, dim, heads=heads, causal=True)
        self.stack = (
            rnn.ReversibleSequence(layers)
            if method == "reversible"
            else PlainStack(layers, checkpointed=method == "checkpoint")
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stack(self.embed(tokens))))


# ---------------------------------------------------------------- distributed


def setup_distributed(args):
    """``(rank, world, device)``; starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.shard == "none" and world > 1:
        raise SystemExit("train_lm.py: under torchrun pass --shard ddp or --shard fsdp")
    if args.shard != "none" and "RANK" not in os.environ:
        raise SystemExit(
            f"train_lm.py: --shard {args.shard} runs under torchrun "
            f"(torchrun --nproc-per-node 2 examples/train_lm.py --shard {args.shard})"
        )
    device = torch.device(args.device)
    if args.shard == "none":
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.batch % dist.get_world_size():
        raise SystemExit(
            f"train_lm.py: --batch {args.batch} must be a multiple of the world size {dist.get_world_size()}"
        )
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model: ByteLM, args, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with one unit per coupling block and the root (``--amp bf16``: bf16
    parameters, float32 gradient reduction)."""
    if args.shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if args.shard == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if args.amp == "bf16"
            else MixedPrecisionPolicy()
        )
        for block in model.stack.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    return model


# ---------------------------------------------------------------- training


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return 0


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    data = load_bytes(args.data, args.data_mb)
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    torch.manual_seed(args.seed)
    model = wrap(ByteLM(args.method, args.depth, args.dim, args.heads).to(device), args, device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    autocast = args.amp == "bf16" and args.shard != "fsdp"
    per_rank = args.batch // world
    say(
        f"train_lm: {args.method}, depth {args.depth}, dim {args.dim}, seq {args.seq}, global batch {args.batch}, "
        f"{world} process(es), shard {args.shard}, {device}; {len(train) / 2**20:.1f} MB of text"
    )
    losses: List[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        inputs, targets = global_batch(train, step, args.batch, args.seq, args.seed)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        inputs, targets = inputs[rows].to(device), targets[rows].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(mean)  # a sum (gloo has no average)
            mean /= world
        losses.append(float(mean))
        if step % args.log_every == 0 or step == args.steps - 1:
            seconds = time.perf_counter() - start
            say(
                f"step {step:5d}  loss {losses[-1]:.4f}  {args.batch * args.seq * (step + 1) / seconds:9.0f} tok/s  "
                f"peak {peak_memory_bytes(device) / 2**20:.0f} MiB",
                flush=True,
            )
    seconds = time.perf_counter() - start
    val_loss = evaluate(model, val, args, rank, world, per_rank, device, autocast)
    metrics = {
        "loss": losses,
        "val_loss": val_loss,
        "tokens_per_s": args.batch * args.seq * args.steps / seconds,
        "peak_memory_bytes": peak_memory_bytes(device),
        "world_size": world,
        "config": vars(args),
    }
    say(f"done: val loss {val_loss:.4f} ({val_loss / math.log(2):.3f} bits/byte), {metrics['tokens_per_s']:.0f} tok/s")
    if rank == 0:
        write_outputs(pathlib.Path(args.out), metrics)
        say(f"wrote {args.out}/metrics.json and {args.out}/loss.png")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank's work is done before any rank tears its group down
        dist.destroy_process_group()
    return metrics


@torch.no_grad()
def evaluate(model, val, args, rank, world, per_rank, device, autocast) -> float:
    """Mean loss on 4 held-out global batches (the model in eval mode, then back)."""
    model.eval()
    total = torch.zeros((), device=device)
    for k in range(4):
        inputs, targets = global_batch(val, k, args.batch, args.seq, args.seed + 1)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            logits = model(inputs[rows].to(device))
        total += F.cross_entropy(logits.float().flatten(0, 1), targets[rows].to(device).flatten())
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(total)
    model.train()
    return float(total) / (4 * world)


def write_outputs(out: pathlib.Path, metrics: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("train_lm: matplotlib is not installed: no loss.png (pip install matplotlib)")
        return
    cfg = metrics["config"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(len(metrics["loss"])), metrics["loss"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/byte)")
    ax.set_title(
        f"byte LM, {cfg['method']}, depth {cfg['depth']}, dim {cfg['dim']}, seq {cfg['seq']}, shard {cfg['shard']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
