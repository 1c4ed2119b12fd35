"""The one ``torch.autograd.Function`` behind :func:`revfunc.reversible_sequence`.

This is the only module that touches ``ctx``. ``forward`` runs the whole stack without
storing activations; ``setup_context`` saves the final ``(y1, y2)``, the exact
boundary states kept by ``checkpoint_every`` and the caller's tensors (parameters,
keyword tensors) with ``ctx.save_for_backward``; ``backward`` walks the blocks in
reverse, rebuilding each block's input from its output and back-propagating through a
recomputation of ``f`` and ``g`` with ``torch.func.vjp``. Parameter gradients are
*returned*, never written to ``.grad``.

All per-call state (the blocks, where each flat tensor goes, the child seeds, the
autocast state) lives in a :class:`Plan` passed as the first argument and kept on
``ctx``, so two forwards followed by two backwards each get their own gradients.

``torch.compile(fullgraph=True)`` on torch 2.13 needs a fixed number of positional
arguments in ``forward``: :func:`function_for` makes (and caches) one Function class per
tensor count.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from revfunc import _checks
from revfunc.random import call_branch

# (param_slots, differentiable_kwarg_slots, other_kwarg_slots, static_kwargs) for one branch.
Bind = Tuple[Tuple[Tuple[str, int], ...], Tuple[Tuple[str, int], ...], Tuple[Tuple[str, int], ...], Dict[str, Any]]


class Plan:
    """Everything non-tensor about one call of a reversible stack (immutable after build).

    Attributes:
        where: the public function name, for messages.
        blocks: the ``(f, g)`` pairs.
        binds: per block, per branch, where its params / kwargs come from in the flat
            tensor list, plus its non-tensor kwargs.
        seeds: per block ``(f_seed, g_seed)`` child seeds, or ``None`` (run as is).
        exact: sorted state indices ``j`` (input of block ``j``) kept exactly.
        autocast: ``(device_type, dtype, enabled)`` at forward, replayed in backward.
    """

    __slots__ = ("where", "blocks", "binds", "seeds", "exact", "autocast")

    def __init__(self, where, blocks, binds, seeds, exact, autocast):
        self.where = where
        self.blocks = blocks
        self.binds = binds
        self.seeds = seeds
        self.exact = exact
        self.autocast = autocast

    def seed(self, index: int, branch: int) -> Optional[int]:
        return None if self.seeds is None else self.seeds[index][branch]


def bind(b: Bind, tensors: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The ``(params, kwargs)`` of one branch call, from the flat tensor list."""
    param_slots, diff_slots, other_slots, static = b
    params = {name: tensors[j] for name, j in param_slots}
    kwargs = dict(static)
    for name, j in diff_slots:
        kwargs[name] = tensors[j]
    for name, j in other_slots:
        kwargs[name] = tensors[j]
    return params, kwargs


def run_forward(plan: Plan, x1: torch.Tensor, x2: torch.Tensor, tensors: Sequence[torch.Tensor]):
    """The stack's forward, storing only the states listed in ``plan.exact``.

    Returns ``(y1, y2, *boundaries)`` where ``boundaries`` alternates x1, x2 of each
    exact state.
    """
    exact = plan.exact
    boundaries: List[torch.Tensor] = []
    for i, (f, g) in enumerate(plan.blocks):
        (fp, fk), (gp, gk) = bind(plan.binds[i][0], tensors), bind(plan.binds[i][1], tensors)
        fx = call_branch(f, fp, x2, fk, plan.seed(i, 0))
        _checks.check_output_shape(plan.where, fx, x2, i, "f")
        y1 = x1 + fx
        gy = call_branch(g, gp, y1, gk, plan.seed(i, 1))
        _checks.check_output_shape(plan.where, gy, y1, i, "g")
        x1, x2 = y1, x2 + gy
        if i + 1 in exact:
            boundaries += (x1, x2)
    return (x1, x2, *boundaries)


def _replay(autocast, fn, params, x, kwargs, seed):
    """Recompute one branch under the forward's autocast state (the only autocast scope:
    the vjp itself runs outside it, as plain autograd's backward does)."""
    device_type, dtype, enabled = autocast
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return call_branch(fn, params, x, kwargs, seed)


def _branch_vjp(fn, b, tensors, needs, x, cotangent, seed, eager, autocast):
    """``fn``'s output at ``x`` and the vjp of ``cotangent`` w.r.t. (params, kwargs, x).

    Returns ``(out, grads, x_grad)`` with ``grads`` as ``{flat_slot: tensor}`` for the
    flat tensors (params and kwargs) that need a gradient.
    """
    param_slots, diff_slots, other_slots, static = b
    diff_p, fixed_p = {}, {}
    for name, j in param_slots:
        (diff_p if needs[j] and tensors[j].is_floating_point() else fixed_p)[name] = tensors[j]
    diff_k, fixed_k = {}, dict(static)
    for name, j in diff_slots:
        (diff_k if needs[j] else fixed_k)[name] = tensors[j]
    for name, j in other_slots:
        fixed_k[name] = tensors[j]

    slot_p = dict(param_slots)
    slot_k = dict(diff_slots)
    if eager:
        out, gp, gk, gx = _autograd_vjp(fn, fixed_p, diff_p, fixed_k, diff_k, x, cotangent, seed, autocast)
    else:
        def call(p, k, inp):
            return _replay(autocast, fn, {**fixed_p, **p}, inp, {**fixed_k, **k}, seed)

        out, vjp_fn = torch.func.vjp(call, diff_p, diff_k, x)
        gp, gk, gx = vjp_fn(cotangent.to(out.dtype))
    grads = {slot_p[name]: v for name, v in gp.items()}
    for name, v in gk.items():
        grads[slot_k[name]] = grads[slot_k[name]] + v if slot_k[name] in grads else v
    return out, grads, gx


def _autograd_vjp(fn, fixed_p, diff_p, fixed_k, diff_k, x, cotangent, seed, autocast):
    """The same vjp with ``torch.autograd.grad`` (plain eager first-order backward only).

    The parameters in ``diff_p`` are the caller's, as saved: the recomputation's graph
    reaches them directly (no ``functional_call`` swap when they are a module's live
    parameters), and ``autograd.grad`` returns their gradients without touching
    ``.grad``; parameters with tensor hooks are aliased so the hooks run once.
    """
    # Tensor hooks would fire on this inner gradient and again when autograd hands the
    # returned one to the caller: differentiate through fresh aliases in that case.
    if any(getattr(t, "_backward_hooks", None) for t in diff_p.values()):
        diff_p = {name: t.detach().requires_grad_() for name, t in diff_p.items()}
    diff_k = {name: t.detach().requires_grad_() for name, t in diff_k.items()}
    with torch.enable_grad():
        xin = x.detach().requires_grad_()
        out = _replay(autocast, fn, {**fixed_p, **diff_p}, xin, {**fixed_k, **diff_k}, seed)
        inputs = (xin, *diff_p.values(), *diff_k.values())
        grads = torch.autograd.grad(out, inputs, cotangent.to(out.dtype), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    n = len(diff_p)
    gp = dict(zip(diff_p, grads[1:1 + n]))
    gk = dict(zip(diff_k, grads[1 + n:]))
    return out.detach(), gp, gk, grads[0]


def run_backward(plan: Plan, dy1, dy2, saved: Sequence[torch.Tensor], needs: Sequence[bool]):
    """Walk the blocks in reverse: rebuild inputs, recompute, back-propagate.

    Args:
        dy1, dy2: cotangents of the final outputs (``None`` counts as zero).
        saved: ``(y1, y2, *boundaries, *tensors)`` as saved in ``setup_context``.
        needs: ``needs_input_grad`` of the flat tensors.

    Returns:
        ``(dx1, dx2, grads)`` with ``grads[j]`` the gradient of flat tensor ``j`` (or None).
    """
    y1, y2 = saved[0], saved[1]
    nb = 2 * len(plan.exact)
    bounds = saved[2:2 + nb]
    tensors = saved[2 + nb:]
    exact = {j: (bounds[2 * m], bounds[2 * m + 1]) for m, j in enumerate(plan.exact)}
    dy1 = torch.zeros_like(y1) if dy1 is None else dy1
    dy2 = torch.zeros_like(y2) if dy2 is None else dy2
    grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
    # Plain first-order eager backward takes the cheaper torch.autograd.grad path; under
    # create_graph (double backward), torch.func transforms or torch.compile, torch.func.vjp.
    eager = not (torch.is_grad_enabled() or torch.compiler.is_compiling()
                 or torch._C._functorch.peek_interpreter_stack() is not None)
    for i in range(len(plan.blocks) - 1, -1, -1):
        f, g = plan.blocks[i]
        if i + 1 in exact:
            y1, y2 = exact[i + 1]
        gy, g_grads, dy1_g = _branch_vjp(g, plan.binds[i][1], tensors, needs, y1, dy2, plan.seed(i, 1), eager,
                                         plan.autocast)
        a1 = dy1 + dy1_g
        x2 = exact[i][1] if i in exact else y2 - gy
        fx, f_grads, dx2_f = _branch_vjp(f, plan.binds[i][0], tensors, needs, x2, a1, plan.seed(i, 0), eager,
                                         plan.autocast)
        dy1, dy2 = a1, dy2 + dx2_f
        if i > 0 and i not in exact:
            y1, y2 = y1 - fx, x2
        for block_grads in (g_grads, f_grads):
            for j, v in block_grads.items():
                grads[j] = v if grads[j] is None else grads[j] + v
    return dy1, dy2, grads


class _ReversibleBase(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan = inputs[0]
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output, *inputs[3:])

    @staticmethod
    def backward(ctx, dy1, dy2, *_boundary_grads):
        needs = ctx.needs_input_grad
        dx1, dx2, grads = run_backward(ctx.plan, dy1, dy2, ctx.saved_tensors, needs[3:])
        return (None, dx1 if needs[1] else None, dx2 if needs[2] else None, *grads)


def _make_function(n_tensors: int) -> type:
    names = [f"t{i}" for i in range(n_tensors)]
    args = "".join(f", {n}" for n in names)
    tup = "(" + "".join(f"{n}, " for n in names) + ")"
    namespace: Dict[str, Any] = {"run_forward": run_forward}
    exec(f"def forward(plan, x1, x2{args}):\n    return run_forward(plan, x1, x2, {tup})\n", namespace)
    return type(
        f"ReversibleSequenceFunction{n_tensors}",
        (_ReversibleBase,),
        {"forward": staticmethod(namespace["forward"]), "__module__": __name__},
    )


@torch.compiler.assume_constant_result
def _function_name(n_tensors: int) -> str:
    name = f"ReversibleSequenceFunction{n_tensors}"
    if name not in globals():
        globals()[name] = _make_function(n_tensors)
    return name


def function_for(n_tensors: int) -> type:
    """The Function class whose ``forward(plan, x1, x2, t0, ..., t{n-1})`` has fixed arity.

    Classes are made once per tensor count and kept as globals of this module, so that
    Dynamo sees them as ordinary module attributes (guardable) inside ``torch.compile``.
    """
    return getattr(_this_module, _function_name(n_tensors))


_this_module = sys.modules[__name__]
