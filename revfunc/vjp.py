"""An explicit reverse sweep: the memory-saving backward as a function you call.

:func:`reversible_vjp` returns the stack's output and a *pullback* that walks the blocks
in reverse, rebuilding each block's input from its output and back-propagating through
a recomputation of ``f`` and ``g`` (the same walk as :func:`revfunc.reversible_sequence`'s
backward). No ``autograd.Function`` is involved, so ``torch.compile`` traces the
recomputation itself: this is the path whose compiled gradient step keeps activation
memory constant in depth. (Inside ``torch.compile(torch.func.grad(...))``, Dynamo
inlines a custom Function's forward and drops its backward, so
``reversible_sequence`` there is differentiated as plain autograd.)

Dims: ``*`` any leading dims, ``d`` the width of one half of the stream.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from revfunc import _checks, _walk
from revfunc._plan import make_plan, validate
from revfunc._types import BlockKwargs, BlockParams, Blocks
from revfunc.couplings import CouplingSpec
from revfunc.sequence import check_context_fn

__all__ = ["reversible_vjp"]

#: ``pullback(dy1, dy2[, dlogdet]) -> (dparams, dx1, dx2)``.
Pullback = Callable[..., Tuple[List[Tuple[Dict[str, Optional[torch.Tensor]], ...]], torch.Tensor, torch.Tensor]]


def reversible_vjp(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    checkpoint_every: Optional[int] = None,
    deterministic: bool = False,
    context_fn: Optional[Callable[[], Tuple[Any, Any]]] = None,
    coupling: CouplingSpec = None,
    return_logdet: bool = False,
    event_dim: int = 1,
) -> Tuple[Tuple[torch.Tensor, ...], Pullback]:
    """Run a reversible stack and return its output with a memory-saving pullback.

    Like ``torch.func.vjp(lambda p, a, b: reversible_sequence(blocks, p, a, b), params,
    x1, x2)``, written out: the forward runs without recording (only ``(y1, y2)`` and the
    ``checkpoint_every`` boundaries are kept), and ``pullback(dy1, dy2)`` walks the
    blocks in reverse. Compile a whole training step with it:

        def step(params, x1, x2):
            (y1, y2), pullback = revfunc.reversible_vjp(blocks, params, x1, x2)
            (dy1, dy2), loss = torch.func.grad_and_value(head, argnums=(0, 1))(y1, y2)
            dparams, dx1, dx2 = pullback(dy1, dy2)
            return dparams, loss

        torch._inductor.config.reorder_for_locality = False  # before the first call
        step = torch.compile(step, fullgraph=True)

    (Inductor's locality reordering would hoist recomputation work out of the sweep and
    let memory grow with depth; ``torch.compile(options=...)`` did not turn it off in our
    runs, the global setting does. See docs/benchmarks.md.)

    Args:
        blocks, params, x1, x2, kwargs, generator, checkpoint_every, deterministic, context_fn:
            as in :func:`revfunc.reversible_sequence` (``context_fn`` eagerly only: a
            cached op output is used once, by the first pullback call). Random branches replay the forward's
            numbers in the pullback (inside ``torch.compile`` they need ``generator``).
        coupling, return_logdet, event_dim: as in :func:`revfunc.reversible_sequence`.
            With ``return_logdet`` the output is ``(y1, y2, logdet)`` and the pullback
            takes ``dlogdet`` as a third cotangent.

    Returns:
        ``((y1, y2), pullback)``. ``pullback(dy1, dy2)`` returns ``(dparams, dx1, dx2)``:
        ``dparams`` has the structure of ``params`` (a tensor used under several names gets
        each name's own term, as ``torch.func.vjp`` gives; zeros for unused floating
        tensors, ``None`` for non-floating ones such as integer buffers). ``kwargs``
        tensors are constants here. Call ``pullback`` once per forward or many times:
        it keeps only ``(y1, y2)``, the boundaries and the inputs.

    Shapes: (*, d), (*, d) -> ((*, d), (*, d)), pullback: (*, d), (*, d) -> (params, (*, d), (*, d)).
    Pure: as :func:`revfunc.reversible_sequence`; records no autograd graph (its results
        do not require grad: use it instead of, not inside, ``torch.func.grad``).
    Differentiable in: nothing through autograd; the pullback *is* the derivative.

    Raises:
        TypeError, ValueError: bad arguments (before any computation); cotangents whose
            shape, dtype or device differ from the output's.

    Example:
        >>> import torch, revfunc
        >>> f = g = lambda p, x: torch.tanh(x @ p["w"])
        >>> params = [({"w": torch.eye(3)}, {"w": torch.eye(3)})] * 2
        >>> x1, x2 = torch.randn(2, 3), torch.randn(2, 3)
        >>> (y1, y2), pullback = revfunc.reversible_vjp([(f, g)] * 2, params, x1, x2)
        >>> dparams, dx1, dx2 = pullback(torch.ones_like(y1), torch.zeros_like(y2))
        >>> dparams[0][0]["w"].shape, dx1.shape
        (torch.Size([3, 3]), torch.Size([2, 3]))
    """
    where = "revfunc.reversible_vjp"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    _checks.check_positive_int(where, "checkpoint_every", checkpoint_every)
    _checks.check_bool(where, "deterministic", deterministic)
    check_context_fn(where, context_fn)
    _checks.check_logdet_args(where, return_logdet, event_dim, x1)
    # One slot per leaf (no identity dedupe): each name gets its own gradient term.
    plan, tensors = make_plan(
        where,
        blocks,
        params,
        kwargs,
        generator,
        x1,
        x2,
        checkpoint_every=checkpoint_every,
        dedupe=False,
        replay=True,
        deterministic=deterministic,
        context_fn=context_fn,
        coupling=coupling,
        logdet=return_logdet,
        event_dim=event_dim,
    )
    param_slots = [[b[0] for b in block] for block in plan.binds]  # [(name, slot), ...] per branch
    is_param = {j for block in param_slots for branch in block for _, j in branch}
    needs = [j in is_param and t.is_floating_point() for j, t in enumerate(tensors)]
    with torch.no_grad():
        saved = list(_walk.reversible_forward(plan, x1, x2, tensors))
    logdet = saved.pop() if return_logdet else None
    y1, y2 = saved[0], saved[1]

    def pullback(dy1: torch.Tensor, dy2: torch.Tensor, dlogdet: Optional[torch.Tensor] = None):
        _checks.check_stream_pair(where, dy1, dy2, ("dy1", "dy2"))
        _checks.check_stream_pair(where, y1, dy1, ("y1", "dy1"))
        if dlogdet is not None:
            if logdet is None:
                raise ValueError(
                    _checks.msg(
                        where,
                        "dlogdet",
                        "None (the call returned no log-det)",
                        _checks.describe(dlogdet),
                        "Pass return_logdet=True.",
                    )
                )
            if not isinstance(dlogdet, torch.Tensor) or dlogdet.shape != logdet.shape:
                raise ValueError(
                    _checks.msg(
                        where,
                        "dlogdet",
                        f"a tensor shaped like the log-det {tuple(logdet.shape)}",
                        _checks.describe(dlogdet),
                    )
                )
        with torch.no_grad():
            dx1, dx2, grads = _walk.backward(plan, dy1, dy2, [*saved, *tensors], needs, dlogdet=dlogdet)
        return _unflatten_grads(param_slots, tensors, grads), dx1, dx2

    return ((y1, y2) if logdet is None else (y1, y2, logdet)), pullback


def _unflatten_grads(param_slots, tensors, grads):
    """Per-leaf gradients in the structure of ``params``, from each branch's slots."""

    def leaf(j):
        if grads[j] is not None:
            return grads[j]
        return torch.zeros_like(tensors[j]) if tensors[j].is_floating_point() else None

    return [tuple({name: leaf(j) for name, j in branch} for branch in block) for block in param_slots]
