"""Activation memory of one gradient step, measured in this (fresh) process.

Run as ``python tests/memprobe.py PATH METHOD DEPTH`` (or ``--all PATH:METHOD:DEPTH ...``,
each case in a process of its own forked from a parent that has only imported torch);
prints one JSON line per case with
``activation_bytes`` as :func:`revfunc.bench.measure.activation_bytes` measures it (the
benchmark's own recipe): the peak during the step above the level just before it, with
parameter gradients pre-allocated on the ``.backward()`` path and the returned gradients
subtracted on the others, after one identical warm-up step. Start it with
``revfunc.bench.measure.WORKER_ENV`` (``MALLOC_MMAP_THRESHOLD_=131072``).

METHOD ``revfunc`` is the memory-saving path; ``plain`` is the same math in plain
autograd (``revfunc.sequential_sequence``, ``revfunc.nn.SequentialSequence``), which
stores every activation and so must grow with depth in the same measurement. Paths
ending in ``_live`` differentiate the live ``nn.Parameter`` s that ``pure_blocks``
returns (the README's pattern); the others detached copies: the two take different
routes through torch.func.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import revfunc
import revfunc.nn as rnn
from revfunc.bench.cases import compile_step, vjp_train_step
from revfunc.bench.measure import activation_bytes
from revfunc.testing.blocks import mlp_layers, transformer_layers

FUNC_PATHS = ("func_grad", "grad_and_value", "vjp", "vmap_grad")
TRAINING_PATHS = ("accumulate", "optimizer_in_backward")  # the wide, short case
AFFINE_PATHS = ("backward_affine", "func_grad_affine")  # affine couplings, the log-det in the loss
FLOW_PATHS = ("backward_flow", "func_grad_flow")  # the same with a permutation layer after each block
PATHS = (
    "backward",
    "backward_save_on_cpu",
    "backward_checkpointed",
    "autograd_grad",
    *FUNC_PATHS,
    *(p + "_live" for p in FUNC_PATHS),
    *AFFINE_PATHS,
    *FLOW_PATHS,
    "compile_step",
    "compile_model_backward",
    "compile_func_grad",
    *TRAINING_PATHS,
)
# compile_func_grad: torch.compile of torch.func.grad_and_value over reversible_sequence
# itself. Dynamo drops the custom backward there (revfunc warns at trace time), so it is
# measured for the docs, not asserted flat (compile_step is the compiled path that keeps it).
DIM, HEADS, BATCH, TOKENS = 64, 4, 4, 256
WIDE_DIM, WIDE_TOKENS = 128, 512  # one block's parameter gradients: about 3 stream tensors


def _training_step(path: str, method: str, depth: int):
    """``.backward()`` on the wide, short case with gradients pre-allocated (accumulation),
    or with an SGD step in a post-accumulate-grad hook that then frees each gradient
    (optimizer in backward, as torchtune's ``optimizer_in_bwd``)."""
    from revfunc.bench.cases import _module

    layers = transformer_layers(depth, WIDE_DIM, heads=HEADS, causal=True)
    x = torch.randn(1, WIDE_TOKENS, WIDE_DIM, generator=torch.Generator().manual_seed(1))
    args = type("Args", (), {"classic": None})()
    model = rnn.ReversibleSequence(layers) if method == "revfunc" else _module(args, method, layers)
    live = list(layers.parameters())
    if path == "optimizer_in_backward":

        def sgd(p):
            with torch.no_grad():
                p.add_(p.grad, alpha=-1e-4)
            p.grad = None

        for p in live:
            p.register_post_accumulate_grad_hook(sgd)
        return (lambda: model(x).pow(2).mean().backward()), None

    def preallocate():
        for p in live:
            p.grad = torch.zeros_like(p)

    return (lambda: model(x).pow(2).mean().backward()), preallocate


def _affine_step(path: str, method: str, depth: int):
    """A flow-style stack: affine couplings of MLP subnets on ``(BATCH, TOKENS, 2 DIM)``
    split on the last dim, with the log-det in the loss (``.backward()`` on the nn
    adapter with gradients pre-allocated, or ``torch.func.grad`` of detached parameters)."""
    from revfunc.couplings import affine
    from revfunc.testing.blocks import subnet_layers

    layers = subnet_layers(depth, DIM, hidden=4 * DIM)
    x = torch.randn(BATCH, TOKENS, 2 * DIM, generator=torch.Generator().manual_seed(1))
    if path == "backward_affine":
        model = (rnn.ReversibleSequence if method == "revfunc" else rnn.SequentialSequence)(
            layers, coupling=affine(), split_dim=-1
        )
        live = list(layers.parameters())

        def step():
            y, logdet = model(x, return_logdet=True)
            (y.pow(2).mean() - logdet.mean()).backward()

        def preallocate():
            for p in live:
                p.grad = torch.zeros_like(p)

        return step, preallocate
    seq = revfunc.reversible_sequence if method == "revfunc" else revfunc.sequential_sequence
    blocks, live_params = revfunc.pure_blocks(layers)
    params = [tuple({k: v.detach() for k, v in p.items()} for p in pair) for pair in live_params]
    if path.endswith("_flow"):  # a permutation layer after each coupling block (FrEIA's PermuteRandom)
        from revfunc.invertible import permute

        g = torch.Generator().manual_seed(2)
        blocks = [b for pair in blocks for b in (pair, permute(torch.randperm(2 * DIM, generator=g)))]
        params = [e for pair in params for e in (pair, {})]
        live_params = [e for pair in live_params for e in (pair, {})]
    x1, x2 = x.chunk(2, -1)

    def loss(p):
        y1, y2, logdet = seq(blocks, p, x1, x2, coupling=affine(), return_logdet=True)
        return (y1 + y2).pow(2).mean() - logdet.mean()

    if path == "backward_flow":

        def preallocate_flow():
            for p in layers.parameters():
                p.grad = torch.zeros_like(p)

        return (lambda: loss(live_params).backward()), preallocate_flow
    return (lambda: torch.func.grad(loss)(params)), None


def _head(y1, y2):
    return (y1 + y2).pow(2).mean()


def make_step(path: str, method: str, depth: int):
    """``(step, prepare)``: a zero-argument callable running one gradient step and returning
    the gradients it returns (``None`` on ``.backward()``), and what to run before it."""
    torch.manual_seed(0)
    if path in TRAINING_PATHS:
        return _training_step(path, method, depth)
    if path in AFFINE_PATHS or path in FLOW_PATHS:
        return _affine_step(path, method, depth)
    # Compiled paths use MLP blocks: compile time grows with the graph, not the tensors.
    compiled = path.startswith("compile") and os.environ.get("MEMPROBE_BLOCKS") != "transformer"
    layers = mlp_layers(depth, DIM, hidden=4 * DIM) if compiled else transformer_layers(depth, DIM, heads=HEADS)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, TOKENS, DIM, generator=gen)
    seq = revfunc.reversible_sequence if method == "revfunc" else revfunc.sequential_sequence
    live = list(layers.parameters())

    if path in ("backward", "backward_save_on_cpu", "backward_checkpointed", "autograd_grad", "compile_model_backward"):
        model = (rnn.ReversibleSequence if method == "revfunc" else rnn.SequentialSequence)(layers)
        if path == "compile_model_backward":
            model = torch.compile(model)

        def preallocate():  # as during gradient accumulation: gradients exist before the step
            for p in live:
                p.grad = torch.zeros_like(p)

        if path == "autograd_grad":
            return (lambda: torch.autograd.grad(model(x).pow(2).mean(), live)), None
        if path == "backward_save_on_cpu":  # activation offloading around the model

            def offloaded():
                with torch.autograd.graph.save_on_cpu():
                    loss = model(x).pow(2).mean()
                loss.backward()

            return offloaded, preallocate
        if path == "backward_checkpointed":  # a trainer's gradient checkpointing around the whole model
            from torch.utils.checkpoint import checkpoint

            return (lambda: checkpoint(model, x, use_reentrant=False).pow(2).mean().backward()), preallocate
        if path == "compile_model_backward":
            # AOTAutograd compiles the whole backward into one node, which returns every
            # gradient at once for any method (plain too): measured from None gradients,
            # with the gradients it allocates subtracted, as the functional paths.
            def step():
                for p in live:
                    p.grad = None
                model(x).pow(2).mean().backward()
                return [p.grad for p in live]

            return step, None
        return (lambda: model(x).pow(2).mean().backward()), preallocate

    blocks, live_params = revfunc.pure_blocks(layers)
    params = (
        live_params
        if path.endswith("_live")
        else [tuple({k: v.detach() for k, v in p.items()} for p in pair) for pair in live_params]
    )
    base = path.removesuffix("_live")

    def loss(p, a, b):
        return _head(*seq(blocks, p, a, b))

    if base == "func_grad":
        return (lambda: torch.func.grad(loss)(params, x, x)), None
    if base == "grad_and_value":
        return (lambda: torch.func.grad_and_value(loss)(params, x, x)[0]), None
    if base == "vjp":

        def step():
            (y1, y2), vjp_fn = torch.func.vjp(lambda p: seq(blocks, p, x, x), params)
            return vjp_fn((torch.ones_like(y1), torch.ones_like(y2)))[0]

        return step, None
    if base == "vmap_grad":
        per_sample = torch.func.vmap(torch.func.grad(lambda p, a, b: loss(p, a[None], b[None])), in_dims=(None, 0, 0))
        return (lambda: per_sample(params, x, x)), None
    if path in ("compile_step", "compile_func_grad"):
        if method == "revfunc" and path == "compile_step":
            train_step = vjp_train_step(blocks, _head)
        else:

            def train_step(p, a, b):
                return torch.func.grad_and_value(loss)(p, a, b)

        if os.environ.get("MEMPROBE_REORDER") == "1":  # inductor's default, for comparison
            step_fn = torch.compile(train_step, fullgraph=True)
        else:
            step_fn = compile_step(train_step)
        return (lambda: step_fn(params, x, x)[0]), None
    raise ValueError(f"memprobe: path expected one of {PATHS}, got {path!r}")


def measure(path: str, method: str, depth: int) -> dict:
    torch.set_num_threads(1)
    step, prepare = make_step(path, method, depth)
    activation, returned = activation_bytes(step, "cpu", prepare)
    return {
        "path": path,
        "method": method,
        "depth": depth,
        "activation_bytes": activation,
        "returned_bytes": returned,
        "torch": torch.__version__,
    }


def _measure_case(case):
    path, method, depth = case
    return measure(path, method, int(depth))


def measure_all(cases, workers: int = 2):
    """Measure each ``(path, method, depth)`` in a process of its own, forked from this one
    before it has run any torch op (so each starts from the heap of a fresh interpreter
    with torch imported, without paying for the import again); ``workers`` at a time.
    Yields the records in the order they finish."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        yield from pool.imap_unordered(_measure_case, cases)


if __name__ == "__main__":
    # python tests/memprobe.py PATH METHOD DEPTH, or --all PATH:METHOD:DEPTH ...
    if sys.argv[1] == "--all":
        for record in measure_all([tuple(arg.split(":")) for arg in sys.argv[2:]]):
            print(json.dumps(record), flush=True)
    else:
        print(json.dumps(measure(sys.argv[1], sys.argv[2], int(sys.argv[3]))))
