"""Additive coupling (RevNet) as pure functions.

Dims: ``*`` any leading dims, ``d`` the width of one half of the stream.

    forward:  y1 = x1 + f(x2)          inverse:  x2 = y2 - g(y1)
              y2 = x2 + g(y1)                    x1 = y1 - f(x2)
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch

from revfunc import _checks
from revfunc._types import BranchFn, Params
from revfunc.random import call_branch

__all__ = ["coupling", "coupling_inverse"]

_EMPTY: Mapping[str, Any] = {}


def couple(f, g, f_params, g_params, x1, x2, f_kwargs, g_kwargs, f_seed, g_seed, call_f=call_branch,
           call_g=call_branch):
    """One forward coupling step with per-branch child seeds (``None``: as is)."""
    y1 = x1 + call_f(f, f_params, x2, f_kwargs, f_seed)
    y2 = x2 + call_g(g, g_params, y1, g_kwargs, g_seed)
    return y1, y2


def uncouple(f, g, f_params, g_params, y1, y2, f_kwargs, g_kwargs, f_seed, g_seed, call_f=call_branch,
             call_g=call_branch):
    """One inverse coupling step with per-branch child seeds (``None``: as is)."""
    x2 = y2 - call_g(g, g_params, y1, g_kwargs, g_seed)
    x1 = y1 - call_f(f, f_params, x2, f_kwargs, f_seed)
    return x1, x2


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One additive coupling block: ``y1 = x1 + f(x2)``, ``y2 = x2 + g(y1)``.

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
    _checks.check_stream_pair("revfunc.coupling", x1, x2)
    return couple(f, g, f_params, g_params, x1, x2, f_kwargs or _EMPTY, g_kwargs or _EMPTY, None, None)


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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`coupling`: ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``.

    Exact up to floating-point rounding: ``coupling_inverse(*coupling(x)) == x``.

    Shapes: (*, d), (*, d) -> (*, d), (*, d).
    Pure: yes, if ``f`` and ``g`` are.
    Differentiable in: y1, y2, f_params, g_params, tensor kwargs.
    """
    _checks.check_stream_pair("revfunc.coupling_inverse", y1, y2, ("y1", "y2"))
    return uncouple(f, g, f_params, g_params, y1, y2, f_kwargs or _EMPTY, g_kwargs or _EMPTY, None, None)
