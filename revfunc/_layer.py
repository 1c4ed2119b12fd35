"""The invertible-layer step: one :class:`revfunc.invertible.Invertible` block, run the one
way every path runs it.

The block walk (``revfunc._walk``) calls these where a block is a layer instead of a
coupling pair, so every path (the chain of per-block nodes, the whole-stack Function
under ``torch.func`` and ``torch.compile``, ``reversible_vjp``, the plain forward, the
inverse, drift checks) runs a layer the same way:

- :func:`forward`: binds the layer's parameters and keywords from the flat tensor list,
  runs ``layer.forward`` (with the block's child seed, like a branch), names the block in
  any error, checks the output, and returns the log-det term in the stack's convention;
- :func:`inverse`: ``layer.inverse``, checked the same way;
- :func:`backward`: rebuilds the layer's input with ``inverse`` (or takes the exact one
  kept at a ``checkpoint_every`` boundary), recomputes ``forward`` under the forward's
  autocast state and back-propagates the two halves' cotangents and the log-det's through
  it, with the branch's helpers (``revfunc._branch``): the same aliasing of the caller's
  tensors, the same capture check, the same three modes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Dict, Tuple

import torch

from revfunc import _checks
from revfunc._branch import (
    Watch,
    _bind_with,
    _diff_slots,
    _differentiated,
    _is_reentrant,
    _watched,
    check_captures,
    in_forward_autocast,
    pull,
    rng_states,
    same_states,
)
from revfunc._plan import LAYER, Plan, bind
from revfunc.random import call_branch


def _run(plan: Plan, i: int, fn, params, a: torch.Tensor, b: torch.Tensor, kwargs):
    """``fn(params, a, b, **kwargs)`` with block ``i``'s child seed (as a branch runs)."""
    return call_branch(fn, params, a, kwargs, plan.seed(i, 0), (b,))


def _call(plan: Plan, i: int, which: str, a: torch.Tensor, b: torch.Tensor, tensors, watch: Watch):
    """Run the layer's ``which`` (``"forward"`` or ``"inverse"``) at ``(a, b)``, with the
    checks of a branch call: errors name the block; ``watch`` refuses writes to the input
    (and with ``ALL``/``RNG`` to the parameters, and the global RNG)."""
    layer = plan.blocks[i]
    params, kwargs = bind(plan.binds[i][0], tensors)
    label = f"{LAYER}'s {which}"
    watched = rng_before = None
    before: Any = None
    if watch >= Watch.ALL:
        watched = _watched(params, a, kwargs) + [("input", "x2", b)]
        before = [t._version for _, _, t in watched]
    elif watch:
        before = (a._version, b._version)
    if watch == Watch.RNG:
        rng_before = rng_states(a.device)
    with _naming_errors(plan, i, label, layer, a):
        out = _run(plan, i, getattr(layer, which), params, a, b, kwargs)
    if watch == Watch.INPUT and (a._version, b._version) != before:
        raise _checks.mutation_error(plan.where, i, label, layer, "its input")
    if watched is not None:
        for (kind, name, t), version in zip(watched, before):
            if t._version != version:
                what = "its input" if kind == "input" else f"{kind} {name!r}"
                raise _checks.mutation_error(plan.where, i, label, layer, what)
    if rng_before is not None and not same_states(rng_before, rng_states(a.device)):
        raise _checks.rng_error(plan.where, i, label)
    return _checks.check_layer_output(plan.where, out, a, b, i, layer, which, plan.event_dim)


@contextlib.contextmanager
def _naming_errors(plan: Plan, i: int, label: str, layer, a: torch.Tensor):
    """A call of one of the layer's functions (``label``): its errors re-raised naming the
    block and the container (as a branch call's are)."""
    try:
        yield
    except TypeError as error:
        raise _checks.branch_type_error(plan.where, i, label, layer, error) from error
    except (RuntimeError, ValueError) as error:
        if str(error).startswith("revfunc."):  # already names its call
            raise
        raise _checks.branch_runtime_error(plan.where, i, label, layer, a, error) from error


def logdet_term(plan: Plan, logdet, x1: torch.Tensor) -> torch.Tensor:
    """The layer's log-det as the stack sums it: shaped ``x1.shape[:-event_dim]``, ``x1.dtype``."""
    batch = x1.shape[: x1.dim() - plan.event_dim]
    return torch.broadcast_to(torch.as_tensor(logdet, dtype=x1.dtype, device=x1.device), batch)


def forward(plan: Plan, i: int, tensors, x1: torch.Tensor, x2: torch.Tensor, watch: Watch = Watch.NONE):
    """Block ``i``, a layer: ``(y1, y2, log-det term or None)`` (``None`` unless ``plan.logdet``)."""
    y1, y2, logdet = _call(plan, i, "forward", x1, x2, tensors, watch)
    return y1, y2, logdet_term(plan, logdet, x1) if plan.logdet else None


def inverse(plan: Plan, i: int, y1: torch.Tensor, y2: torch.Tensor, tensors, watch: Watch = Watch.NONE):
    """Block ``i``'s input ``(x1, x2)`` rebuilt from its output: ``layer.inverse``."""
    return _call(plan, i, "inverse", y1, y2, tensors, watch)


def backward(
    plan: Plan,
    i: int,
    state: list,
    tensors,
    needs,
    mode: str,
    captures: bool = True,
    boundary_input=None,
    rebuild: bool = True,
    dlogdet=None,
):
    """:func:`revfunc._walk.block_backward` for a layer: the same arguments and results
    (``state`` ``[y1, y2, dy1, dy2]`` emptied here; ``(x1, x2, dx1, dx2, grads)``).

    Memory: the rebuilt input, the output's cotangents and one recomputation of the layer.
    """
    dy2, dy1, y2, y1 = state.pop(), state.pop(), state.pop(), state.pop()
    try:
        if boundary_input is None:
            x1, x2 = inverse(plan, i, y1, y2, tensors)
        else:
            x1, x2 = boundary_input
        dy1 = torch.zeros_like(y1) if dy1 is None else dy1
        dy2 = torch.zeros_like(y2) if dy2 is None else dy2
        y1 = y2 = None
        dx1, dx2, grads = _vjp(plan, i, tensors, needs, x1, x2, dy1, dy2, dlogdet, mode, captures)
    except RuntimeError as error:
        if str(error).startswith(plan.where):
            raise
        raise _checks.recomputation_error(plan.where, i, LAYER, error) from error
    if not rebuild:
        x1 = x2 = None
    return x1, x2, dx1, dx2, grads


def _replay(plan: Plan, i: int, params, a: torch.Tensor, b: torch.Tensor, kwargs):
    """The layer's forward recomputed under the forward's autocast state."""
    fn = plan.blocks[i].forward
    y1, y2, logdet = in_forward_autocast(plan, lambda: _run(plan, i, fn, params, a, b, kwargs))
    return (y1, y2, logdet_term(plan, logdet, a)) if plan.logdet else (y1, y2)


def _vjp(plan: Plan, i: int, tensors, needs, x1, x2, dy1, dy2, dlogdet, mode: str, captures: bool):
    """``(dx1, dx2, {flat slot: gradient})``: the vjp of the layer's forward at ``(x1, x2)``
    for the cotangents of its halves and (``plan.logdet``) of its log-det."""
    b = plan.binds[i][0]
    slots = _diff_slots(b, tensors, needs)
    if plan.blocks[i].vjp is not None and not any(j in slots for _, j in b.diff_kwargs):
        return _closed_form_vjp(plan, i, b, tensors, slots, x1, x2, dy1, dy2, dlogdet if plan.logdet else None)
    cotangents: Tuple[torch.Tensor, ...] = (dy1, dy2)
    if plan.logdet:
        batch = x1.shape[: x1.dim() - plan.event_dim]
        cotangents += (torch.zeros(batch, dtype=x1.dtype, device=x1.device) if dlogdet is None else dlogdet,)
    if mode == "func":

        def run(diff, a, c):
            params, kwargs = _bind_with(b, tensors, dict(zip(slots, diff)))
            return _replay(plan, i, params, a, c, kwargs)

        traced = torch.func.vjp(run, tuple(tensors[j] for j in slots), x1, x2)
        outs, pullback = traced[0], traced[1]
        cotangents = tuple(g.to(o.dtype) for g, o in zip(cotangents, outs))
        del outs
        pulled = pullback(cotangents)  # (slot gradients, dx1, dx2)
        return pulled[1], pulled[2], dict(zip(slots, pulled[0]))
    create_graph = mode == "graph"
    fn = plan.blocks[i].forward
    into_aliases = not create_graph and _is_reentrant(fn)  # a reentrant checkpoint inside (see _branch.pull)
    with torch.enable_grad():
        replaced, x1in = _differentiated(tensors, slots, x1, create_graph, into_aliases)
        x2in = x2.view_as(x2) if create_graph and x2.requires_grad else x2.detach().requires_grad_()
        params, kwargs = _bind_with(b, tensors, replaced)
        outs = tuple(
            o.view_as(o) if o.grad_fn is None and o.requires_grad else o
            for o in _replay(plan, i, params, x1in, x2in, kwargs)
        )
        inputs = (x1in, x2in, *(replaced.get(j, tensors[j]) for j in slots))
        del params, kwargs, replaced
    if captures and not create_graph:
        check_captures(plan, i, 0, plan.blocks[i], outs, inputs)
    live = [(o, g.to(o.dtype)) for o, g in zip(outs, cotangents) if o.grad_fn is not None]
    del outs
    grads = pull(fn, live, inputs, create_graph, into_aliases)
    if grads is None:  # fn is now marked: again, on aliases
        return _vjp(plan, i, tensors, needs, x1, x2, dy1, dy2, dlogdet, mode, captures)
    dx1 = torch.zeros_like(x1) if grads[0] is None else grads[0]
    dx2 = torch.zeros_like(x2) if grads[1] is None else grads[1]
    out: Dict[int, torch.Tensor] = {j: g for j, g in zip(slots, grads[2:]) if g is not None}
    return dx1, dx2, out


def _closed_form_vjp(plan: Plan, i: int, b, tensors, slots, x1, x2, dy1, dy2, dlogdet):
    """:func:`_vjp` by the layer's own ``vjp`` (no recomputation of ``forward``)."""
    layer = plan.blocks[i]
    params, kwargs = bind(b, tensors)
    with _naming_errors(plan, i, f"{LAYER}'s vjp", layer, x1):
        result = layer.vjp(params, x1, x2, dy1, dy2, dlogdet, **kwargs)
    what = f"block {i} {LAYER} {layer!r}'s vjp"
    kinds, expected = (torch.Tensor, torch.Tensor, Mapping), "a triple (dx1, dx2, dict of parameter gradients)"
    dx1, dx2, dparams = _checks.check_vjp_result(plan.where, what, result, kinds, expected)
    if dx1.shape != x1.shape or dx2.shape != x2.shape:
        raise ValueError(
            _checks.msg(
                plan.where,
                what,
                f"gradients shaped like the halves {tuple(x1.shape)}, {tuple(x2.shape)}",
                f"shapes {tuple(dx1.shape)}, {tuple(dx2.shape)}",
            )
        )
    grads: Dict[int, torch.Tensor] = {}
    for name, j in b.params:
        g = dparams.get(name)
        if j not in slots or g is None:
            continue
        if not isinstance(g, torch.Tensor) or g.shape != tensors[j].shape:
            raise ValueError(
                _checks.msg(
                    plan.where,
                    f"{what} gradient of params[{name!r}]",
                    f"a tensor shaped like the parameter {tuple(tensors[j].shape)}",
                    _checks.describe(g),
                )
            )
        grads[j] = g if j not in grads else grads[j] + g
    return dx1, dx2, grads
