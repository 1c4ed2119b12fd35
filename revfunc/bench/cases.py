"""The benchmark's methods as runnable training steps on the same blocks and inputs.

A :class:`Case` is one method at one depth: ``run()`` does one forward and backward and
returns the gradients it *allocated and returned* (functional steps) or ``None``
(module steps, which accumulate into ``.grad``). :func:`vjp_train_step` is the
compiled-friendly training step on :func:`revfunc.reversible_vjp`, shared with the
memory tests.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional

MODULE_METHODS = ("plain", "checkpoint", "classic", "revfunc")
# Selective saving: the attention kernels' outputs kept per block (revfunc.selective.save_attention),
# in revfunc's walk and as torch.utils.checkpoint's context_fn.
SELECTIVE_METHODS = ("checkpoint+attn", "revfunc+attn")
FUNCTIONAL_METHODS = ("plain/func.grad", "revfunc/func.grad")
COMPILED_STEPS = ("plain/func.grad+compile", "revfunc/vjp+compile")
FLOORS = ("floor/f", "floor/g")  # one branch's recomputation and vjp alone (memory only)


def coupling_of(args):
    """``--coupling NAME[:FACTOR]`` as a :class:`revfunc.couplings.Coupling` (``None`` for
    additive): ``scaled:0.5``, ``momentum:0.9``, ``affine`` (clamp 2) or ``affine:3``."""
    spec = getattr(args, "coupling", None) or "additive"
    name, _, factor = spec.partition(":")
    from revfunc import couplings

    if name == "additive":
        return None
    if name not in ("scaled", "momentum", "affine"):
        raise SystemExit(
            f"revfunc.bench: --coupling expected additive, scaled:A, momentum:G or affine[:CLAMP], got {spec!r}"
        )
    if name == "affine":
        return couplings.affine(clamp=float(factor) if factor else 2.0)
    return getattr(couplings, name)(float(factor) if factor else {"scaled": 0.5, "momentum": 0.9}[name])


def is_flow(args) -> bool:
    """An ``affine`` run: MLP subnets with twice the half's width out, ``x`` of ``2 d``
    features split on the last dim, the log-det in the loss (revfunc.testing.blocks.subnet_layers)."""
    c = coupling_of(args)
    return c is not None and c.output == "pair"


def autocast(args):
    import torch

    if not getattr(args, "amp", None):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    return torch.autocast(torch.device(args.device).type, dtype=dtype)


def vjp_train_step(blocks, head: Callable, autocast_fn=contextlib.nullcontext):
    """``step(params, x1, x2) -> (grads, loss)`` on :func:`revfunc.reversible_vjp`: the
    explicit reverse sweep, which ``torch.compile(step, fullgraph=True)`` traces whole
    (activation memory flat in depth). ``head(y1, y2)`` is the rest of the model and the loss."""
    import torch

    import revfunc

    def step(params, x1, x2):
        with autocast_fn():
            (y1, y2), pullback = revfunc.reversible_vjp(blocks, params, x1, x2)
        (dy1, dy2), loss = torch.func.grad_and_value(head, argnums=(0, 1))(y1, y2)
        return pullback(dy1, dy2)[0], loss

    return step


def compile_step(step):
    """``torch.compile(step, fullgraph=True)`` with inductor's locality reordering off (it
    hoists recomputation out of a reverse sweep; ``options=`` did not turn it off)."""
    import torch
    import torch._inductor.config

    torch._inductor.config.reorder_for_locality = False
    return torch.compile(step, fullgraph=True)


class Case:
    """One method at one depth. ``model`` is the module of eager module methods (``None``
    for functional and compiled ones, whose saved tensors hooks cannot count)."""

    def __init__(self, run: Callable[[], Optional[list]], params: List, model=None, x=None):
        self.run, self.params, self.model, self.x = run, params, model, x

    def clear(self) -> None:
        """Gradients back to ``None``, as ``optimizer.zero_grad()`` leaves them."""
        for p in self.params:
            p.grad = None
        if self.x is not None:
            self.x.grad = None

    def preallocate(self) -> None:
        """Parameter gradients allocated and zeroed (as during gradient accumulation, or
        ``zero_grad(set_to_none=False)``): memory measured above this level is activation."""
        import torch

        for p in self.params:
            p.grad = torch.zeros_like(p)
        if self.x is not None:
            self.x.grad = None

    def optimizer_in_backward(self, lr: float = 1e-6) -> None:
        """An SGD step in each parameter's post-accumulate-grad hook, which then frees the
        gradient (torchtune's ``optimizer_in_bwd``): gradients never exist all at once."""
        import torch

        def step(p):
            with torch.no_grad():
                p.add_(p.grad, alpha=-lr)
            p.grad = None

        for p in self.params:
            p.register_post_accumulate_grad_hook(step)


def build(args, method: str, depth: int, seq: Optional[int] = None) -> Case:
    """The :class:`Case` of ``method`` at ``depth`` on ``x`` of shape (batch, seq, dim)."""
    import torch

    from revfunc.testing.blocks import subnet_layers, transformer_layers

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    flow = is_flow(args)
    if flow:
        layers = subnet_layers(depth, args.dim, hidden=4 * args.dim)
    else:
        layers = transformer_layers(depth, args.dim, heads=args.heads, causal=args.causal)
    layers = layers.to(device=args.device, dtype=dtype)
    width = 2 * args.dim if flow else args.dim
    x = torch.randn(args.batch, seq or args.seq, width, device=args.device, dtype=dtype, requires_grad=True)
    params = list(layers.parameters())
    if method.startswith("floor/"):
        return _floor_case(args, method, layers, x.detach()[..., : args.dim])
    if "/" in method:
        return Case(_functional_step(args, method, layers, x.detach()), params)
    base, variant = method.partition("+")[::2]
    model = _module(args, base, layers, saving=variant == "attn")
    forward = torch.compile(model) if variant == "compile" else model

    def run():
        with autocast(args):
            y = forward(x)
        if flow:  # (y, logdet): a flow's loss has the log-det in it
            (y[0].float().pow(2).mean() - y[1].float().mean()).backward()
        else:
            y.float().pow(2).mean().backward()

    return Case(run, params, None if variant == "compile" else model, x)


def _floor_case(args, method: str, layers, x) -> Case:
    """One branch's recomputation and vjp alone, in plain autograd: ``floor/f`` is block 0's
    attention, ``floor/g`` its feed-forward. No reversible backward can hold less than
    this (plus the stream state it carries), so it is the reference for revfunc's peak."""
    import torch

    branch = layers[0][0 if method == "floor/f" else 1]
    params = list(branch.parameters())
    with torch.no_grad():
        cotangent = torch.randn_like(branch(x))  # shaped like the branch output (twice x's width for affine)

    def run():
        with autocast(args):
            xin = x.detach().requires_grad_()
            out = branch(xin)
        return list(torch.autograd.grad(out, [xin, *params], cotangent.to(out.dtype)))

    return Case(run, params)


def _head(y1, y2):
    return (y1 + y2).float().pow(2).mean()


def _functional_step(args, method: str, layers, x):
    import torch

    import revfunc

    base, mode = method.split("/")
    blocks, params = revfunc.pure_blocks(layers)
    seq = revfunc.reversible_sequence if base == "revfunc" else revfunc.sequential_sequence

    def loss(p):
        with autocast(args):
            y1, y2 = seq(blocks, p, x, x)
        return _head(y1, y2)

    if mode == "func.grad":
        return lambda: torch.utils._pytree.tree_leaves(torch.func.grad(loss)(params))
    params = [({k: t.detach() for k, t in fp.items()}, {k: t.detach() for k, t in gp.items()}) for fp, gp in params]
    if base == "revfunc":
        step = vjp_train_step(blocks, _head, lambda: autocast(args))
        compiled = compile_step(lambda p: step(p, x, x))
    else:
        compiled = compile_step(lambda p: torch.func.grad_and_value(loss)(p))
    return lambda: torch.utils._pytree.tree_leaves(compiled(params)[0])


def load_classic(path: str):
    """The classic ``reversible.py`` at ``path``, imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("classic_reversible", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"revfunc.bench: --classic expected a Python file, got {path!r}")
    classic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(classic)
    return classic


def _module(args, method: str, layers, saving: bool = False):
    """The module of a module method; ``saving``: keep the attention kernels' outputs."""
    import torch
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    from revfunc.selective import save_attention

    context_fn = save_attention if saving else None
    c, flow = coupling_of(args), is_flow(args)
    if method == "revfunc":
        from revfunc.nn import ReversibleSequence

        model = ReversibleSequence(layers, context_fn=context_fn, coupling=c, split_dim=-1 if flow else None)
        if not flow:
            return model

        class Flow(nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, x):
                return self.model(x, return_logdet=True)

        return Flow()
    if method == "classic":
        return load_classic(args.classic).ReversibleSequence(layers)
    update = (lambda x, h: x + h) if c is None else c.forward

    def couple(x1, x2, f, g):
        y1 = update(x1, f(x2))
        return y1, update(x2, g(y1))

    class Coupled(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            x1, x2 = x.chunk(2, -1) if flow else (x, x)
            logdet = 0.0
            for f, g in self.layers:
                if flow:  # the same math written as one plain pass, log-det and all
                    h = c.prepared(f(x2))  # the soft clamp once per update, as revfunc's walk
                    s_f = c.logdet(x1, h).sum(-1)
                    x1 = c.forward(x1, h)
                    h = c.prepared(g(x1))
                    logdet = logdet + s_f + c.logdet(x2, h).sum(-1)
                    x2 = c.forward(x2, h)
                elif method == "checkpoint" and saving:
                    x1, x2 = checkpoint(couple, x1, x2, f, g, use_reentrant=False, context_fn=context_fn)
                elif method == "checkpoint":
                    x1, x2 = checkpoint(couple, x1, x2, f, g, use_reentrant=False)
                else:
                    x1, x2 = couple(x1, x2, f, g)
            return (torch.cat([x1, x2], -1), logdet) if flow else x1 + x2

    return Coupled()
