"""Additive coupling (RevNet) as pure functions.

Dims: ``*`` any leading dims, ``d`` the width of one half of the stream.

    forward:  y1 = x1 + f(x2)          inverse:  x2 = y2 - g(y1)
              y2 = x2 + g(y1)                    x1 = y1 - f(x2)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch

from revfunc import _checks, _walk
from revfunc._plan import make_plan, validate
from revfunc._types import BranchFn, Params
from revfunc.couplings import CouplingSpec

__all__ = ["coupling", "coupling_inverse"]


def _one_block_plan(
    where, f, g, f_params, g_params, a1, a2, f_kwargs, g_kwargs, names, coupling=None, logdet=False, event_dim=1
):
    """A one-block plan (plain calls: the global RNG as is, no replay)."""
    blocks, params, kwargs = [(f, g)], [(f_params, g_params)], [(f_kwargs or {}, g_kwargs or {})]
    validate(where, blocks, params, a1, a2, kwargs, None, names)
    _checks.check_logdet_args(where, logdet, event_dim, a1)
    if isinstance(coupling, list) and len(coupling) == 1:
        coupling = coupling[0]
    return make_plan(
        where,
        blocks,
        params,
        kwargs,
        None,
        a1,
        a2,
        replay=False,
        recomputes=False,
        coupling=coupling,
        logdet=logdet,
        event_dim=event_dim,
    )


def coupling(
    f: BranchFn,
    g: BranchFn,
    f_params: Params,
    g_params: Params,
    x1: torch.Tensor,
    x2: torch.Tensor,
    *,
    f_kwargs: Optional[Mapping[str, Any]] = None,
    g_kwargs: Optional[Mapping[str, Any]] = None,
    coupling: CouplingSpec = None,
    return_logdet: bool = False,
    event_dim: int = 1,
) -> Tuple[torch.Tensor, ...]:
    """One coupling block: ``y1 = c_f(x1, f(x2))``, ``y2 = c_g(x2, g(y1))`` (``x + h`` by
    default; ``coupling``, ``return_logdet``, ``event_dim`` as in
    :func:`revfunc.reversible_sequence`).

    Plain autograd (stores what ``f`` and ``g`` store); the memory-saving path for a
    stack is :func:`revfunc.reversible_sequence`. Randomness inside ``f``/``g`` uses the
    global RNG as is.

    Shapes: (*, d), (*, d) -> (*, d), (*, d).
    Pure: yes, if ``f`` and ``g`` are.
    Differentiable in: x1, x2, f_params, g_params, tensor kwargs.

    Example:
        >>> f = g = lambda p, x: p["w"] * x
        >>> y1, y2 = coupling(f, g, {"w": torch.tensor(2.)}, {"w": torch.tensor(3.)},
        ...                   torch.ones(2), torch.ones(2))
        >>> y1.tolist(), y2.tolist()
        ([3.0, 3.0], [10.0, 10.0])
    """
    plan, tensors = _one_block_plan(
        "revfunc.coupling",
        f,
        g,
        f_params,
        g_params,
        x1,
        x2,
        f_kwargs,
        g_kwargs,
        ("x1", "x2"),
        coupling,
        return_logdet,
        event_dim,
    )
    y1, y2, _, logdet = _walk.forward(plan, x1, x2, tensors)
    return (y1, y2, logdet) if return_logdet else (y1, y2)


def coupling_inverse(
    f: BranchFn,
    g: BranchFn,
    f_params: Params,
    g_params: Params,
    y1: torch.Tensor,
    y2: torch.Tensor,
    *,
    f_kwargs: Optional[Mapping[str, Any]] = None,
    g_kwargs: Optional[Mapping[str, Any]] = None,
    coupling: CouplingSpec = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`coupling`: ``x2 = c_g^-1(y2, g(y1))``, ``x1 = c_f^-1(y1, f(x2))``
    (``y - h`` by default).

    Exact up to floating-point rounding: ``coupling_inverse(*coupling(x)) == x``.

    Shapes: (*, d), (*, d) -> (*, d), (*, d).
    Pure: yes, if ``f`` and ``g`` are.
    Differentiable in: y1, y2, f_params, g_params, tensor kwargs.
    """
    plan, tensors = _one_block_plan(
        "revfunc.coupling_inverse", f, g, f_params, g_params, y1, y2, f_kwargs, g_kwargs, ("y1", "y2"), coupling
    )
    ((_, x1, x2),) = _walk.inverse(plan, y1, y2, tensors)
    return x1, x2
