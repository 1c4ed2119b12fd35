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
        return NotTwiceAtThisLevel.apply(*results, *anchors)


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
