"""Type aliases shared by revfunc's public signatures (defined once, here)."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence, Tuple

import torch

#: A parameter pytree: ``{name: tensor}`` for one branch function.
Params = Mapping[str, torch.Tensor]
#: A branch function ``fn(params, x, **kwargs) -> Tensor`` shaped like ``x``.
BranchFn = Callable[..., torch.Tensor]
#: One reversible block: the pair ``(f, g)`` of branch functions.
Block = Tuple[BranchFn, BranchFn]
#: A stack of blocks, applied in order.
Blocks = Sequence[Block]
#: Parameters of a stack: one ``(f_params, g_params)`` pair per block.
BlockParams = Sequence[Tuple[Params, Params]]
#: Keyword arguments of a stack: one ``(f_kwargs, g_kwargs)`` pair per block.
BlockKwargs = Sequence[Tuple[Mapping[str, Any], Mapping[str, Any]]]
