"""The one ``torch.autograd.Function`` behind :func:`revfunc.reversible_sequence`.

This module only defines the Function; it is the only user of ``ctx``. ``forward`` runs
the block walk (``revfunc._walk``) without storing activations, its checks hoisted
around it; ``setup_context`` saves the final ``(y1, y2)``, the ``boundaries`` states
kept by ``checkpoint_every`` and the caller's tensors (parameters, keyword tensors)
with ``ctx.save_for_backward``; ``backward`` runs the backward walk. Under a
``torch.func`` grad transform the walk runs one functorch level down
(``revfunc._levels``), so nothing is recorded at the transform's level. Parameter
gradients are *returned*, never written to ``.grad``.

All per-call state lives in the :class:`revfunc._plan.Plan` passed as the first argument
and kept on ``ctx``, so two forwards followed by two backwards each get their own gradients.

``torch.compile(fullgraph=True)`` on torch 2.13 needs a fixed number of positional
arguments in ``forward``: :func:`function_for` makes (and caches) one Function class per
tensor count for compiled code; eager calls use the variadic
:class:`ReversibleSequenceFunction` (binding arguments to a fixed-arity signature costs
time per tensor on every call).
"""

from __future__ import annotations

import sys
from typing import Any, Dict

import torch

from revfunc import _walk
from revfunc._levels import backward_after_transform, backward_one_level_down, current_grad_interpreter, \
    from_exited_transform
from revfunc._plan import Plan


def run_forward(plan: Plan, x1: torch.Tensor, x2: torch.Tensor, tensors):
    """The Function's forward: ``(y1, y2, *kept)``, checks hoisted around the walk."""
    y1, y2, kept = _walk.checked(plan, tensors, x1.device, lambda watch: _walk.forward(plan, x1, x2, tensors, watch))
    return (y1, y2, *kept)


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
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        interpreter = None if plan.higher_order else current_grad_interpreter()
        if interpreter is not None:
            dx1, dx2, grads = backward_one_level_down(interpreter, plan, dy1, dy2, saved, needs[3:], _walk.backward)
        elif not plan.higher_order and torch.is_grad_enabled() and from_exited_transform(saved):
            dx1, dx2, grads = backward_after_transform(plan, dy1, dy2, saved, needs[3:], _walk.backward)
        else:
            dx1, dx2, grads = _walk.backward(plan, dy1, dy2, saved, needs[3:])
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


class ReversibleSequenceFunction(_ReversibleBase):
    """The eager Function: ``forward(plan, x1, x2, *tensors)``.

    ``Function.apply`` binds its arguments to ``forward``'s signature on every call
    (``inspect``), which costs time per parameter of a fixed-arity ``forward``: eager
    calls use this variadic one instead.
    """

    @staticmethod
    def forward(plan, x1, x2, *tensors):
        return run_forward(plan, x1, x2, tensors)


def function_for(n_tensors: int) -> type:
    """The Function class to apply to ``(plan, x1, x2, t0, ..., t{n-1})``.

    Eager: :class:`ReversibleSequenceFunction`. Inside ``torch.compile`` (torch 2.13
    needs a fixed number of positional arguments there) one class whose
    ``forward(plan, x1, x2, t0, ..., t{n-1})`` has fixed arity, made once per tensor
    count and kept as a global of this module, so that Dynamo sees an ordinary module
    attribute (guardable).
    """
    if not torch.compiler.is_compiling():
        return ReversibleSequenceFunction
    return getattr(_this_module, _function_name(n_tensors))


_this_module = sys.modules[__name__]
