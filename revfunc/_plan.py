"""The plan of one call: everything non-tensor about a stack, fixed before it runs.

A :class:`Plan` holds the blocks, where each branch's parameters and keywords sit in
one flat tensor list (:class:`Bind`), the child seeds, the exact stream states kept
every ``checkpoint_every`` blocks (``boundaries``), the autocast state and the
train/eval flags to replay in backward, and which checks apply. Every public path
builds one with :func:`make_plan` and hands it to the walk (``revfunc._walk``), which
calls each branch through ``revfunc._branch``. The Function keeps the plan on ``ctx``,
so two forwards followed by two backwards each replay their own.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from revfunc import _checks
from revfunc.couplings import per_block
from revfunc.invertible import Invertible
from revfunc.random import derive_seed, draw_base_seed
from revfunc.selective import SavedContexts

_NO_KWARGS: Tuple[Dict[str, Any], Dict[str, Any]] = ({}, {})
BRANCHES = ("f", "g")


class Bind(NamedTuple):
    """Where one branch call's arguments come from in the flat tensor list."""

    params: Tuple[Tuple[str, int], ...]  #: (name, slot) of each parameter/buffer
    diff_kwargs: Tuple[Tuple[str, int], ...]  #: (name, slot) of each floating keyword tensor
    other_kwargs: Tuple[Tuple[str, int], ...]  #: (name, slot) of each other keyword tensor (masks)
    static: Dict[str, Any]  #: non-tensor keywords, closed over


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything non-tensor about one call of a stack (see the module docstring).

    Attributes:
        where: the public function's name, for messages.
        blocks: per block, its ``(f, g)`` pair or its :class:`revfunc.invertible.Invertible`
            layer (see :meth:`layer`).
        binds: per block, per branch, its :class:`Bind` (a layer's parameters and
            keywords in the first, the second empty).
        seeds: per block ``(f_seed, g_seed)`` child seeds, or ``None`` (run as is).
        boundaries: sorted stream-state indices ``j`` (the input of block ``j``) kept
            exactly (``checkpoint_every``).
        autocast: ``(device_type, dtype, enabled)`` at forward, replayed in backward.
        modes: per block, per branch, ``(modules, training flags)`` of a module-backed
            branch at forward (``None`` otherwise), replayed in backward.
        higher_order: record the backward's recomputation at every ``torch.func`` level.
        rng_check: the call was declared deterministic: a branch that touches the global
            RNG is an error.
        residual: single-stream residual blocks (``x = x + f(x); x = x + g(x)``, the
            classic ``SequentialSequence``) instead of the two-stream coupling.
        contexts: ``context_fn``'s selective-saving contexts of this call
            (:class:`revfunc.selective.SavedContexts`), or ``None``.
        units: per block, the module whose call gathers and releases the block's
            parameters (an FSDP2 module: ``fully_shard`` on the block), or ``None``
            throughout; see :func:`revfunc._walk.gathered`.
        couplings: per block ``(c_f, c_g)``, the :class:`revfunc.couplings.Coupling` of
            each update (``None`` for an additive one), or ``None``: every update
            additive (``x + h``), the path that computes exactly what it computed before
            couplings existed.
        logdet: the walk also returns the stack's log-determinant, summed over both updates
            of every block and over the last ``event_dim`` dimensions.
        event_dim: as ``torch.distributions.Transform.event_dim``.
        grad_mode: the caller's grad mode. The memory-saving forward runs each branch in
            it (recording, its output then detached), as the backward's recomputation
            runs it with grad enabled and plain autograd in the caller's mode: a branch
            that reads ``torch.is_grad_enabled()`` or caches a tensor derived from its
            parameters sees what it would see in plain autograd. Off inside ``torch.compile``.
    """

    where: str
    blocks: Tuple[Any, ...]
    binds: Tuple[Tuple[Bind, Bind], ...]
    seeds: Optional[Tuple[Tuple[int, int], ...]]
    boundaries: Tuple[int, ...] = ()
    autocast: Tuple[str, torch.dtype, bool] = ("cpu", torch.bfloat16, False)
    modes: Optional[Tuple[Any, ...]] = None
    higher_order: bool = False
    rng_check: bool = False
    residual: bool = False
    contexts: Any = None
    units: Optional[Tuple[Any, ...]] = None
    couplings: Optional[Tuple[Tuple[Any, Any], ...]] = None
    logdet: bool = False
    event_dim: int = 1
    grad_mode: bool = False

    def seed(self, index: int, branch: int) -> Optional[int]:
        return None if self.seeds is None else self.seeds[index][branch]

    def mode(self, index: int, branch: int):
        return None if self.modes is None else self.modes[index][branch]

    def coupling(self, index: int, branch: int):
        """Block ``index``'s coupling for ``branch``'s update, ``None`` when additive."""
        return None if self.couplings is None else self.couplings[index][branch]

    def layer(self, index: int) -> Optional[Invertible]:
        """Block ``index``'s invertible layer, or ``None`` for a coupling pair."""
        block = self.blocks[index]
        return block if isinstance(block, Invertible) else None

    def fn(self, index: int, branch: int) -> Any:
        """What block ``index``'s ``branch`` calls (a layer for both), for messages."""
        block = self.blocks[index]
        return block if isinstance(block, Invertible) else block[branch]

    def branch_label(self, index: int, branch: int) -> str:
        """``"f"``, ``"g"``, or ``"invertible layer"`` for a layer, for messages."""
        return LAYER if isinstance(self.blocks[index], Invertible) else BRANCHES[branch]

    def first_user(self, slot: int) -> Tuple[int, str, Any, str]:
        """``(block, branch, fn, label)`` of the first branch call bound to flat ``slot``."""
        for i, pair in enumerate(self.binds):
            for branch, b in enumerate(pair):
                for kind, slots in (("param", b.params), ("keyword", b.diff_kwargs + b.other_kwargs)):
                    for name, j in slots:
                        if j == slot:
                            return i, self.branch_label(i, branch), self.fn(i, branch), label(kind, name)
        raise LookupError(slot)


#: What messages call an invertible layer's place in a block (where a branch says "branch f").
LAYER = "invertible layer"


def param_pairs(blocks: Sequence[Any], params: Sequence[Any]) -> List[Any]:
    """``params`` with each invertible layer's dict as the pair ``(layer_params, {})``,
    the form every per-block walk over parameters reads."""
    return [
        (p, {}) if isinstance(b, Invertible) and not isinstance(p, (list, tuple)) else p for b, p in zip(blocks, params)
    ]


def label(kind: str, name: str) -> str:
    return {"input": "its input x", "param": f"parameter/buffer {name!r}", "keyword": f"keyword {name!r}"}[kind]


def bind(b: Bind, tensors: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The ``(params, kwargs)`` of one branch call, from the flat tensor list."""
    params = {name: tensors[j] for name, j in b.params}
    kwargs = dict(b.static)
    for name, j in b.diff_kwargs:
        kwargs[name] = tensors[j]
    for name, j in b.other_kwargs:
        kwargs[name] = tensors[j]
    return params, kwargs


class Overlay:
    """The flat tensor list with one block's parameters read from live dicts instead:
    ``live`` is ``(f_params, g_params)`` as the block's unit holds them inside its call
    (FSDP2's unsharded parameters), ``binds`` that block's pair of :class:`Bind`."""

    __slots__ = ("tensors", "live")

    def __init__(self, tensors: Sequence[torch.Tensor], binds: Tuple[Bind, Bind], live) -> None:
        self.tensors = tensors
        self.live = {j: params[name] for b, params in zip(binds, live) for name, j in b.params}

    def __getitem__(self, j: int) -> torch.Tensor:
        t = self.live.get(j)
        return self.tensors[j] if t is None else t


def under_compile() -> bool:
    return torch.compiler.is_compiling()


def validate(where, blocks, params, x1, x2, kwargs, generator, names=("x1", "x2")) -> None:
    """Every argument check a stack call makes before any computation."""
    _checks.check_blocks(where, blocks, params)
    _checks.check_stream_pair(where, x1, x2, names)
    layers = _layer_indices(blocks)
    _checks.check_params_device(where, param_pairs(blocks, params), x1.device, layers)
    _checks.check_kwargs(where, kwargs, len(blocks), layers)
    _checks.check_generator(where, generator, x1.device)


def _layer_indices(blocks) -> Tuple[int, ...]:
    return tuple(i for i, b in enumerate(blocks) if isinstance(b, Invertible))


def flatten(blocks, params, kwargs, dedupe=True) -> Tuple[List[torch.Tensor], Tuple[Tuple[Bind, Bind], ...]]:
    """Flat tensor list and per-branch binds.

    In eager mode each tensor gets one slot (by identity), so a tied tensor is saved and
    passed once. Under ``torch.compile`` every occurrence gets its own slot: Dynamo cannot
    take ``id()`` of functorch-wrapped tensors, and autograd sums the gradients of a
    tensor passed twice, so the result is the same.
    """
    dedupe = dedupe and not under_compile()
    slots: Dict[int, int] = {}
    tensors: List[torch.Tensor] = []

    def slot(t: torch.Tensor) -> int:
        if not dedupe:
            tensors.append(t)
            return len(tensors) - 1
        j = slots.get(id(t))
        if j is None:
            j = slots[id(t)] = len(tensors)
            tensors.append(t)
        return j

    binds: List[Any] = []
    for pair, kw in zip(param_pairs(blocks, params), kwargs if kwargs is not None else itertools.repeat(_NO_KWARGS)):
        block_binds = []
        for p, k in zip(pair, kw):
            param_slots = tuple((name, slot(t)) for name, t in p.items())
            diff: List[Tuple[str, int]] = []
            other: List[Tuple[str, int]] = []
            static: Dict[str, Any] = {}
            for name, v in k.items():
                if isinstance(v, torch.Tensor):
                    (diff if v.is_floating_point() else other).append((name, slot(v)))
                else:
                    static[name] = v
            block_binds.append(Bind(param_slots, tuple(diff), tuple(other), static))
        binds.append(tuple(block_binds))
    return tensors, tuple(binds)


def reject_forward_mode(where: str, tensors: Sequence[torch.Tensor]) -> None:
    """Raise a clear error under forward-mode AD (``torch.func.jvp``/``jacfwd``, dual tensors)."""
    if under_compile():
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    in_jvp = any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())
    if not in_jvp and torch.autograd.forward_ad._current_level >= 0:
        in_jvp = any(torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    if in_jvp:
        raise RuntimeError(
            f"{where}: forward-mode AD (torch.func.jvp, jacfwd, hessian, forward_ad dual tensors) "
            "is unsupported: the memory-saving Function defines reverse mode only. Use reverse "
            "mode (torch.func.vjp, jacrev; hessian as jacrev(jacrev(f))) or "
            "revfunc.sequential_sequence for forward-mode derivatives."
        )


def _seeds(generator: Optional[torch.Generator], depth: int, draw: bool) -> Optional[Tuple[Tuple[int, int], ...]]:
    """Child seeds for one call: one base-seed draw, then :func:`derive_seed` per branch.

    With no generator, nothing is drawn unless ``draw`` (a replay can happen), and never
    inside ``torch.compile``; branches then run with the global RNG as is.
    """
    if generator is None and (not draw or under_compile()):
        return None
    base = draw_base_seed(generator)
    return tuple((derive_seed(base, i, 0), derive_seed(base, i, 1)) for i in range(depth))


# Modules already warned about (forward hooks on a recomputed branch): once each.
_WARNED_HOOKS: "weakref.WeakSet" = weakref.WeakSet()


def _modes(where: str, blocks, warn_hooks: bool):
    """Per block, per branch: ``(modules, training flags)`` of a module-backed branch; warns
    once per module about forward (post-)hooks, which a recomputing backward fires twice
    and whose captured tensors carry no graph. (Pre-hooks such as ``weight_norm``'s
    recompute a parameter from others: harmless twice.)"""
    if under_compile():
        return None
    global_hooks = bool(torch.nn.modules.module._global_forward_hooks)
    modes: List[Any] = []
    for i, pair in enumerate(blocks):
        block: List[Any] = []
        if isinstance(pair, Invertible):
            modes.append((None, None))
            continue
        for branch, fn in enumerate(pair):
            modules = getattr(fn, "submodules", None)
            if modules is None:
                block.append(None)
                continue
            block.append((modules, tuple(m.training for m in modules)))
            if warn_hooks and (global_hooks or any(m._forward_hooks for m in modules)):
                _warn_hooks(where, i, BRANCHES[branch], fn)
        modes.append(tuple(block))
    return tuple(modes)


def _warn_hooks(where: str, index: int, branch: str, fn) -> None:
    import warnings

    for name, module in fn.module.named_modules():
        hooked = module._forward_hooks or torch.nn.modules.module._global_forward_hooks
        if hooked and module not in _WARNED_HOOKS:
            _WARNED_HOOKS.add(module)
            warnings.warn(
                _checks.hooks_warning(where, index, branch, name or "<root>", module), UserWarning, stacklevel=5
            )
            return


def _non_additive(pairs):
    """The plan's couplings: each additive update as ``None`` (the engine's additive path)."""
    if pairs is None:
        return None
    return tuple(tuple(None if c.is_additive else c for c in pair) for pair in pairs)


def make_plan(
    where,
    blocks,
    params,
    kwargs,
    generator,
    x1,
    x2=None,
    *,
    checkpoint_every=None,
    reverse_mode_only=False,
    higher_order=False,
    dedupe=True,
    replay=None,
    deterministic=False,
    recomputes=True,
    residual=False,
    context_fn=None,
    units=None,
    coupling=None,
    logdet=False,
    event_dim=1,
) -> Tuple[Plan, List[torch.Tensor]]:
    """Flatten the call's tensors and fix its seeds and autocast state in a :class:`Plan`.

    ``replay``: whether the call's random numbers must be replayable (``None``: when
    grad is enabled and an input requires it, i.e. a backward can follow). Without a
    generator, a seed is drawn from the global RNG only then, and not when
    ``deterministic`` (where the forward instead checks that no branch uses the RNG).
    ``recomputes``: a backward will re-run the branches (reversible paths), so forward
    hooks on branch modules are warned about. ``context_fn``: selective saving (see
    :mod:`revfunc.selective`), used when a backward can follow. ``units``: see
    :attr:`Plan.units`. ``coupling``: the ``coupling=`` argument (checked here, see
    :func:`revfunc.couplings.per_block`); ``logdet``, ``event_dim``: see :class:`Plan`.
    """
    tensors, binds = flatten(blocks, params, kwargs, dedupe)
    stream = (x1,) if x2 is None else (x1, x2)
    if reverse_mode_only:
        reject_forward_mode(where, (*stream, *tensors))
    if replay is None:
        replay = torch.is_grad_enabled() and any(t.requires_grad for t in (*stream, *tensors))
    draw = replay and not deterministic
    depth = len(blocks)
    boundaries = () if checkpoint_every is None else tuple(range(checkpoint_every, depth, checkpoint_every))
    device_type = x1.device.type
    plan = Plan(
        where=where,
        blocks=tuple(b if isinstance(b, Invertible) else tuple(b) for b in blocks),
        binds=binds,
        seeds=_seeds(generator, depth, draw),
        boundaries=boundaries,
        autocast=(device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)),
        modes=_modes(where, blocks, recomputes and replay),
        higher_order=higher_order,
        rng_check=generator is None and deterministic and replay and not under_compile(),
        residual=residual,
        contexts=SavedContexts(context_fn) if context_fn is not None and replay else None,
        units=units,
        couplings=_non_additive(per_block(where, coupling, depth)),
        logdet=logdet,
        event_dim=event_dim,
        grad_mode=torch.is_grad_enabled() and not under_compile(),
    )
    return plan, tensors
