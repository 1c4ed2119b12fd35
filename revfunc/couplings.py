"""Couplings: how a branch's output ``h`` updates one half ``x`` of the stream.

A reversible block is two updates: ``y1 = c_f(x1, f(x2))``, then ``y2 = c_g(x2, g(y1))``.
A :class:`Coupling` is three pure functions of tensors shaped like ``x``:

- ``forward(x, h) -> y``;
- ``inverse(y, h) -> x``, with ``inverse(forward(x, h), h) == x`` up to rounding;
- ``logdet(x, h)``: the elementwise ``log|dy/dx|``, broadcastable to ``x`` (``None``:
  volume preserving, 0). Each update's Jacobian in ``x`` is diagonal (``h`` does not
  depend on ``x``), so the block's log-determinant is the sum of these terms.

and optionally a fourth, ``prepare(h)``: what the three read from the branch output,
computed once per update (``affine``: the soft-clamped ``s`` and ``t``), so that a forward
runs it once for ``y`` and the log-det, and a backward once for the inverse and the vjp.
With ``prepare`` set, ``forward``, ``inverse`` and ``logdet`` receive ``prepare(h)`` in
place of ``h`` (:meth:`Coupling.prepared`). And optionally a fifth, ``vjp``: the closed-form
pullback of ``forward`` and ``logdet``, which the backward then uses in place of autograd
on a recomputed ``forward`` (every built-in has one).

=====================  ==============================  ===================================  ==============
coupling               forward                         inverse                              log-det
=====================  ==============================  ===================================  ==============
``additive()``         ``x + h``                       ``y - h``                            0
``scaled(a)``          ``a * x + h``                   ``(y - h) / a``                      ``log|a|``
``momentum(gamma)``    ``gamma * x + (1 - gamma) * h`` ``(y - (1 - gamma) * h) / gamma``    ``log gamma``
``affine(clamp)``      ``x * exp(s) + t``              ``(y - t) * exp(-s)``                ``s``
=====================  ==============================  ===================================  ==============

For ``affine``, ``h`` is ``(s_raw, t)``, or one tensor with twice ``x``'s size along
``dim`` (first half ``s_raw``, second ``t``: FrEIA's subnet convention), and
``s = clamp * 0.636 * atan(s_raw)`` (FrEIA's soft clamp, ``|s| < clamp``; ``clamp=None``:
``s = s_raw``).

Dims: ``*`` any leading dims; ``x``, ``y`` and each part of ``h`` share one shape.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from revfunc import _checks

__all__ = ["Coupling", "additive", "scaled", "momentum", "affine", "CouplingSpec"]


@dataclasses.dataclass(frozen=True, eq=False)
class Coupling:
    """A coupling ``(forward, inverse, logdet)``; see the module docstring.

    Args:
        forward: ``forward(x, h) -> y``.
        inverse: ``inverse(y, h) -> x``.
        logdet: ``logdet(x, h)``, elementwise ``log|dy/dx|`` broadcastable to ``x``, or
            ``None`` (volume preserving).
        name: how messages and ``repr`` name it.
        output: what the branch output ``h`` must be: ``"tensor"`` (shaped like ``x``),
            ``"pair"`` (``affine``: a pair or a tensor of twice the size along ``dim``),
            or ``"any"`` (your own coupling checks it).
        dim: the dimension a one-tensor ``"pair"`` output is split along.
        divides: the inverse divides by this factor (``scaled``, ``momentum``): the
            reconstruction drift grows like ``1 / divides`` per update (see
            docs/numerics.md).
        prepare: ``prepare(h)``, what ``forward``, ``inverse`` and ``logdet`` read from
            the branch output, computed once per update and passed to them in place of
            ``h``; ``None``: they read ``h`` itself. Differentiable: the backward
            differentiates through it.
        vjp: ``vjp(x, p, dy, dterm) -> (dx, dp)``, the pullback at ``(x, p)`` (``p``
            prepared) of ``y = forward(x, p)`` for the cotangent ``dy``, and of the
            elementwise log-det for ``dterm`` (its cotangent, broadcast to ``x``'s
            shape; ``None``: no log-det cotangent). ``dp`` has ``p``'s structure (a
            part broadcast against ``x`` may come back at ``x``'s shape: it is summed
            back). ``None``: autograd differentiates ``forward`` and ``logdet``. Pure;
            recorded like any op under ``create_graph``. A wrong one is caught by
            ``revfunc.testing.assert_gradients_match``.

    Pure: every function it holds must be (no state, no in-place writes).

    Example:
        >>> import torch
        >>> c = Coupling(lambda x, h: x * 2 + h, lambda y, h: (y - h) / 2, lambda x, h: torch.tensor(2.0).log())
        >>> x, h = torch.ones(3), torch.zeros(3)
        >>> c.inverse(c.forward(x, h), h).tolist()
        [1.0, 1.0, 1.0]
    """

    forward: Callable[[torch.Tensor, Any], torch.Tensor]
    inverse: Callable[[torch.Tensor, Any], torch.Tensor]
    logdet: Optional[Callable[[torch.Tensor, Any], Any]] = None
    name: str = "Coupling(...)"
    output: str = "any"
    dim: int = -1
    divides: Optional[float] = None
    prepare: Optional[Callable[[Any], Any]] = None
    vjp: Optional[Callable[[torch.Tensor, Any, torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, Any]]] = None

    def __post_init__(self) -> None:
        where = "revfunc.couplings.Coupling"
        for arg in ("forward", "inverse"):
            if not callable(getattr(self, arg)):
                raise TypeError(
                    _checks.msg(where, arg, "a callable (x, h) -> tensor", _checks.describe(getattr(self, arg)))
                )
        optional = {
            "logdet": "None or a callable (x, h) -> tensor",
            "prepare": "None or a callable h -> what forward, inverse and logdet read",
            "vjp": "None or a callable (x, p, dy, dterm) -> (dx, dp)",
        }
        for arg, expected in optional.items():
            if getattr(self, arg) is not None and not callable(getattr(self, arg)):
                raise TypeError(_checks.msg(where, arg, expected, _checks.describe(getattr(self, arg))))
        if self.output not in ("tensor", "pair", "any"):
            raise ValueError(_checks.msg(where, "output", "'tensor', 'pair' or 'any'", repr(self.output)))

    def prepared(self, h: Any) -> Any:
        """What ``forward``, ``inverse`` and ``logdet`` take for the branch output ``h``:
        ``prepare(h)``, or ``h`` itself without ``prepare``."""
        return h if self.prepare is None else self.prepare(h)

    @property
    def is_additive(self) -> bool:
        return self is _ADDITIVE

    def __repr__(self) -> str:
        return self.name


#: A ``coupling=`` argument: one coupling for every update, a pair ``(c_f, c_g)`` for every
#: block, or one pair per block.
CouplingSpec = Union[None, Coupling, Tuple[Coupling, Coupling], Sequence[Tuple[Coupling, Coupling]]]


def _add(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + h


def _sub(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return y - h


_ADDITIVE = Coupling(_add, _sub, None, name="additive()", output="tensor")


def additive() -> Coupling:
    """``y = x + h`` (RevNet, Reformer, the classic code): the default, volume preserving.

    Example:
        >>> import torch
        >>> additive().forward(torch.ones(2), torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    return _ADDITIVE


def _check_factor(where: str, name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_checks.msg(where, name, "a float", _checks.describe(value)))
    if not (math.isfinite(value) and value != 0 and low <= value <= high):
        bounds = "a finite nonzero float" if high == math.inf else f"a float in ({low}, {high}]"
        raise ValueError(
            _checks.msg(where, name, bounds, repr(value), "A zero factor makes the update non-invertible.")
        )
    return float(value)


def scaled(a: float) -> Coupling:
    """``y = a * x + h``, inverse ``(y - h) / a``, log-det ``log|a|`` (MEFT's scaled
    couplings: ``scaled(lam)`` on ``f``'s update, ``scaled(beta)`` on ``g``'s).

    Args:
        a: a finite nonzero float. ``|a| < 1`` contracts the stream, so the inverse
            amplifies rounding by ``1/|a|`` per update (see docs/numerics.md).

    Example:
        >>> import torch
        >>> c = scaled(0.5)
        >>> c.inverse(c.forward(torch.ones(2), torch.ones(2)), torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    a = _check_factor("revfunc.couplings.scaled", "a", a, low=-math.inf)
    log_a = math.log(abs(a))

    def forward(x, h):
        return a * x + h

    def inverse(y, h):
        return (y - h) / a

    def logdet(x, h):
        return torch.full((), log_a, dtype=x.dtype, device=x.device)

    def vjp(x, h, dy, dterm):
        return a * dy, dy

    return Coupling(forward, inverse, logdet, name=f"scaled({a!r})", output="tensor", divides=abs(a), vjp=vjp)


def momentum(gamma: float) -> Coupling:
    """``y = gamma * x + (1 - gamma) * h`` (Momentum ResNets, with ``x`` the velocity and
    an identity ``g``), inverse ``(y - (1 - gamma) * h) / gamma``, log-det ``log gamma``.

    Args:
        gamma: the momentum, in ``(0, 1]``.

    Example:
        >>> import torch
        >>> momentum(0.5).forward(torch.ones(1), torch.zeros(1)).tolist()
        [0.5]
    """
    gamma = _check_factor("revfunc.couplings.momentum", "gamma", gamma, high=1.0)
    log_gamma = math.log(gamma)
    rest = 1.0 - gamma

    def forward(x, h):
        return gamma * x + rest * h

    def inverse(y, h):
        return (y - rest * h) / gamma

    def logdet(x, h):
        return torch.full((), log_gamma, dtype=x.dtype, device=x.device)

    def vjp(x, h, dy, dterm):
        return gamma * dy, rest * dy

    name = f"momentum({gamma!r})"
    return Coupling(forward, inverse, logdet, name=name, output="tensor", divides=gamma, vjp=vjp)


def affine(clamp: Optional[float] = 2.0, dim: int = -1) -> Coupling:
    """``y = x * exp(s) + t`` with ``h = (s_raw, t)`` and ``s = clamp * 0.636 * atan(s_raw)``
    (RealNVP, Glow; FrEIA's ``GLOWCouplingBlock`` soft clamp, so a ported flow computes the
    same numbers); inverse ``(y - t) * exp(-s)``; log-det ``s``. Its ``prepare`` computes
    ``{"s": s, "t": t}`` from ``h`` once per update (one ``atan``), which ``forward``,
    ``inverse`` and ``logdet`` read as is; given the branch output itself (a tensor or a
    pair, never a dict), they prepare it first, so calling them directly is safe.

    Args:
        clamp: the soft clamp (``|s| < clamp``), or ``None`` for ``s = s_raw``.
        dim: the dimension along which a one-tensor ``h`` holds ``s_raw`` then ``t``
            (``-1`` for features, ``1`` for the channels of ``(B, C, H, W)``).

    Example:
        >>> import torch
        >>> c = affine(clamp=None)
        >>> x, h = torch.ones(2), (torch.zeros(2), torch.ones(2))
        >>> c.forward(x, h).tolist(), c.logdet(x, h).tolist()
        ([2.0, 2.0], [0.0, 0.0])
        >>> st = c.prepared(h)  # what the engine passes: {"s", "t"}, prepared once
        >>> c.forward(x, st).tolist(), sorted(st)
        ([2.0, 2.0], ['s', 't'])
    """
    where = "revfunc.couplings.affine"
    if clamp is not None:
        clamp = _check_factor(where, "clamp", clamp)
        if clamp < 0:
            raise ValueError(_checks.msg(where, "clamp", "None or a float > 0", repr(clamp)))
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(_checks.msg(where, "dim", "an int", _checks.describe(dim)))
    factor = None if clamp is None else clamp * 0.636

    def prepare(h):  # {"s", "t"}: a dict, which no branch output is
        if isinstance(h, dict):
            return h
        s_raw, t = h if isinstance(h, (tuple, list)) else h.chunk(2, dim=dim)
        return {"s": s_raw if factor is None else factor * torch.atan(s_raw), "t": t}

    def forward(x, h):
        st = prepare(h)
        return x * torch.exp(st["s"]) + st["t"]

    def inverse(y, h):
        st = prepare(h)
        return (y - st["t"]) * torch.exp(-st["s"])

    def logdet(x, h):
        return prepare(h)["s"]

    def vjp(x, st, dy, dterm):  # dy/dx = exp(s), dy/ds = x exp(s), dy/dt = 1; d logdet/ds = 1
        dx = dy * torch.exp(st["s"])
        ds = dx * x
        return dx, {"s": ds if dterm is None else ds + dterm, "t": dy}

    name = f"affine(clamp={clamp!r}, dim={dim})"
    return Coupling(forward, inverse, logdet, name=name, output="pair", dim=dim, prepare=prepare, vjp=vjp)


def per_block(where: str, coupling: Any, depth: int) -> Optional[Tuple[Tuple[Coupling, Coupling], ...]]:
    """``coupling=`` as one ``(c_f, c_g)`` pair per block, or ``None`` when every update
    is additive (the engine's additive path, bitwise as without couplings)."""
    if coupling is None:
        return None
    if isinstance(coupling, Coupling):
        pairs = [(coupling, coupling)] * depth
    elif isinstance(coupling, tuple) and len(coupling) == 2 and all(isinstance(c, Coupling) for c in coupling):
        pairs = [coupling] * depth
    elif isinstance(coupling, (list, tuple)):
        if len(coupling) != depth:
            raise ValueError(
                _checks.msg(where, "coupling", f"one (c_f, c_g) pair per block ({depth})", f"{len(coupling)} entries")
            )
        pairs = list(coupling)
        for i, pair in enumerate(pairs):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(c, Coupling) for c in pair)):
                raise TypeError(
                    _checks.msg(
                        where,
                        f"coupling[{i}]",
                        "a pair (c_f, c_g) of revfunc.couplings.Coupling",
                        _checks.describe(pair),
                    )
                )
    else:
        raise TypeError(
            _checks.msg(
                where,
                "coupling",
                "None, a revfunc.couplings.Coupling, a pair (c_f, c_g) or one pair per block",
                _checks.describe(coupling),
                "Build them with revfunc.couplings (additive, scaled, momentum, affine).",
            )
        )
    out = tuple((c_f, c_g) for c_f, c_g in pairs)
    if all(c.is_additive for pair in out for c in pair):
        return None
    return out
