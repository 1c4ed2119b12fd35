"""Reversible stacks of coupling blocks: memory-saving forward, inverse, and reference.

Dims: ``*`` any leading dims (batch, tokens, ...), ``d`` the width of one half.
A stack applies blocks ``(f_i, g_i)``, ``i = 0..L-1``, in order:
``x1 <- x1 + f_i(x2); x2 <- x2 + g_i(x1)``.
"""

from __future__ import annotations

import collections
import math
import warnings
from typing import Any, Callable, List, Optional, Tuple, Union

import torch

from revfunc import _chain, _checks, _walk
from revfunc._function import function_for
from revfunc._plan import Plan, make_plan, validate
from revfunc._tolerances import default_tolerances
from revfunc._types import BlockKwargs, BlockParams, Blocks
from revfunc.couplings import CouplingSpec

__all__ = [
    "reversible_sequence",
    "reversible_inverse",
    "sequential_sequence",
    "reconstruction_error",
    "ReconstructionError",
]


class ReconstructionError(RuntimeError):
    """A rebuilt block input drifted past the tolerance (or is not finite)."""


def reversible_sequence(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    checkpoint_every: Optional[int] = None,
    check_reconstruction: Union[None, bool, float] = None,
    higher_order: bool = False,
    deterministic: bool = False,
    context_fn: Optional[Callable[[], Tuple[Any, Any]]] = None,
    coupling: CouplingSpec = None,
    return_logdet: bool = False,
    event_dim: int = 1,
) -> Tuple[torch.Tensor, ...]:
    """Apply a stack of coupling blocks with activation memory constant in depth.

    Block ``i`` computes ``y1 = c_f(x1, f_i(x2)); y2 = c_g(x2, g_i(y1))``, with the
    additive coupling ``x + h`` by default (see :mod:`revfunc.couplings`). Nothing between
    blocks is kept: only the final ``(y1, y2)``, the ``checkpoint_every`` states and the
    tensors passed in are saved; backward rebuilds each block's input from its output and
    recomputes ``f``/``g`` under the forward's autocast state and seeds. On eager
    ``loss.backward()`` / ``torch.autograd.grad`` the stack is a chain of one autograd node
    per block, so each block's gradients reach their accumulators as soon as its backward
    ends; under ``torch.func`` transforms and ``torch.compile`` one
    ``torch.autograd.Function`` wraps the whole stack. Gradients reach ``x1``, ``x2``,
    every tensor in ``params`` and every floating tensor in ``kwargs`` through plain
    autograd, so this composes with ``loss.backward()``,
    ``torch.autograd.grad``, ``torch.func.grad``/``vjp``/``vmap`` and ``torch.compile``.

    Args:
        blocks: ``[(f, g), ...]`` branch functions ``fn(params, x, **kwargs)``, shape-preserving.
        params: ``[(f_params, g_params), ...]`` dicts of tensors, one pair per block.
        x1, x2: the two halves of the stream: floating, same shape, dtype and device.
        kwargs: ``None`` or ``[(f_kwargs, g_kwargs), ...]`` (see :func:`revfunc.route_args`).
            Tensors become inputs of the Function; other values are closed over.
        generator: source of the call's one base seed (see :mod:`revfunc.random`). ``None``:
            one draw from the global RNG when a backward can follow (grad enabled and an
            input requires grad); none under ``torch.no_grad()`` or inside
            ``torch.compile``, where branches use the global RNG as is.
        checkpoint_every: keep the exact stream every ``k`` blocks (memory O(L/k)); bounds
            reconstruction drift in deep low-precision stacks. ``None``: keep none.
        check_reconstruction: debug check. ``True`` or a float tolerance: before the
            memory-saving forward, run the stack, rebuild every block input from the
            output and raise :class:`ReconstructionError` naming the first block whose
            relative error exceeds the tolerance, scanning in backward order (``True``: the dtype's default in
            :data:`revfunc.testing.DEFAULT_TOLERANCES`). Costs two extra forwards and
            O(L) memory during the check.
        higher_order: under a ``torch.func`` transform, record the backward's
            recomputation at the transform's own level, so that the returned gradient can
            be differentiated again at that same level (``torch.autograd.grad(...,
            create_graph=True)`` inside ``torch.func.grad``, then another gradient). Costs
            O(L) activation memory. Not needed for nested transforms
            (``grad(grad(f))``, ``jacrev(jacrev(f))``) nor for ``create_graph=True``
            outside transforms, which work (at O(L) memory) either way; without it, the
            same-level case raises instead of returning a wrong result.
        deterministic: declare that no branch draws random numbers: with no generator,
            no seed is drawn and no RNG state is forked. The forward checks the global
            RNG around each branch and raises if one did draw (never a silent wrong
            gradient). ``revfunc.nn.ReversibleSequence`` sets it in eval mode.
        context_fn: selective saving, as in ``torch.utils.checkpoint``: a callable
            returning two context managers (``create_selective_checkpoint_contexts``);
            each branch's forward runs in the first, its rebuild and recomputation in
            the second, so the ops its policy saves are not re-run in backward (their
            outputs are kept per block until the backward passes it). E.g.
            :data:`revfunc.selective.save_attention`. With ``loss.backward()`` /
            ``torch.autograd.grad``; not under ``torch.func`` transforms or ``torch.compile``.
        coupling: how each branch output updates its half: one
            :class:`revfunc.couplings.Coupling` for every update, a pair ``(c_f, c_g)``
            for every block, or one pair per block. ``None``: additive, exactly as
            without the argument.
        return_logdet: also return the stack's log-determinant ``log|det dy/dx|``, summed
            over both updates of every block and over the last ``event_dim``
            dimensions: shape ``x1.shape[:-event_dim]``. Differentiable like the outputs.
        event_dim: as ``torch.distributions.Transform.event_dim`` (``1``: one value per
            row; ``3`` for ``(B, C, H, W)`` halves).

    Memory: activations are O(1) in depth for ``loss.backward()``, ``torch.autograd.grad``,
    ``torch.func.grad``/``grad_and_value``/``vjp``, ``vmap(grad)`` and ``torch.compile`` of
    the forward with an eager backward. Inside ``torch.compile`` of a ``torch.func``
    gradient step, Dynamo drops the custom backward (it differentiates the forward as
    plain autograd, O(L)): compile :func:`revfunc.reversible_vjp` instead.

    Returns:
        ``(y1, y2)``, the final stream, or ``(y1, y2, logdet)`` with ``return_logdet``.

    Shapes: (*, d), (*, d) -> (*, d), (*, d)[, (*,)].
    Pure: reads ``params``/``kwargs``; draws one seed from ``generator`` (or the global
        RNG); every global RNG state is restored after each branch call.
    Differentiable in: x1, x2, params, floating kwargs tensors; not the generator,
        integer/bool kwargs (masks) or non-tensor kwargs.

    Raises:
        TypeError, ValueError: bad arguments (before any computation).
        RuntimeError: forward-mode AD. :class:`ReconstructionError` with
            ``check_reconstruction``.

    Example:
        >>> import torch, revfunc
        >>> f = g = lambda p, x: torch.tanh(x @ p["w"])
        >>> params = [({"w": torch.eye(4)}, {"w": torch.eye(4)})] * 3
        >>> x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
        >>> y1, y2 = revfunc.reversible_sequence([(f, g)] * 3, params, x1, x2)
        >>> z1, z2 = revfunc.reversible_inverse([(f, g)] * 3, params, y1, y2)
        >>> torch.allclose(z1, x1, atol=1e-6) and torch.allclose(z2, x2, atol=1e-6)
        True
    """
    return apply_stack(
        blocks,
        params,
        x1,
        x2,
        kwargs=kwargs,
        generator=generator,
        checkpoint_every=checkpoint_every,
        check_reconstruction=check_reconstruction,
        higher_order=higher_order,
        deterministic=deterministic,
        context_fn=context_fn,
        coupling=coupling,
        return_logdet=return_logdet,
        event_dim=event_dim,
    )


def apply_stack(
    blocks,
    params,
    x1,
    x2,
    *,
    kwargs=None,
    generator=None,
    checkpoint_every=None,
    check_reconstruction=None,
    higher_order=False,
    deterministic=False,
    context_fn=None,
    units=None,
    where="revfunc.reversible_sequence",
    coupling=None,
    return_logdet=False,
    event_dim=1,
):
    """:func:`reversible_sequence`, plus what the nn adapter passes: ``units``
    (:attr:`revfunc._plan.Plan.units`) for blocks sharded with FSDP2, and ``where``, the
    public name that messages start with (the container's)."""
    validate(where, blocks, params, x1, x2, kwargs, generator)
    _checks.check_positive_int(where, "checkpoint_every", checkpoint_every)
    _checks.check_bool(where, "higher_order", higher_order)
    _checks.check_bool(where, "deterministic", deterministic)
    _check_tolerance_arg(where, check_reconstruction)
    check_context_fn(where, context_fn)
    _checks.check_logdet_args(where, return_logdet, event_dim, x1)
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime  # imported by torch.compile already

        comptime(_warn_if_compiled_under_transform)  # runs once, at trace time
    checking = check_reconstruction is not None and check_reconstruction is not False
    plan, tensors = make_plan(
        where,
        blocks,
        params,
        kwargs,
        generator,
        x1,
        x2,
        checkpoint_every=checkpoint_every,
        reverse_mode_only=True,
        higher_order=higher_order,
        deterministic=deterministic,
        replay=True if checking else None,
        context_fn=context_fn,
        units=units,
        coupling=coupling,
        logdet=return_logdet,
        event_dim=event_dim,
    )
    if checking:
        _check_drift(plan, x1, x2, tensors, check_reconstruction)
    chain = (
        not higher_order
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is None
    )
    if chain:
        return _chain.apply(plan, x1, x2, tensors)  # eager autograd: gradients leave block by block
    if units is not None and torch.is_grad_enabled():
        raise _checks.sharded_blocks_error(higher_order)
    out = function_for(len(tensors)).apply(plan, x1, x2, *tensors)
    return (out[0], out[1], out[-1]) if return_logdet else (out[0], out[1])


def check_context_fn(where: str, context_fn) -> None:
    """``context_fn``: ``None`` or a callable, used eagerly outside ``torch.func`` transforms."""
    _checks.check_context_fn_type(where, context_fn)
    if context_fn is None:
        return
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        raise RuntimeError(
            f"{where}: context_fn (selective saving) is unsupported under torch.func transforms and inside "
            "torch.compile: its dispatch-mode contexts would cache tensors of the transform's or the tracer's "
            "level. Use it with loss.backward() or torch.autograd.grad (or revfunc.reversible_vjp, eagerly); "
            "without it every path keeps activation memory constant in depth."
        )


def _warn_if_compiled_under_transform(_ctx=None) -> None:
    """At trace time: inside a ``torch.func`` gradient transform Dynamo drops the
    Function's backward (PyTorch #193279), so the step stores every activation; say so."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters()):
        warnings.warn(_checks.compiled_transform_warning("revfunc.reversible_sequence"), UserWarning, stacklevel=2)


def _check_tolerance_arg(where: str, value) -> None:
    """``check_reconstruction``: None/False (off), True (dtype default) or a tolerance > 0."""
    if value is None or isinstance(value, bool):
        return
    if not isinstance(value, (int, float)):
        raise TypeError(
            _checks.msg(where, "check_reconstruction", "None, a bool or a float tolerance > 0", _checks.describe(value))
        )
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(
            _checks.msg(where, "check_reconstruction", "a finite tolerance > 0 (False turns it off)", repr(value))
        )


def _drift(plan: Plan, x1, x2, tensors) -> List[float]:
    """Per-block relative error of the rebuilt input against the true one (no grad)."""
    errors = [0.0] * len(plan.blocks)
    if x1.numel() == 0:  # nothing to rebuild: no drift
        return errors
    for i, (r1, r2), (t1, t2) in _walk.rebuilt_inputs(plan, x1, x2, tensors):
        r1, r2, t1, t2 = r1.detach(), r2.detach(), t1.detach(), t2.detach()
        scale = torch.maximum(t1.abs().max(), t2.abs().max()).double()
        diff = torch.maximum((r1 - t1).abs().max(), (r2 - t2).abs().max()).double()
        err = diff / scale.clamp_min(torch.finfo(torch.float64).tiny)
        errors[i] = float("inf") if not torch.isfinite(diff) else float(err)
    return errors


def _check_drift(plan: Plan, x1, x2, tensors, tolerance) -> None:
    if tolerance is True:
        tolerance = default_tolerances(x1.dtype)[0]
    errors = _drift(plan, x1, x2, tensors)
    # Backward rebuilds from the last block down: the first block past the tolerance in
    # that order is where the drift comes from (earlier blocks inherit it).
    for i in range(len(errors) - 1, -1, -1):
        err = errors[i]
        if not err <= tolerance:
            raise ReconstructionError(
                f"{plan.where}: block {i}'s input rebuilt from the output differs from the true input by "
                f"relative error {err:.3g} > tolerance {tolerance:.3g} (dtype {x1.dtype}, "
                f"{len(plan.blocks)} blocks, checkpoint_every boundaries at {list(plan.boundaries)}). "
                "The coupling is ill-conditioned at this precision: compute in a wider dtype, "
                "shrink the branch's gain, or pass checkpoint_every=k to keep exact inputs every k blocks."
            )


def sequential_sequence(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    coupling: CouplingSpec = None,
    return_logdet: bool = False,
    event_dim: int = 1,
) -> Tuple[torch.Tensor, ...]:
    """The same stack as :func:`reversible_sequence` in plain autograd (stores everything).

    The reference for tests and the fallback for second-order and forward-mode
    derivatives. With the same ``generator`` state it sees the same random numbers as
    :func:`reversible_sequence`, so outputs and gradients match. ``coupling``,
    ``return_logdet``, ``event_dim``: as there.

    Shapes: (*, d), (*, d) -> (*, d), (*, d)[, (*,)].
    Pure: as :func:`reversible_sequence`.
    Differentiable in: x1, x2, params, floating kwargs tensors (any order, forward mode too).
    """
    return run_sequential(
        blocks, params, x1, x2, kwargs, generator, coupling=coupling, return_logdet=return_logdet, event_dim=event_dim
    )


def run_sequential(
    blocks, params, x1, x2, kwargs=None, generator=None, replay=None, coupling=None, return_logdet=False, event_dim=1
):
    """:func:`sequential_sequence` with :func:`make_plan`'s ``replay`` (``True``: draw the
    seeds a gradient-taking call would draw, e.g. for finite differences under no_grad)."""
    where = "revfunc.sequential_sequence"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    _checks.check_logdet_args(where, return_logdet, event_dim, x1)
    plan, tensors = make_plan(
        where,
        blocks,
        params,
        kwargs,
        generator,
        x1,
        x2,
        replay=replay,
        recomputes=False,
        coupling=coupling,
        logdet=return_logdet,
        event_dim=event_dim,
    )
    y1, y2, _, logdet = _walk.forward(plan, x1, x2, tensors)
    return (y1, y2, logdet) if return_logdet else (y1, y2)


def reversible_inverse(
    blocks: Blocks,
    params: BlockParams,
    y1: torch.Tensor,
    y2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    coupling: CouplingSpec = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Invert a stack: ``reversible_inverse(reversible_sequence(x)) == x`` up to rounding.

    Give ``generator`` in the state the forward got it in (the same base seed is drawn),
    so random branches replay the forward's random numbers, and the forward's
    ``coupling``. Sampling a flow is this inverse run on noise.

    Shapes: (*, d), (*, d) -> (*, d), (*, d).
    Pure: as :func:`reversible_sequence`.
    Differentiable in: y1, y2, params, floating kwargs tensors (plain autograd).
    """
    return apply_inverse(blocks, params, y1, y2, kwargs=kwargs, generator=generator, coupling=coupling)


def apply_inverse(
    blocks,
    params,
    y1,
    y2,
    *,
    kwargs=None,
    generator=None,
    where="revfunc.reversible_inverse",
    coupling=None,
    deterministic=False,
):
    """:func:`reversible_inverse`, with ``where`` as for :func:`apply_stack` and
    ``deterministic`` as there (no seed drawn without a generator)."""
    validate(where, blocks, params, y1, y2, kwargs, generator, names=("y1", "y2"))
    plan, tensors = make_plan(
        where,
        blocks,
        params,
        kwargs,
        generator,
        y1,
        y2,
        replay=True,
        recomputes=False,
        coupling=coupling,
        deterministic=deterministic,
    )

    def run(watch):
        ((_, x1, x2),) = collections.deque(_walk.inverse(plan, y1, y2, tensors, watch), maxlen=1)  # block 0's, last
        return x1, x2

    return _walk.checked(plan, tensors, y1.device, run)


def reconstruction_error(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    checkpoint_every: Optional[int] = None,
    coupling: CouplingSpec = None,
) -> List[float]:
    """How far the backward pass's rebuilt inputs drift from the true ones, per block.
    ``coupling``: as in :func:`reversible_sequence` (``scaled`` and ``momentum`` with a
    factor below 1 divide by it in the inverse: their drift grows with depth).

    Runs the stack in plain forward (recording each block's input), then rebuilds the
    inputs from the final output exactly as the memory-saving backward does (resetting
    to the exact stream at ``checkpoint_every`` boundaries).

    Returns:
        ``errs`` of length L: ``errs[i] = max(|x1' - x1|, |x2' - x2|) / max(|x1|, |x2|)``
        for block i's rebuilt input ``(x1', x2')`` (max over elements; ``inf`` when the
        rebuilt input is not finite).

    Shapes: (*, d), (*, d) -> list of L floats.
    Pure: as :func:`reversible_sequence`; no gradients are recorded.
    """
    where = "revfunc.reconstruction_error"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    _checks.check_positive_int(where, "checkpoint_every", checkpoint_every)
    plan, tensors = make_plan(
        where,
        blocks,
        params,
        kwargs,
        generator,
        x1,
        x2,
        checkpoint_every=checkpoint_every,
        replay=True,
        recomputes=False,
        coupling=coupling,
    )
    return _drift(plan, x1, x2, tensors)
