"""Train a Glow-style normalizing flow on scikit-learn's bundled 8x8 digits, offline.

Each step of the flow is an affine coupling (GLOW, FrEIA's soft clamp) of two MLP
subnets followed by a learned invertible linear map (Glow's 1x1 convolution, LU form),
trained by maximum likelihood at activation memory constant in depth
(``--method reversible``; ``plain`` is the same math in plain autograd). Samples are
drawn by running the inverse from Gaussian noise.

    python examples/train_flow.py                 # defaults: a few minutes on 2 CPU cores
    python examples/train_flow.py --steps 50 --depth 2 --out /tmp/flow

Writes ``OUT/metrics.json`` (``"loss"``: the training NLL in bits per dimension at each
step; ``"test_bits_per_dim"`` on the held-out 297 images), ``OUT/loss.png`` and
``OUT/samples.png``.

Bits per dimension: the digits take 17 levels (0..16). Dequantized, ``u = (X + U[0, 1)) / 17``
is a density on ``[0, 1)^64``, and ``-log2 P(X) <= -log2 p(u) + 64 log2 17`` (uniform
dequantization); the flow models ``v = 2 u - 1`` (log-det ``64 log 2``).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import torch
from torch import nn

import revfunc
from revfunc.couplings import affine
from revfunc.invertible import lu_linear, lu_linear_params

DIMS, LEVELS, TEST = 64, 17, 297


def load_digits(seed: int):
    """``(train, test)``: the digits as float64 levels ``(N, 64)``, a fixed shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = torch.tensor(sklearn_digits().data, dtype=torch.float64)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    data = data[order]
    return data[TEST:], data[:TEST]


def subnet(hidden: int) -> nn.Module:
    """GLOW subnet: half -> (s_raw, t), the last layer zero so the flow starts at the identity."""
    net = nn.Sequential(nn.Linear(DIMS // 2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
    last = nn.Linear(hidden, DIMS)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(net, last)


def build(depth: int, hidden: int, seed: int):
    """``(blocks, params, modules)``: depth x (coupling, LU map) and what the optimizer trains."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    blocks, params, modules = [], [], nn.ModuleList()
    for _ in range(depth):
        f, g = subnet(hidden), subnet(hidden)
        modules.extend([f, g])
        (f_fn, f_params), (g_fn, g_params) = revfunc.pure(f), revfunc.pure(g)
        blocks.append((f_fn, g_fn))
        params.append((f_params, g_params))
        lu = {
            k: nn.Parameter(v, requires_grad=k in ("lower", "upper", "log_scale"))
            for k, v in lu_linear_params(DIMS, generator=generator).items()
        }
        holder = nn.ParameterDict(lu)
        modules.append(holder)
        blocks.append(lu_linear())
        params.append(dict(holder.items()))
    return blocks, params, modules


def dequantize(levels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``v = 2 (X + U[0, 1)) / 17 - 1`` in float32."""
    noise = torch.rand(levels.shape, generator=generator, dtype=levels.dtype)
    return (2 * (levels + noise) / LEVELS - 1).float()


def bits_per_dim(blocks, params, v: torch.Tensor, method: str) -> torch.Tensor:
    """Mean NLL of the levels in bits per dimension, from the flow's density of ``v``."""
    run = revfunc.reversible_sequence if method == "reversible" else revfunc.sequential_sequence
    z1, z2, logdet = run(blocks, params, *v.chunk(2, -1), coupling=affine(clamp=2.0), return_logdet=True)
    z = torch.cat([z1, z2], -1)
    log_pz = -0.5 * (z**2).sum(-1) - 0.5 * DIMS * math.log(2 * math.pi)
    log_pv = log_pz + logdet
    nll_u = -(log_pv + DIMS * math.log(2))  # v = 2u - 1
    return ((nll_u + DIMS * math.log(LEVELS)) / (DIMS * math.log(2))).mean()


@torch.no_grad()
def sample(blocks, params, n: int, temperature: float, generator: torch.Generator, device) -> torch.Tensor:
    """``n`` digits in ``[0, 1]``, ``(n, 8, 8)``: the inverse run on Gaussian noise."""
    z = (torch.randn(n, DIMS, generator=generator) * temperature).to(device)
    v1, v2 = revfunc.reversible_inverse(blocks, params, *z.chunk(2, -1), coupling=affine(clamp=2.0))
    u = (torch.cat([v1, v2], -1) + 1) / 2
    return u.clamp(0, 1).reshape(n, 8, 8)


def save_pngs(out: pathlib.Path, losses, samples: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("train NLL (bits/dim)")
    ax.set_title("Glow-style flow on 8x8 digits")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    side = int(math.sqrt(len(samples)))
    # A one-pixel blank margin around each 8x8 tile, so that neighbouring digits do not merge.
    tiles = nn.functional.pad(samples[: side * side].reshape(-1, 8, 8), (1, 1, 1, 1))
    grid = tiles.reshape(side, side, 10, 10).permute(0, 2, 1, 3).reshape(side * 10, side * 10)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title("samples: the inverse of N(0, 0.8^2)")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=("reversible", "plain"), default="reversible")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="flow_out")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)

    train, test = load_digits(args.seed)
    blocks, params, modules = build(args.depth, args.hidden, args.seed)
    modules.to(device)
    optimizer = torch.optim.Adam([p for p in modules.parameters() if p.requires_grad], lr=args.lr)
    noise = torch.Generator().manual_seed(args.seed + 1)
    losses = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        index = torch.randint(len(train), (args.batch,), generator=noise)
        loss = bits_per_dim(blocks, params, dequantize(train[index], noise).to(device), args.method)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if step == 1 or step % max(1, args.steps // 20) == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step:5d}/{args.steps}  train {losses[-1]:.3f} bits/dim  ({elapsed:.0f} s)", flush=True)
    with torch.no_grad():
        test_bpd = float(bits_per_dim(blocks, params, dequantize(test, noise).to(device), args.method))
    samples = sample(blocks, params, 64, 0.8, torch.Generator().manual_seed(args.seed + 2), device)
    metrics = {
        "loss": losses,
        "test_bits_per_dim": test_bpd,
        "method": args.method,
        "depth": args.depth,
        "steps": args.steps,
        "seconds": time.perf_counter() - start,
    }
    (out / "metrics.json").write_text(json.dumps(metrics))
    save_pngs(out, losses, samples.cpu())
    print(f"test {test_bpd:.3f} bits/dim; wrote {out / 'metrics.json'}, {out / 'loss.png'}, {out / 'samples.png'}")
    return metrics


if __name__ == "__main__":
    main()
