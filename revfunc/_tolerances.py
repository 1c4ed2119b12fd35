"""Default comparison tolerances per dtype, ``(rtol, atol)``.

float64 is tight enough to catch a wrong gradient formula; lower precisions leave room
for rounding of a rebuilt stream (see docs/numerics.md for measured drift). Used by
``check_reconstruction=True`` and re-exported by :mod:`revfunc.testing`.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

#: ``{dtype: (rtol, atol)}`` used when ``rtol``/``atol`` are not given.
DEFAULT_TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-3, 1e-5),
    torch.bfloat16: (5e-2, 5e-2),
    torch.float16: (1e-2, 1e-3),
}


def default_tolerances(dtype: torch.dtype) -> Tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` (float32's for dtypes not listed)."""
    return DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES[torch.float32])
