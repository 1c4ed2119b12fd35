"""Peak activation memory of one gradient step, measured in this (fresh) process.

Run as ``python tests/memprobe.py PATH METHOD DEPTH``; prints one JSON line with
``activation_bytes``: the peak resident set size during the measured step (``VmHWM``,
reset through ``/proc/self/clear_refs`` just before it) minus the level right before
it, minus the bytes of the gradients the step returns (every method allocates those).
A first, identical step runs before the measured one, so one-off costs (thread pools,
``torch.compile``'s compilation) are not counted. Start it with
``MALLOC_MMAP_THRESHOLD_=131072`` so freed tensors go back to the OS at once.

METHOD ``revfunc`` is the memory-saving path; ``plain`` is the same math in plain
autograd (``revfunc.sequential_sequence``, ``revfunc.nn.SequentialSequence``), which
stores every activation and so must grow with depth in the same measurement.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import revfunc
import revfunc.nn as rnn
from revfunc.testing.blocks import mlp_layers, transformer_layers

PATHS = ("backward", "autograd_grad", "func_grad", "func_grad_live", "grad_and_value", "vjp", "vmap_grad", "compile_step",
         "compile_model_backward", "compile_func_grad")
# compile_func_grad: torch.compile of torch.func.grad_and_value over reversible_sequence
# itself. Dynamo drops the custom backward there, so it is measured for the docs, not
# asserted flat (tests/test_memory.py covers the compiled path that keeps the saving).
DIM, HEADS, BATCH, TOKENS = 64, 4, 4, 256


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_leaves(tree)
               if isinstance(t, torch.Tensor))


def _head(y1, y2):
    return (y1 + y2).pow(2).mean()


def make_step(path: str, method: str, depth: int):
    """A zero-argument callable running one gradient step; it returns the gradients."""
    torch.manual_seed(0)
    # Compiled paths use MLP blocks: compile time grows with the graph, not the tensors.
    compiled = path.startswith("compile") and os.environ.get("MEMPROBE_BLOCKS") != "transformer"
    layers = mlp_layers(depth, DIM, hidden=4 * DIM) if compiled else transformer_layers(depth, DIM, heads=HEADS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TOKENS, DIM, generator=gen)
    seq = revfunc.reversible_sequence if method == "revfunc" else revfunc.sequential_sequence

    if path in ("backward", "autograd_grad", "compile_model_backward"):
        model = (rnn.ReversibleSequence if method == "revfunc" else rnn.SequentialSequence)(layers)
        if path == "compile_model_backward":
            model = torch.compile(model)
        live = list(layers.parameters())

        def step():
            loss = model(x).pow(2).mean()
            if path == "autograd_grad":
                return torch.autograd.grad(loss, live)
            for p in live:
                p.grad = None
            loss.backward()
            return [p.grad for p in live]

        return step

    # Functional paths: pure functions over plain (detached) parameter dicts.
    blocks, live_params = revfunc.pure_blocks(layers)
    params = [tuple({k: v.detach() for k, v in p.items()} for p in pair) for pair in live_params]

    def loss(p, a, b):
        return _head(*seq(blocks, p, a, b))

    if path == "func_grad":
        return lambda: torch.func.grad(loss)(params, x, x)
    if path == "func_grad_live":  # the README's first example: live nn.Parameters from pure_blocks
        return lambda: torch.func.grad(loss)(live_params, x, x)
    if path == "grad_and_value":
        return lambda: torch.func.grad_and_value(loss)(params, x, x)[0]
    if path == "vjp":
        def step():
            (y1, y2), vjp_fn = torch.func.vjp(lambda p: seq(blocks, p, x, x), params)
            return vjp_fn((torch.ones_like(y1), torch.ones_like(y2)))[0]
        return step
    if path == "vmap_grad":
        per_sample = torch.func.vmap(torch.func.grad(lambda p, a, b: loss(p, a[None], b[None])), in_dims=(None, 0, 0))
        return lambda: per_sample(params, x[:2], x[:2])
    if path in ("compile_step", "compile_func_grad"):
        if method == "revfunc" and path == "compile_step":
            def train_step(p, a, b):
                (y1, y2), pullback = revfunc.reversible_vjp(blocks, p, a, b)
                (dy1, dy2), value = torch.func.grad_and_value(_head, argnums=(0, 1))(y1, y2)
                return pullback(dy1, dy2)[0], value
        else:
            def train_step(p, a, b):
                return torch.func.grad_and_value(loss)(p, a, b)
        backend = os.environ.get("MEMPROBE_BACKEND", "inductor")
        # Inductor's locality reordering hoists recomputation work out of the reverse
        # sweep (measured: about 1 MiB per transformer block); the README turns it off,
        # globally (options= did not). Same setting for both methods.
        if os.environ.get("MEMPROBE_REORDER") != "1":
            torch._inductor.config.reorder_for_locality = False
        step_fn = torch.compile(train_step, fullgraph=True, backend=backend)
        return lambda: step_fn(params, x, x)[0]
    raise ValueError(f"memprobe: path expected one of {PATHS}, got {path!r}")


def measure(path: str, method: str, depth: int) -> dict:
    torch.set_num_threads(1)
    step = make_step(path, method, depth)
    step()  # warm-up: compilation, thread pools, allocator arenas
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    grads = step()
    peak = _status("VmHWM")
    return {"path": path, "method": method, "depth": depth, "activation_bytes": peak - before - _bytes(grads),
            "grad_bytes": _bytes(grads), "torch": torch.__version__}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
