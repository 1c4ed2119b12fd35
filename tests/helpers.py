"""Shared test helpers: small float64 stacks and an independent reference loop."""

from __future__ import annotations

import torch

import revfunc
from revfunc.testing.blocks import mlp_layers


def make_stack(depth, dim=6, hidden=7, seed=0, dtype=torch.float64, dropout=0.0):
    """``(layers, blocks, params)`` of a small MLP stack with deterministic weights."""
    torch.manual_seed(seed)
    layers = mlp_layers(depth, dim, hidden, dropout).to(dtype)
    blocks, params = revfunc.pure_blocks(layers)
    return layers, blocks, params


def scaled_branch(p, x, scale=None):
    """A pure branch with a differentiable keyword: ``tanh(x W + b) * scale``."""
    out = torch.tanh(x @ p["w"] + p["b"])
    return out if scale is None else out * scale


def make_pure_stack(depth, dim=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def branch_params():
        return {
            "w": (torch.randn(dim, dim, generator=gen, dtype=dtype) / dim**0.5).requires_grad_(),
            "b": (torch.randn(dim, generator=gen, dtype=dtype) * 0.1).requires_grad_(),
        }

    blocks = [(scaled_branch, scaled_branch)] * depth
    params = [(branch_params(), branch_params()) for _ in range(depth)]
    return blocks, params


def inputs(shape, seed=1, dtype=torch.float64, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    x2 = torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(requires_grad)
    return x1, x2


def reference_loop(blocks, params, x1, x2, kwargs=None):
    """The coupling math written out independently of revfunc (plain autograd)."""
    for i, ((f, g), (fp, gp)) in enumerate(zip(blocks, params)):
        fk, gk = kwargs[i] if kwargs is not None else ({}, {})
        x1 = x1 + f(fp, x2, **fk)
        x2 = x2 + g(gp, x1, **gk)
    return x1, x2


def loss_of(y1, y2):
    """A loss that weighs both halves differently (so swapped halves would show)."""
    return (y1**2).sum() + torch.sin(y2).sum() * 0.5


def flat_params(params):
    return [t for pair in params for p in pair for t in p.values()]


def assert_all_close(actual, expected, rtol=1e-10, atol=1e-12):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, i=i: f"tensor {i}: {m}")


def saved_bytes(fn, exclude=()):
    """Bytes of tensors saved for backward while ``fn()`` runs, excluding ``exclude`` storages."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total[0], out


def spawn_and_wait(fn, args, nprocs, limit_s, what, init_file):
    """Run ``fn(rank, *args)`` in ``nprocs`` fresh gloo workers (``init_gloo`` /
    ``finish_gloo`` on ``init_file``); fail the test with every rank's exit code if one
    fails before finishing its work, or if they have not all finished within ``limit_s``
    seconds (they are killed then)."""
    import pytest

    from revfunc.bench.sharded import run_gloo_workers

    try:
        run_gloo_workers(fn, args, nprocs, init_file, limit_s, what)
    except RuntimeError as error:
        pytest.fail(str(error))
