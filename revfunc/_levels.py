"""Where revfunc's backward runs among ``torch.func`` levels, and guards at a level.

``torch.func.grad``/``vjp`` run a custom Function's backward at their own level with
``create_graph=True``; revfunc's backward runs one level down instead (see
``revfunc._function``) and attaches these guards to its results, so that differentiating
them again at the level that recorded nothing raises instead of giving zeros.
"""

from __future__ import annotations

import torch

SAME_LEVEL = (
    "{where}: the gradient it returned is being differentiated again at the same torch.func level "
    "(e.g. torch.autograd.grad(..., create_graph=True) inside torch.func.grad, then a second gradient "
    "of that). By default its backward records nothing there, to keep activation memory constant in "
    "depth. Pass higher_order=True to record the recomputation (O(depth) memory), or nest transforms "
    "instead (torch.func.grad(torch.func.grad(f)) and jacrev(jacrev(f)) work without it)."
)


def current_grad_interpreter():
    """The functorch ``grad``/``vjp`` interpreter on top of the stack, or ``None``."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return None
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

    interpreter = retrieve_current_functorch_interpreter()
    return interpreter if interpreter.key() == TransformType.Grad else None


def records_below() -> bool:
    """Whether a functorch grad/jvp level below the current one will record our ops."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if torch._C._functorch.peek_interpreter_stack() is None:
        return False
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def _guard_at_level(level: int, results, anchors, message: str):
    """Return ``results`` unchanged in value, attached at functorch ``level`` to a node whose
    backward raises ``message``: differentiating them again at that level is an error, not
    a silent zero. ``anchors`` are tensors of that level that require grad (so the node
    attaches); the node saves nothing."""
    from torch._C._functorch import _unwrap_for_grad, _wrap_for_grad
    from torch._functorch.autograd_function import enable_single_level_autograd_function

    n = len(results)

    class NotTwiceAtThisLevel(torch.autograd.function._SingleLevelFunction):
        @staticmethod
        def forward(*ts):
            return tuple(_wrap_for_grad(_unwrap_for_grad(t, level), level) for t in ts[:n])

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, *grads):
            raise RuntimeError(message)

    with enable_single_level_autograd_function():
        return NotTwiceAtThisLevel.apply(*results, *anchors)  # type: ignore[attr-defined]  # private base class


class _NotTwiceAtBase(torch.autograd.Function):
    """Plain-autograd twin of :func:`_guard_at_level` (``results`` then ``anchors``)."""

    @staticmethod
    def forward(ctx, n, message, *ts):
        ctx.message = message
        return tuple(t.view_as(t) for t in ts[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def guarded(results, anchors, message, level=None):
    """Guard the defined tensors of ``results`` (at ``level``, or plain autograd if None)."""
    anchors = [a for a in anchors if a is not None and a.requires_grad]
    index = [k for k, r in enumerate(results) if r is not None]
    if not anchors or not index:
        return results
    defined = [results[k] for k in index]
    if level is None:
        out = _NotTwiceAtBase.apply(len(defined), message, *defined, *anchors)
    else:
        out = _guard_at_level(level, defined, anchors, message)
    results = list(results)
    for k, r in zip(index, out):
        results[k] = r
    return results


def backward_one_level_down(interpreter, plan, dy1, dy2, saved, needs, walk, dlogdet=None):
    """``walk`` (the backward block walk) for a ``torch.func`` grad level, recorded only below it.

    ``torch.func.grad``/``vjp`` differentiate with ``create_graph=True`` and would record
    every block's recomputation at their own level, keeping it alive through the returned
    gradients (O(depth) memory). Here the saved tensors are unwrapped from that level and
    the walk runs one level down, so outer transforms (``grad(grad)``, ``vmap(grad)``)
    still see it, and the results are rewrapped. When no grad level is left below, the
    walk also records nothing at base; results that base autograd could otherwise
    differentiate get a node that raises (never a silent detach).
    """
    import contextlib

    from torch._C._functorch import _unwrap_for_grad, _wrap_for_grad

    level = interpreter.level()

    def unwrap(t):
        return None if t is None else _unwrap_for_grad(t, level)

    saved_down = [unwrap(t) for t in saved]
    anchors = tuple(saved_down)  # the walk drops y1/y2 from its list; the saved variables keep them anyway
    message = SAME_LEVEL.format(where=plan.where)
    with interpreter.lower():
        records = records_below()
        base_grad = torch.is_grad_enabled()
        with contextlib.nullcontext() if records else torch.no_grad():
            dx1, dx2, grads = walk(
                plan, unwrap(dy1), unwrap(dy2), saved_down, needs, captures=False, dlogdet=unwrap(dlogdet)
            )
        results = [dx1, dx2, *grads]
        if not records and base_grad and torch._C._functorch.peek_interpreter_stack() is None:
            results = guarded(results, anchors, message)
    results = [None if r is None else _wrap_for_grad(r, level) for r in results]
    if torch.is_grad_enabled():
        results = guarded(results, (dy1, dy2, dlogdet, *saved), message, level)
    return results[0], results[1], results[2:]


def from_exited_transform(saved) -> bool:
    """Whether the saved tensors belong to a ``torch.func`` level that has exited: the
    backward is then run by the ``vjp_fn`` that ``torch.func.vjp`` returned, at base
    with ``create_graph`` on (grad mode), outside the transform."""
    from torch._C._functorch import is_functorch_wrapped_tensor, maybe_get_level

    if torch._C._functorch.peek_interpreter_stack() is not None:  # e.g. vmap(vjp_fn) in jacrev: walk as usual
        return False
    return any(t is not None and is_functorch_wrapped_tensor(t) and maybe_get_level(t) == -2 for t in saved)


def backward_after_transform(plan, dy1, dy2, saved, needs, walk, dlogdet=None):
    """``walk`` for a ``vjp_fn`` called after its ``torch.func.vjp`` returned.

    That ``vjp_fn`` differentiates with ``create_graph=True`` at base, so with live
    parameters (which require grad at base) every block's recomputation would be
    recorded and kept alive by the returned gradients. The walk runs without recording
    instead, and the results get a node that raises if they are differentiated again
    (``higher_order=True`` records, for that case).
    """
    from torch._C._functorch import get_unwrapped, is_functorch_wrapped_tensor, maybe_get_level

    def unwrap(t):  # the exited level's wrappers only
        while t is not None and is_functorch_wrapped_tensor(t) and maybe_get_level(t) == -2:
            t = get_unwrapped(t)
        return t

    with torch.no_grad():
        dx1, dx2, grads = walk(
            plan, unwrap(dy1), unwrap(dy2), [unwrap(t) for t in saved], needs, captures=False, dlogdet=unwrap(dlogdet)
        )
    results = guarded([dx1, dx2, *grads], saved, SAME_LEVEL.format(where=plan.where))
    return results[0], results[1], results[2:]
