"""Assertions for property-testing reversible stacks of your own blocks.

Both raise ``AssertionError`` naming the block, the tensor, the max abs/rel error and the
tolerance; neither returns a bool.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

from revfunc import _branch, _layer, _walk
from revfunc._plan import make_plan, param_pairs, validate
from revfunc._tolerances import default_tolerances
from revfunc._types import BlockKwargs, BlockParams, Blocks
from revfunc.couplings import CouplingSpec, additive
from revfunc.invertible import Invertible
from revfunc.sequence import reversible_sequence, run_sequential, sequential_sequence

__all__ = ["assert_invertible", "assert_gradients_match", "assert_logdet_matches"]


def _tolerances(dtype: torch.dtype, rtol: Optional[float], atol: Optional[float]) -> Tuple[float, float]:
    default_rtol, default_atol = default_tolerances(dtype)
    return (default_rtol if rtol is None else rtol), (default_atol if atol is None else atol)


def _rng_restorer(generator: Optional[torch.Generator]):
    """A function that puts ``generator`` (the global CPU RNG if None) back in its current
    state, so every compared run draws the same seeds."""
    state = generator.get_state() if generator is not None else torch.get_rng_state()
    if generator is not None:
        return lambda: generator.set_state(state)
    return lambda: torch.set_rng_state(state)


def _mismatch(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> Optional[str]:
    """``None`` if close (``|a - e| <= atol + rtol * |e|`` everywhere), else the error summary."""
    a, e = actual.detach().double(), expected.detach().double()
    if a.shape != e.shape:
        return f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    if not torch.isfinite(a).all():
        return f"{int((~torch.isfinite(a)).sum())} non-finite values"
    diff = (a - e).abs()
    if bool((diff <= atol + rtol * e.abs()).all()):
        return None
    rel = (diff / e.abs().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    return (
        f"max abs error {diff.max().item():.3g}, max rel error {rel:.3g} > tolerance rtol={rtol:.3g}, atol={atol:.3g}"
    )


def assert_invertible(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    coupling: CouplingSpec = None,
) -> None:
    """Assert that every block's input is rebuilt from its output, as backward does it.

    Runs the stack in plain forward (recording each block's input), checks every output
    is finite, then rebuilds the inputs from the final output block by block (last to
    first) and compares each with the recorded one. Also checks that
    :func:`revfunc.reversible_sequence` gives the plain forward's output (a block whose
    result depends on hidden state, e.g. a call counter, fails here or in the rebuild).

    Args:
        blocks, params, x1, x2, kwargs, generator, coupling: as for
            :func:`revfunc.reversible_sequence`.
        rtol, atol: tolerances; default per dtype (:data:`revfunc.testing.DEFAULT_TOLERANCES`).

    Raises:
        AssertionError: naming the block, the tensor (x1/x2/y1/y2), the block's coupling
            when it is not additive, the max abs and relative error and the tolerance.

    Shapes: (*, d), (*, d).
    Pure: as :func:`revfunc.reversible_sequence`; records no gradients.
    """
    where = "revfunc.testing.assert_invertible"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    rtol, atol = _tolerances(x1.dtype, rtol, atol)
    restore = _rng_restorer(generator)
    plan, tensors = make_plan(where, blocks, params, kwargs, generator, x1, x2, replay=True, coupling=coupling)
    for i, (r1, r2), (t1, t2) in _walk.rebuilt_inputs(plan, x1, x2, tensors):
        for name, rebuilt_t, true_t in (("x2", r2, t2), ("x1", r1, t1)):  # the order the inverse rebuilds
            if not torch.isfinite(true_t).all():
                raise AssertionError(
                    f"{where}: block {i - 1 if i else 'input'} produced a non-finite "
                    f"{name} (block {i}'s input); reconstruction cannot be checked."
                )
            problem = _mismatch(rebuilt_t, true_t, rtol, atol)
            if problem:
                raise AssertionError(
                    f"{where}: block {i}'s input {name} rebuilt from its output{_coupled(plan, i)} differs from the "
                    f"forward's: {problem}."
                )
    # The memory-saving path must agree with the plain forward for the same seeds.
    with torch.no_grad():
        restore()
        plain = sequential_sequence(blocks, params, x1, x2, kwargs=kwargs, generator=generator, coupling=coupling)
        restore()
        fast = reversible_sequence(blocks, params, x1, x2, kwargs=kwargs, generator=generator, coupling=coupling)
    for name, a, e in (("y1", fast[0], plain[0]), ("y2", fast[1], plain[1])):
        if not torch.isfinite(e).all():
            raise AssertionError(f"{where}: the stack's output {name} is not finite.")
        problem = _mismatch(a, e, rtol, atol)
        if problem:
            raise AssertionError(
                f"{where}: output {name} of revfunc.reversible_sequence differs from a second "
                f"plain forward with the same seeds (is a block impure?): {problem}."
            )


def _coupled(plan, i: int, branch: Optional[int] = None) -> str:
    """`` (coupling affine(...))``: block ``i``'s non-additive coupling(s), for a message."""
    if plan.couplings is None:
        return ""
    names = [repr(additive() if c is None else c) for c in plan.couplings[i]]
    if branch is not None:
        return "" if plan.couplings[i][branch] is None else f" (coupling {names[branch]})"
    return "" if plan.couplings[i] == (None, None) else f" (couplings {names[0]}, {names[1]})"


def _named_leaves(
    blocks: Blocks, params: BlockParams, kwargs: Optional[BlockKwargs]
) -> Tuple[List[str], List[torch.Tensor]]:
    """Names and tensors to differentiate: every floating param and kwarg tensor, once."""
    names, tensors, seen = [], [], set()
    for label, pairs in (("params", param_pairs(blocks, params)), ("kwargs", kwargs or ())):
        for i, pair in enumerate(pairs):
            for branch, d in zip(("layer", "") if isinstance(blocks[i], Invertible) else "fg", pair):
                for key, t in d.items():
                    if isinstance(t, torch.Tensor) and t.is_floating_point() and id(t) not in seen:
                        seen.add(id(t))
                        names.append(f"{label}[{i}] ({branch}) {key!r}")
                        tensors.append(t)
    return names, tensors


def _map_params(blocks: Blocks, params: BlockParams, fn) -> List[Any]:
    """``params`` with ``fn`` applied to each dict: a layer's one, a pair's two."""
    return [fn(p) if isinstance(b, Invertible) else (fn(p[0]), fn(p[1])) for b, p in zip(blocks, params)]


def _replace(
    blocks: Blocks,
    params: BlockParams,
    kwargs: Optional[BlockKwargs],
    old: Sequence[torch.Tensor],
    new: Sequence[torch.Tensor],
):
    """``params``/``kwargs`` with each tensor of ``old`` (by identity) swapped for ``new``."""
    swap = {id(o): n for o, n in zip(old, new)}

    def sub(d):
        return {k: swap.get(id(v), v) if isinstance(v, torch.Tensor) else v for k, v in d.items()}

    new_kwargs = None if kwargs is None else [(sub(fk), sub(gk)) for fk, gk in kwargs]
    return _map_params(blocks, params, sub), new_kwargs


def assert_gradients_match(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    directions: int = 2,
    coupling: CouplingSpec = None,
) -> None:
    """Assert that reversible gradients are right, against two independent references.

    1. Against :func:`revfunc.sequential_sequence` (plain autograd, same seeds): the
       gradients of ``<y1, r1> + <y2, r2>`` (``r`` a fixed random projection) w.r.t.
       x1, x2, every floating param and kwarg tensor, at ``rtol``/``atol``.
    2. Block by block, against float64 central finite differences, which share no
       backward code with the blocks (a wrong custom backward inside a block fools
       check 1, not this one): for each block's ``f`` and ``g`` at its own input from a
       plain forward, the vjp of a random projection w.r.t. (input, params) along random
       directions must equal the finite difference to 1e-5 relative. The first bad
       branch is named.
    3. The whole stack against float64 finite differences along ``directions`` random
       directions ``v``: ``<grad, v>`` must equal ``(L(θ + εv) - L(θ - εv)) / 2ε`` to
       1e-5 relative.

    Args:
        blocks, params, x1, x2, kwargs, generator: as for :func:`revfunc.reversible_sequence`.
        rtol, atol: tolerances of check 1; default per dtype.
        directions: number of random directions in check 2.
        coupling: as for :func:`revfunc.reversible_sequence`. With one that has a
            log-det, the projected loss also takes ``<logdet, r3>``, so the log-det's
            gradients are checked as well.

    Raises:
        AssertionError: naming the block, the branch and the tensor, the max abs and
            relative error and the tolerance.

    Shapes: (*, d), (*, d).
    Pure: as :func:`revfunc.reversible_sequence`; leaves ``.grad`` untouched.
    """
    where = "revfunc.testing.assert_gradients_match"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    rtol, atol = _tolerances(x1.dtype, rtol, atol)
    names, leaves = _named_leaves(blocks, params, kwargs)
    names = ["x1", "x2", *names]
    probe = torch.Generator().manual_seed(1234)
    r1 = torch.randn(x1.shape, generator=probe, dtype=torch.float64).to(x1.device)
    r2 = torch.randn(x2.shape, generator=probe, dtype=torch.float64).to(x2.device)
    r3 = torch.randn(x1.shape[:-1], generator=probe, dtype=torch.float64).to(x1.device)
    restore = _rng_restorer(generator)
    logdet = make_plan(where, blocks, params, kwargs, None, x1, x2, replay=False, coupling=coupling)[0].couplings
    with_logdet = any(isinstance(b, Invertible) for b in blocks) or (
        logdet is not None and any(c is not None and c.logdet is not None for pair in logdet for c in pair)
    )

    def projected(y1, y2, ld=None):
        out = (y1.double() * r1).sum() + (y2.double() * r2).sum()
        return out if ld is None else out + (ld.double() * r3).sum()

    def grads(fn, base, p, k):
        """Gradients of ``<y1, r1> + <y2, r2> [+ <logdet, r3>]`` w.r.t. ``base`` = [x1, x2, *leaves]."""
        xs = [t.detach().requires_grad_() for t in base]
        p, k = _replace(blocks, p, k, base[2:], xs[2:])
        restore()
        out = fn(blocks, p, xs[0], xs[1], kwargs=k, generator=generator, coupling=coupling, return_logdet=with_logdet)
        return torch.autograd.grad(projected(*out), xs, allow_unused=True, materialize_grads=True)

    base = [x1, x2, *leaves]
    got = grads(reversible_sequence, base, params, kwargs)
    want = grads(sequential_sequence, base, params, kwargs)
    for name, a, e in zip(names, got, want):
        problem = _mismatch(a, e, rtol, atol)
        if problem:
            raise AssertionError(
                f"{where}: gradient of {name} from revfunc.reversible_sequence differs from "
                f"plain autograd (revfunc.sequential_sequence): {problem}."
            )

    # Independent checks: float64 finite differences, block by block, then end to end.
    base64 = [t.detach().double() for t in base]
    p64, k64 = _replace(blocks, params, kwargs, leaves, base64[2:])
    restore()
    _check_blocks_by_finite_differences(
        where, blocks, p64, base64[0], base64[1], k64, generator, probe, restore, coupling=coupling
    )
    grads64 = grads(reversible_sequence, base64, p64, k64)
    eps = 1e-6
    for d in range(directions):
        v = [torch.randn(t.shape, generator=probe, dtype=torch.float64).to(t.device) for t in base64]
        predicted = sum((g * u).sum() for g, u in zip(grads64, v)).item()

        def shifted(sign, v=v):  # this direction's v
            moved = [t + sign * eps * u for t, u in zip(base64, v)]
            p, k = _replace(blocks, p64, k64, base64[2:], moved[2:])
            restore()
            with torch.no_grad():  # the seeds a gradient-taking call draws
                out = run_sequential(
                    blocks,
                    p,
                    moved[0],
                    moved[1],
                    k,
                    generator,
                    replay=True,
                    coupling=coupling,
                    return_logdet=with_logdet,
                )
            return projected(*out).item()

        measured = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
        err = abs(predicted - measured)
        if err > 1e-5 * max(abs(measured), 1.0):
            raise AssertionError(
                f"{where}: along random direction {d}, the directional derivative from revfunc's gradients "
                f"({predicted:.10g}) differs from float64 finite differences ({measured:.10g}): abs error "
                f"{err:.3g}, rel error {err / max(abs(measured), 1e-300):.3g} > tolerance 1e-05 "
                "(a wrong custom backward inside a block?)."
            )
    restore()


def _check_blocks_by_finite_differences(
    where,
    blocks,
    params,
    x1,
    x2,
    kwargs,
    generator,
    probe,
    restore,
    eps: float = 1e-6,
    tol: float = 1e-5,
    coupling=None,
) -> None:
    """Each branch's own vjp against float64 central differences at its recorded input."""
    plan, tensors = make_plan(where, blocks, params, kwargs, generator, x1, x2, replay=True, coupling=coupling)
    restore()
    inputs: list = []
    with torch.no_grad():
        y1, _, _, _ = _walk.checked(
            plan, tensors, x1.device, lambda watch: _walk.forward(plan, x1, x2, tensors, watch, inputs)
        )
    # f of block i sees its input x2; g sees y1 = the next block's x1 (the output's y1 last);
    # an invertible layer sees both halves of its input.
    outputs = [*(inputs[i + 1] for i in range(len(inputs) - 1)), (y1, None)]
    for i, (a1, a2) in enumerate(inputs):
        units: List[Tuple[str, int, tuple, Any]]
        if plan.layer(i) is not None:
            units = [("invertible layer", 0, (a1, a2), _layer_call(plan, i))]
        else:
            next_x1 = outputs[i][0]
            units = [
                (f"branch {n}", branch, (x,), _branch_call(plan, i, branch))
                for n, branch, x in (("f", 0, a2), ("g", 1, next_x1))
            ]
        for name, branch, xs_in, run in units:
            _check_unit_by_finite_differences(where, plan, tensors, i, name, branch, xs_in, run, probe, eps, tol)


def _branch_call(plan, i: int, branch: int):
    def run(xs, moved):
        return _branch._parts(_branch.call(plan, i, branch, xs[0], moved))[0]

    return run


def _layer_call(plan, i: int):
    def run(xs, moved):  # its halves and its log-det
        y1, y2, logdet = _layer._call(plan, i, "forward", xs[0], xs[1], moved, _branch.Watch.NONE)
        return y1, y2, _layer.logdet_term(plan, logdet, xs[0])

    return run


def _check_unit_by_finite_differences(where, plan, tensors, i, name, branch, xs_in, run, probe, eps, tol) -> None:
    """One branch's (or layer's) vjp against float64 central differences at its input ``xs_in``."""
    # each floating slot once (a tensor tied under two names is one input)
    diff = list({j: (n, j) for n, j in plan.binds[i][branch].params if tensors[j].is_floating_point()}.values())
    with torch.no_grad():  # the output's parts and shapes (a pair for affine)
        shapes = [p.shape for p in run(xs_in, tensors)]
    device = xs_in[0].device
    r = [torch.randn(shape, generator=probe, dtype=torch.float64).to(device) for shape in shapes]

    def project(out):
        return sum((part.double() * w).sum() for part, w in zip(out, r))

    def value(x_in, moved):
        with torch.no_grad():
            return float(project(run(x_in, moved)))

    def with_slots(new):
        moved = list(tensors)
        for (_, j), t in zip(diff, new):
            moved[j] = t
        return moved

    with torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in xs_in]
        ps = [tensors[j].detach().requires_grad_() for _, j in diff]
        out = run(xs, with_slots(ps))
        g = torch.autograd.grad(project(out), [*xs, *ps], allow_unused=True, materialize_grads=True)
    v = [torch.randn(t.shape, generator=probe, dtype=torch.float64).to(t.device) for t in (*xs, *ps)]
    n = len(xs)
    predicted = float(sum((a * u).sum() for a, u in zip(g, v)))
    plus = value(
        [x + eps * u for x, u in zip(xs_in, v)], with_slots([tensors[j] + eps * u for (_, j), u in zip(diff, v[n:])])
    )
    minus = value(
        [x - eps * u for x, u in zip(xs_in, v)], with_slots([tensors[j] - eps * u for (_, j), u in zip(diff, v[n:])])
    )
    measured = (plus - minus) / (2 * eps)
    err = abs(predicted - measured)
    if err > tol * max(abs(measured), 1.0):
        names = [*(["x"] if n == 1 else ["x1", "x2"]), *(k for k, _ in diff)]
        worst = max(zip(names, g, v), key=lambda item: abs((item[1] * item[2]).sum().item()))[0]
        coupled = "" if plan.layer(i) is not None else _coupled(plan, i, branch)
        raise AssertionError(
            f"{where}: block {i} {name}{coupled}: its gradient w.r.t. (input {'x' if n == 1 else 'x1, x2'}, "
            "params) along a random "
            f"direction ({predicted:.10g}) differs from float64 finite differences ({measured:.10g}): abs "
            f"error {err:.3g}, rel error {err / max(abs(measured), 1e-300):.3g} > tolerance {tol:.0e}; "
            f"largest term from tensor {worst!r} (a wrong custom backward in this {name.split()[0]}?)."
        )


def assert_logdet_matches(
    blocks: Blocks,
    params: BlockParams,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    coupling: CouplingSpec,
    event_dim: int = 1,
    kwargs: Optional[BlockKwargs] = None,
    generator: Optional[torch.Generator] = None,
    rtol: float = 1e-8,
    atol: float = 1e-8,
) -> None:
    """Assert that the log-det :func:`revfunc.reversible_sequence` returns is
    ``log|det J|`` of the whole stack, ``J`` by ``torch.func.jacrev`` in float64.

    ``J`` is the Jacobian of ``(x1, x2) -> (y1, y2)`` over every element. Where the blocks
    treat the samples (the leading ``x1.shape[:-event_dim]`` dims) independently (``J``
    block diagonal over them), each sample's log-det is compared with its own block's
    ``slogdet``; otherwise their sum with the whole ``slogdet``. Sizes: ``J`` has
    ``(2 x1.numel())**2`` entries, so keep the inputs small.

    Raises:
        AssertionError: naming the sample, both values, the error and the tolerance.

    Shapes: (*, d), (*, d).
    Pure: as :func:`revfunc.reversible_sequence`; records no gradients of its own.
    """
    where = "revfunc.testing.assert_logdet_matches"
    validate(where, blocks, params, x1, x2, kwargs, generator)
    from revfunc._checks import check_logdet_args

    check_logdet_args(where, True, event_dim, x1)
    restore = _rng_restorer(generator)

    def wide(d):
        return {
            k: v.detach().double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in d.items()
        }

    p64: Any = _map_params(blocks, params, wide)
    k64: Any = None if kwargs is None else [(wide(fk), wide(gk)) for fk, gk in kwargs]
    a, b = x1.detach().double(), x2.detach().double()
    with torch.no_grad():
        restore()
        _, _, logdet = reversible_sequence(
            blocks,
            p64,
            a,
            b,
            kwargs=k64,
            generator=generator,
            coupling=coupling,
            return_logdet=True,
            event_dim=event_dim,
        )
    lead = x1.shape[: x1.dim() - event_dim]
    samples, n = max(1, int(torch.Size(lead).numel())), x1[(0,) * len(lead)].numel() if lead else x1.numel()

    def stack(z):
        z1, z2 = z.reshape(samples, 2, n).unbind(1)
        restore()
        y1, y2 = sequential_sequence(
            blocks, p64, z1.reshape(a.shape), z2.reshape(b.shape), kwargs=k64, generator=generator, coupling=coupling
        )
        return torch.stack([y1.reshape(samples, n), y2.reshape(samples, n)], 1).reshape(-1)

    z = torch.stack([a.reshape(samples, n), b.reshape(samples, n)], 1).reshape(-1)
    jac = torch.func.jacrev(stack)(z).reshape(samples, 2 * n, samples, 2 * n)
    logdet = logdet.reshape(samples)
    off = jac.clone()
    for s in range(samples):
        off[s, :, s, :] = 0
    if bool((off.abs() <= 1e-12 * jac.abs().max().clamp_min(1.0)).all()):
        pairs = [(f"sample {s}", logdet[s], torch.linalg.slogdet(jac[s, :, s, :])[1]) for s in range(samples)]
    else:
        pairs = [("all samples (summed)", logdet.sum(), torch.linalg.slogdet(jac.reshape(samples * 2 * n, -1))[1])]
    for name, got, want in pairs:
        err = abs(float(got) - float(want))
        if not err <= atol + rtol * abs(float(want)):
            raise AssertionError(
                f"{where}: the log-det of {name} returned by revfunc.reversible_sequence ({float(got):.12g}) "
                f"differs from log|det J| by torch.func.jacrev ({float(want):.12g}): abs error {err:.3g} > "
                f"tolerance rtol={rtol:.3g}, atol={atol:.3g} (coupling {coupling!r}: is its logdet the "
                "elementwise log|dy/dx|?)."
            )
