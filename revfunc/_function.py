"""The ``torch.autograd.Function`` s behind :func:`revfunc.reversible_sequence`.

This module only defines them; it is the only user of ``ctx``. :class:`BlockFunction`
is one node per block, chained through the rebuilt stream (``revfunc._chain``): eager
autograd outside ``torch.func`` transforms and ``torch.compile``, so each block's
gradients reach their accumulators as soon as its backward ends. The sequence Function
below wraps the whole stack in one node: under transforms, where gradients are returned
values, and inside ``torch.compile``. ``forward`` runs
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
from revfunc._levels import (
    backward_after_transform,
    backward_one_level_down,
    current_grad_interpreter,
    from_exited_transform,
)


class _ReversibleBase(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan = inputs[0]
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        # The outputs are (y1, y2, *kept) and the log-det last (plan.logdet), not saved.
        ctx.save_for_backward(*(output[:-1] if plan.logdet else output), *inputs[3:])

    @staticmethod
    def backward(ctx, dy1, dy2, *rest):
        needs = ctx.needs_input_grad
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        dlogdet = rest[-1] if plan.logdet else None
        interpreter = None if plan.higher_order else current_grad_interpreter()
        if interpreter is not None:
            dx1, dx2, grads = backward_one_level_down(
                interpreter, plan, dy1, dy2, saved, needs[3:], _walk.backward, dlogdet
            )
        elif not plan.higher_order and torch.is_grad_enabled() and from_exited_transform(saved):
            dx1, dx2, grads = backward_after_transform(plan, dy1, dy2, saved, needs[3:], _walk.backward, dlogdet)
        else:
            dx1, dx2, grads = _walk.backward(plan, dy1, dy2, saved, needs[3:], dlogdet=dlogdet)
        return (None, dx1 if needs[1] else None, dx2 if needs[2] else None, *grads)


def _make_function(n_tensors: int) -> type:
    names = [f"t{i}" for i in range(n_tensors)]
    args = "".join(f", {n}" for n in names)
    tup = "(" + "".join(f"{n}, " for n in names) + ")"
    namespace: Dict[str, Any] = {"run_forward": _walk.reversible_forward}
    exec(f"def forward(plan, x1, x2{args}):\n    return run_forward(plan, x1, x2, {tup})\n", namespace)
    return type(
        f"ReversibleSequenceFunction{n_tensors}",
        (_ReversibleBase,),
        {"forward": staticmethod(namespace["forward"]), "__module__": __name__},
    )


def _function_name(n_tensors: int) -> str:
    name = f"ReversibleSequenceFunction{n_tensors}"
    if name not in globals():
        globals()[name] = _make_function(n_tensors)
    return name


# What torch.compiler.assume_constant_result does (on torch 2.11 and 2.13), without
# importing torch._dynamo when revfunc is imported (about 2 s).
_function_name._dynamo_marked_constant = True  # type: ignore[attr-defined]


class ReversibleSequenceFunction(_ReversibleBase):
    """The eager Function: ``forward(plan, x1, x2, *tensors)``.

    ``Function.apply`` binds its arguments to ``forward``'s signature on every call
    (``inspect``), which costs time per parameter of a fixed-arity ``forward``: eager
    calls use this variadic one instead.
    """

    @staticmethod
    def forward(plan, x1, x2, *tensors):
        return _walk.reversible_forward(plan, x1, x2, tensors)


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


class BlockFunction(torch.autograd.Function):
    """One block of a chain of nodes, one per block (``revfunc._chain``): eager autograd
    outside transforms, so each block's parameter gradients reach their accumulators
    (and their hooks: DDP's, FSDP2's, post-accumulate-grad) as soon as its backward ends.

    ``forward(plan, tape, i, watch, x1, x2, *block_tensors)`` runs block ``i`` unrecorded.
    Nothing between blocks is saved: the last node saves the final ``(y1, y2)``, a node at
    a ``boundaries`` state its input; every other node's backward takes its output from
    ``tape``, where the next block's backward left the input it rebuilt. Each node saves
    its own parameters and keyword tensors with ``ctx.save_for_backward``.
    """

    @staticmethod
    def forward(ctx, plan, tape, i, watch, x1, x2, *block_tensors):
        # ctx-style forward: Function.apply binds a setup_context Function's arguments to
        # its signature (inspect) on every call, which would cost more than a small block.
        # This Function never runs under torch.func transforms, which need setup_context.
        view = dict(zip(tape.positions[i], block_tensors))  # {flat slot: tensor}, what bind reads
        if i == 0 and watch:
            x2 = x2.clone()  # f sees a copy: a branch that writes its input cannot reach the caller's
        y1, y2, term = _walk.block_forward(plan, i, view, x1, x2, watch, True)
        ctx.plan, ctx.tape, ctx.index = plan, tape, i
        ctx.set_materialize_grads(False)
        extra = ()
        if i == len(plan.blocks) - 1:
            extra = (y1, y2)
        elif i in plan.boundaries:
            extra = (x1, x2)
        ctx.save_for_backward(*block_tensors, *extra)
        if plan.logdet:  # this block's term of the stack's log-det (the chain sums them)
            return y1, y2, _walk.zero_logdet(plan, y1) if term is None else term
        return y1, y2

    @staticmethod
    def backward(ctx, dy1, dy2, *dlogdet):
        plan, tape, i = ctx.plan, ctx.tape, ctx.index
        saved = ctx.saved_tensors
        position = tape.positions[i]
        n = len(position)
        view = dict(zip(position, saved[:n]))  # {flat slot: tensor}
        needs = dict(zip(position, ctx.needs_input_grad[6:]))  # after the 6 leading arguments
        last = i == len(plan.blocks) - 1
        boundary_input = saved[n : n + 2] if not last and i in plan.boundaries else None
        y1, y2 = saved[n : n + 2] if last else tape.take(i)
        rebuild = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        x1, x2, dx1, dx2, grads = _walk.block_backward(
            plan,
            i,
            [y1, y2, dy1, dy2],
            view,
            needs,
            _walk.backward_mode(),
            boundary_input=boundary_input,
            rebuild=i > 0 and rebuild,
            dlogdet=dlogdet[0] if dlogdet else None,
        )
        if i > 0 and rebuild:
            tape.put(i - 1, x1, x2)
        x1 = x2 = None
        out = [None] * n
        for j, g in grads.items():
            out[position[j]] = g
        return (
            None,
            None,
            None,
            None,
            dx1 if ctx.needs_input_grad[4] else None,
            dx2 if ctx.needs_input_grad[5] else None,
            *out,
        )
