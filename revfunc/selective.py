"""Selective saving inside the reversible walk: keep a few ops' outputs per block.

``reversible_sequence(..., context_fn=...)`` takes the ``context_fn`` of
``torch.utils.checkpoint``: a callable returning two context managers, PyTorch's
selective-checkpoint contexts (``create_selective_checkpoint_contexts(policy_fn)``).
Each branch's forward runs in the first (it caches the outputs of the ops the policy
saves), and the backward's rebuild and recomputation of that branch run in the second
(those ops return the cached outputs instead of running again). The cache of a branch is
dropped as soon as the backward has passed its block.

:func:`save_attention` is the ready policy for long context: it saves the outputs of
every ``F.scaled_dot_product_attention`` kernel (CPU flash, CUDA flash, memory-efficient,
cuDNN, and the fused overrideable one), so the backward no longer re-runs attention.
Cost: per block, the attention output (one stream tensor's worth, batch x tokens x d)
plus its log-sum-exp (batch x heads x tokens, float32); the math fallback (used with
dropout or masks some kernels do not take) decomposes into ordinary ops and is
recomputed as before.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["save_attention", "attention_policy", "ATTENTION_OPS"]

_NAMES = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
#: The SDPA kernels whose outputs :func:`save_attention` keeps (those this torch build has).
ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name).default for name in _NAMES if hasattr(torch.ops.aten, name))


def attention_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save the outputs of the fused attention kernels, recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


#: ``context_fn`` that saves every SDPA kernel's outputs (pass it as ``context_fn=save_attention``).
save_attention: Callable[[], Tuple[Any, Any]] = functools.partial(
    create_selective_checkpoint_contexts, attention_policy
)


class SavedContexts:
    """Per call: the ``context_fn`` and, per (block, branch), the recomputation context of
    the forward that ran in its caching context (taken, so freed, by the backward)."""

    __slots__ = ("context_fn", "recompute")

    def __init__(self, context_fn: Callable[[], Tuple[Any, Any]]):
        self.context_fn = context_fn
        self.recompute: Dict[Tuple[int, int], Any] = {}

    def forward_context(self, i: int, branch: int):
        contexts = self.context_fn()
        if not (isinstance(contexts, tuple) and len(contexts) == 2):
            raise TypeError(
                f"revfunc: context_fn expected to return two context managers (forward, "
                f"recompute), as torch.utils.checkpoint's; got {type(contexts).__name__}."
            )
        self.recompute[i, branch] = contexts[1]
        return contexts[0]

    def take(self, i: int, branch: int) -> Optional[Any]:
        return self.recompute.pop((i, branch), None)
