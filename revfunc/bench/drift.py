"""Reconstruction drift by dtype and depth, and bf16 autocast gradient error: ``--drift``."""

from __future__ import annotations

import os
from typing import Any, Dict


def drift(args) -> dict:
    """Reconstruction drift by dtype and depth, and bf16 autocast gradient error vs k.

    Drift: max over blocks of :func:`revfunc.reconstruction_error` on the benchmark's
    blocks with weights and inputs in each dtype. Gradients: relative norm error of all
    parameter gradients under ``torch.autocast(dtype=bfloat16)`` against plain autograd
    (``sequential_sequence``) under the same autocast, for ``checkpoint_every`` k.
    """
    import torch

    import revfunc
    from revfunc.bench.cases import coupling_of
    from revfunc.testing.blocks import transformer_layers

    if coupling_of(args) is not None:
        return coupling_drift(args)
    dim, batch, seq = args.dim, args.batch, args.seq
    result: Dict[str, Any] = {"drift": [], "autocast": []}
    print(f"reconstruction drift (max relative error of rebuilt block inputs), d={dim}, {batch}x{seq} tokens")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for depth in (1, 8, 64):
            torch.manual_seed(0)
            layers = transformer_layers(depth, dim, heads=args.heads).to(device=args.device, dtype=dtype)
            blocks, params = revfunc.pure_blocks(layers)
            x = torch.randn(batch, seq, dim, device=args.device, dtype=dtype)
            errors = revfunc.reconstruction_error(blocks, params, x, x.clone())
            result["drift"].append({"dtype": str(dtype), "depth": depth, "max_error": max(errors)})
            print(f"  {str(dtype):15s} depth {depth:3d}  max error {max(errors):.3g}", flush=True)

    torch.manual_seed(0)
    depth = 8
    layers = transformer_layers(depth, dim, heads=args.heads).to(args.device)
    blocks, params = revfunc.pure_blocks(layers)
    x = torch.randn(batch, seq, dim, device=args.device)
    flat = [t for pair in params for p in pair for t in p.values()]

    def grads(fn, **options):
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            y1, y2 = fn(blocks, params, x, x.clone(), **options)
        return torch.cat([g.flatten() for g in torch.autograd.grad((y1 + y2).float().pow(2).mean(), flat)])

    ref = grads(revfunc.sequential_sequence)
    print(f"bf16 autocast, depth {depth}: parameter-gradient error vs plain autograd under the same autocast")
    for k in (None, 4, 2, 1):
        err = ((grads(revfunc.reversible_sequence, checkpoint_every=k) - ref).norm() / ref.norm()).item()
        saved = 2 + 2 * len(range(k, depth, k)) if k else 2
        result["autocast"].append({"checkpoint_every": k, "grad_error": err, "saved_stream_tensors": saved})
        print(f"  checkpoint_every={str(k):4s}  rel error {err:.3g}  stream tensors saved {saved}", flush=True)
    if args.classic and os.path.exists(args.classic):  # recomputes outside autocast: same model, same loss
        from revfunc.bench.cases import load_classic

        model = load_classic(args.classic).ReversibleSequence(layers)
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            y = model(x.clone().requires_grad_())
        y.float().pow(2).mean().backward()
        got = torch.cat([t.grad.flatten() for t in flat if t.grad is not None])
        err = ((got - ref).norm() / ref.norm()).item()
        result["classic_autocast_grad_error"] = err
        print(f"  classic reversible.py  rel error {err:.3g}", flush=True)
    return result


#: Depths and ``checkpoint_every`` values of a coupling's drift table.
COUPLING_DEPTHS = (1, 4, 8, 16, 32, 64)
COUPLING_KS = (None, 8, 4, 2)


def coupling_drift(args) -> dict:
    """``--drift --coupling NAME[:FACTOR]``: the reconstruction error of that coupling
    against depth in float32 and bfloat16, without and with ``checkpoint_every`` k.

    Blocks: the benchmark's transformer blocks (``affine``: MLP subnets); weights and
    inputs in each dtype; the figure is the max over blocks of
    :func:`revfunc.reconstruction_error` (the error the backward's rebuilt inputs carry).
    """
    import torch

    import revfunc
    from revfunc.bench.cases import coupling_of, is_flow
    from revfunc.testing.blocks import subnet_layers, transformer_layers

    c = coupling_of(args)
    dim, batch, seq = args.dim, args.batch, args.seq
    rows = []
    print(f"reconstruction drift of {c!r}, d={dim}, {batch}x{seq} tokens (max relative error of rebuilt inputs)")
    for dtype in (torch.float32, torch.bfloat16):
        for depth in COUPLING_DEPTHS:
            torch.manual_seed(0)
            if is_flow(args):
                layers = subnet_layers(depth, dim, hidden=4 * dim)
            else:
                layers = transformer_layers(depth, dim, heads=args.heads)
            layers = layers.to(device=args.device, dtype=dtype)
            blocks, params = revfunc.pure_blocks(layers)
            x1 = torch.randn(batch, seq, dim, device=args.device, dtype=dtype)
            x2 = torch.randn(batch, seq, dim, device=args.device, dtype=dtype)
            for k in COUPLING_KS:
                if k is not None and k >= depth:
                    continue
                errors = revfunc.reconstruction_error(blocks, params, x1, x2, coupling=c, checkpoint_every=k)
                rows.append({"dtype": str(dtype), "depth": depth, "checkpoint_every": k, "max_error": max(errors)})
                print(
                    f"  {str(dtype):15s} depth {depth:3d}  checkpoint_every={str(k):4s}  max error {max(errors):.3g}",
                    flush=True,
                )
    return {"coupling": repr(c), "divides": c.divides, "coupling_drift": rows}
