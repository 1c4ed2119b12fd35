"""One autograd node per block, chained through the rebuilt stream.

``loss.backward()`` and ``torch.autograd.grad`` outside ``torch.func`` transforms and
``torch.compile`` run this driver: block ``i``'s node (:class:`revfunc._function.BlockFunction`)
returns block ``i``'s parameter gradients, so the autograd engine accumulates them (and
fires their hooks: DDP's bucket all-reduce, FSDP2's reduce-scatter, post-accumulate-grad
hooks such as an optimizer step in backward) right after block ``i``'s backward and before
block ``i - 1`` is recomputed, and no second copy of any gradient is held. Memory stays
constant in depth: the nodes save nothing between blocks; the :class:`Tape` carries each
rebuilt block input from one node's backward to the next.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from revfunc import _walk
from revfunc._function import BlockFunction
from revfunc._plan import Plan

# The C-level Function.apply: torch.autograd.Function.apply adds a pytree pass that
# unwraps dead torch.func wrappers (about 17 µs a block); this chain only runs with no
# torch.func transform active.
_apply = super(torch.autograd.Function, BlockFunction).apply


class Tape:
    """Per call: block ``i``'s own flat slots (``positions[i]``: slot -> position among its
    node's inputs) and the rebuilt inputs handed from each node's backward to the next."""

    __slots__ = ("positions", "states")

    def __init__(self, positions: List[Dict[int, int]]):
        self.positions = positions
        self.states: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def put(self, i: int, y1: torch.Tensor, y2: torch.Tensor) -> None:
        self.states[i] = (y1, y2)

    def take(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.states.pop(i)


def block_slots(plan: Plan, i: int) -> Dict[int, int]:
    """``{flat slot: position}`` of block ``i``'s tensors, each once, in first-use order."""
    slots: Dict[int, int] = {}
    for b in plan.binds[i]:
        for _, j in b.params + b.diff_kwargs + b.other_kwargs:
            slots.setdefault(j, len(slots))
    return slots


def apply(plan: Plan, x1: torch.Tensor, x2: torch.Tensor, tensors) -> Tuple[torch.Tensor, ...]:
    """The stack as a chain of per-block nodes, its checks hoisted around it: ``(y1, y2)``,
    and the log-det (the sum of the nodes' terms) when ``plan.logdet``."""
    positions = [block_slots(plan, i) for i in range(len(plan.blocks))]
    tape = Tape(positions)

    def run(watch):
        a1, a2 = x1, x2
        if not plan.logdet:
            for i in range(len(positions)):  # each block through the walk's gathering point
                a1, a2 = _walk.gathered(plan, i, tensors, _node, a1, a2, tape, watch)
            return a1, a2
        logdet = None
        for i in range(len(positions)):
            a1, a2, term = _walk.gathered(plan, i, tensors, _node, a1, a2, tape, watch)
            logdet = term if logdet is None else logdet + term
        return a1, a2, logdet

    return _walk.checked(plan, tensors, x1.device, run)


def _node(
    plan: Plan, i: int, tensors, x1: torch.Tensor, x2: torch.Tensor, tape: Tape, watch
) -> Tuple[torch.Tensor, ...]:
    """Block ``i``'s node: its forward now, its backward when autograd reaches it."""
    return _apply(plan, tape, i, watch, x1, x2, *(tensors[j] for j in tape.positions[i]))
