"""Drop-in ``nn.Module`` adapters for the classic reversible container API.

Swap ``from reversible import ReversibleSequence, SequentialSequence`` for
``from revfunc.nn import ReversibleSequence, SequentialSequence``: constructors, call
signatures and ``state_dict`` keys (``blocks.N.f.net.*``, ``blocks.N.g.net.*``) are the
classic ones; ``forward`` also takes ``generator=``. The modules hold ordinary
submodules and parameters, and ``forward`` calls :func:`revfunc.reversible_sequence`
with the live parameters, so optimizers, ``state_dict``, ``.to()`` and DDP see a normal
module.

Dims: ``*`` leading dims (batch, tokens), ``d`` the model width.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from revfunc import _checks, _walk
from revfunc._plan import make_plan
from revfunc._walk import Gathered
from revfunc.couplings import Coupling, CouplingSpec, additive, per_block
from revfunc.functional import PureModule, registered_since, structure_generation
from revfunc.random import accepts_generator
from revfunc.routing import check_router, layer_drop, route_args
from revfunc.sequence import apply_inverse, apply_stack

__all__ = ["ReversibleSequence", "SequentialSequence", "ReversibleBlock"]


def _reject_stateful(where: str, module: nn.Module, prefix: str) -> None:
    """Raise for submodules that update buffers in training forward (e.g. BatchNorm).

    The backward recomputation would update their running statistics a second time.
    """
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.track_running_stats:
            raise ValueError(
                f"{where}: submodule {name!r} ({type(sub).__name__}) updates its running statistics in "
                "training forward, and the reversible backward re-runs forward, updating them twice. "
                "Use LayerNorm/GroupNorm, or track_running_stats=False, or SequentialSequence."
            )


def _has_lazy(module: nn.Module) -> bool:
    """Whether ``module`` holds a lazy module (``nn.LazyLinear``, ...) not yet materialized."""
    return any(
        isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params() for m in module.modules()
    )


def _materialize(where: str, blocks: Sequence["ReversibleBlock"], x1: torch.Tensor, x2: torch.Tensor, kwargs) -> None:
    """Run ``blocks`` once in plain autograd under no grad, so that their lazy modules infer
    their shapes (as a plain model's first call does), then settle each block's pure view
    and refuse what the materialized modules turned out to be (a ``LazyBatchNorm``)."""
    layers = [(_LiveModule(b.f.net), _LiveModule(b.g.net)) for b in blocks]
    plan, tensors = make_plan(
        where, layers, [({}, {})] * len(layers), kwargs, None, x1, x2, replay=False, recomputes=False
    )
    with torch.no_grad():
        _walk.forward(plan, x1, x2, tensors)
    for block in blocks:
        _reject_stateful(where, block, "")
        block._lazy = False
        block.pure()


def _dropout_rate(module: nn.Module) -> float:
    """The probability with which ``module`` draws random numbers in training (0: never)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p
    if isinstance(module, nn.RReLU):
        return 1.0
    for name in ("dropout", "dropout_p"):  # SDPA-style attention, nn.MultiheadAttention
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return 0.0


def _random_submodules(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, submodule)`` for the submodules that can draw random numbers in training:
    dropout modules, ``nn.RReLU``, and modules with a float ``dropout``/``dropout_p``
    attribute (attention on ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``).

    Other random ops (``torch.rand`` in a custom forward) are not seen here; revfunc
    catches them at call time instead (see :class:`ReversibleSequence`).
    """
    return [
        (name, sub)
        for name, sub in module.named_modules()
        if isinstance(sub, (nn.modules.dropout._DropoutNd, nn.RReLU))
        or any(_is_rate(getattr(sub, a, None)) for a in ("dropout", "dropout_p"))
    ]


def _is_rate(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _active(candidates) -> List[Tuple[str, nn.Module]]:
    return [(name, sub) for name, sub in candidates if sub.training and _dropout_rate(sub) > 0]


def _reject_unseeded_dropout(candidates) -> None:
    """Inside torch.compile no seed is drawn without a generator, so the recomputation
    could not replay active dropout: refuse rather than return wrong gradients."""
    for name, sub in _active(candidates):
        raise RuntimeError(
            f"revfunc.nn.ReversibleSequence: submodule {name!r} ({type(sub).__name__}, p={_dropout_rate(sub)}) is "
            "active inside torch.compile without a generator, and its masks could not be replayed in backward. "
            "Pass generator=torch.Generator() to forward (the seed draw then breaks the graph), or call "
            ".eval() / set p=0 for a fullgraph compile."
        )


class _Branch(nn.Module):
    """Holds one branch module as ``.net`` (the classic ``Deterministic`` key layout)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.net(x, **kwargs)


class ReversibleBlock(nn.Module):
    """One coupling block ``(f, g)`` on a stream that holds both halves along ``split_dim``.

    ``forward(x)`` splits ``x`` into halves ``(x1, x2)`` along ``split_dim`` (the last dim
    by default), applies ``y1 = c_f(x1, f(x2)); y2 = c_g(x2, g(y1))`` (``x + h`` by
    default) with the memory-saving backward, and returns their concatenation;
    ``forward(x, return_logdet=True)`` also returns the log-determinant, summed over
    ``split_dim`` and every dim after it. ``inverse(y)`` undoes it.

    Args:
        f, g: the branch modules, each mapping a half to a tensor shaped like it (or what
            the coupling takes: ``affine`` takes twice the size along its ``dim``).
        coupling: a :class:`revfunc.couplings.Coupling` for both updates, a pair
            ``(c_f, c_g)``, or ``None`` (additive).
        split_dim: the dim that holds the two halves.

    Shapes: (*, 2 * d) -> (*, 2 * d) with the default ``split_dim=-1``.
    """

    def __init__(self, f: nn.Module, g: nn.Module, coupling: CouplingSpec = None, split_dim: int = -1):
        super().__init__()
        self.f = _Branch(f)
        self.g = _Branch(g)
        where = "revfunc.nn.ReversibleBlock"
        pairs = per_block(where, coupling if not isinstance(coupling, list) else tuple(coupling), 1)
        self.coupling = None if pairs is None else pairs[0]
        self.split_dim = _check_split_dim(where, split_dim, allow_none=False)
        self._pure = (PureModule(f), PureModule(g))
        self._lazy = _has_lazy(self)  # lazy modules: materialized by the first forward
        self._generation = structure_generation()
        # (name, module) of the branches' dropout-like submodules, refreshed with the pure view.
        self._random_candidates = _random_submodules(self)

    def pure(self) -> Tuple[Tuple[PureModule, PureModule], Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]:
        """``((f_fn, g_fn), (f_params, g_params))`` with the live parameters.

        Follows the live module tree: when any module has registered a submodule,
        parameter or buffer since the last call (a replaced ``f.net``, ``net[0] = ...``,
        ``weight_norm``, a new parameter), the pure view is rebuilt, and modules that
        update running statistics are rejected again.
        """
        if torch.compiler.is_compiling():
            # Read only: a write here would change a guarded attribute and recompile.
            if self.f.net is not self._pure[0].module or self.g.net is not self._pure[1].module:
                raise RuntimeError(
                    "revfunc.nn.ReversibleBlock: a branch module was replaced since the last eager call, and "
                    "torch.compile cannot rebuild the block's pure view while tracing. Call the model once "
                    "outside torch.compile after editing it (or edit it before compiling)."
                )
            return self._pure, (self._pure[0].live_params(), self._pure[1].live_params())
        generation = structure_generation()
        if self._generation != generation:
            # A registration somewhere: rebuild if the branches were replaced, or if one of
            # their own modules registered something and their layout really changed.
            if (
                self.f.net is not self._pure[0].module
                or self.g.net is not self._pure[1].module
                or (
                    registered_since(self._generation, self._pure[0].submodules + self._pure[1].submodules)
                    and not (self._pure[0].is_current() and self._pure[1].is_current())
                )
            ):
                _reject_stateful("revfunc.nn.ReversibleBlock", self, "")
                self._pure = (PureModule(self.f.net), PureModule(self.g.net))
                self._random_candidates = _random_submodules(self)
                self._lazy = _has_lazy(self)
            self._generation = generation
        return self._pure, (self._pure[0].live_params(), self._pure[1].live_params())

    def random_candidates(self) -> List[Tuple[str, nn.Module]]:
        """``(name, module)`` of the branches' submodules that can draw random numbers in
        training (dropout-like), as of the last :meth:`pure` call."""
        cached = self.__dict__.get("_random_candidates")  # absent on blocks pickled before it existed
        if cached is None:
            cached = self.__dict__["_random_candidates"] = _random_submodules(self)
        return cached

    def forward(
        self,
        x: torch.Tensor,
        f_args: Optional[Mapping[str, Any]] = None,
        g_args: Optional[Mapping[str, Any]] = None,
        generator: Optional[torch.Generator] = None,
        return_logdet: bool = False,
    ):
        if type(x) is Gathered:
            # The walk running this block inside a ReversibleSequence (revfunc._walk.gathered),
            # through this module's call so that its hooks (FSDP2's) run around the block;
            # the two stream halves come in the next two places.
            return x(self.pure()[1], f_args, g_args)
        where = "revfunc.nn.ReversibleBlock"
        split_dim = self.__dict__.get("split_dim", -1)  # absent on blocks pickled before it
        x1, x2 = _split(where, x, split_dim)
        kwargs = [(f_args or {}, g_args or {})]
        if self.__dict__.get("_lazy"):
            _materialize(where, [self], x1, x2, kwargs)
        fns, params = self.pure()
        out = apply_stack(
            [fns],
            [params],
            x1,
            x2,
            kwargs=kwargs,
            generator=generator,
            where=where,
            coupling=_couplings([self]),
            return_logdet=return_logdet,
            event_dim=_event_dim(x, split_dim),
        )
        y = torch.cat([out[0], out[1]], dim=split_dim)
        return (y, out[2]) if return_logdet else y

    def inverse(
        self,
        y: torch.Tensor,
        f_args: Optional[Mapping[str, Any]] = None,
        g_args: Optional[Mapping[str, Any]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """``x`` with ``self(x) == y`` (give ``generator`` in the state ``forward`` got it)."""
        where = "revfunc.nn.ReversibleBlock.inverse"
        split_dim = self.__dict__.get("split_dim", -1)
        y1, y2 = _split(where, y, split_dim)
        fns, params = self.pure()
        x1, x2 = apply_inverse(
            [fns],
            [params],
            y1,
            y2,
            kwargs=[(f_args or {}, g_args or {})],
            generator=generator,
            where=where,
            coupling=_couplings([self]),
        )
        return torch.cat([x1, x2], dim=split_dim)


def _couplings(blocks) -> Optional[List[Tuple[Coupling, Coupling]]]:
    """The ``coupling=`` of a walk over ``blocks``: their pairs (``None``: all additive)."""
    pairs = [block.__dict__.get("coupling") for block in blocks]
    if all(pair is None for pair in pairs):
        return None
    return [(additive(), additive()) if pair is None else pair for pair in pairs]


def _check_split_dim(where: str, split_dim: Any, allow_none: bool = True) -> Optional[int]:
    if split_dim is None and allow_none:
        return None
    if isinstance(split_dim, bool) or not isinstance(split_dim, int):
        expected = "None (the classic container) or an int dim" if allow_none else "an int dim"
        raise TypeError(_checks.msg(where, "split_dim", expected, _checks.describe(split_dim)))
    return split_dim


def _split(where: str, x: Any, split_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The halves ``(x1, x2)`` of ``x`` along ``split_dim``, or an error naming the shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(_checks.msg(where, "x", "a torch.Tensor", _checks.describe(x)))
    if x.dim() == 0 or not -x.dim() <= split_dim < x.dim():
        raise ValueError(f"{where}: x needs a dim {split_dim} to split into (x1, x2); got x.shape={tuple(x.shape)}.")
    if x.shape[split_dim] % 2:
        what = "last dim" if split_dim == -1 else f"size along split_dim={split_dim}"
        fix = " For (B, C, H, W) images split the channels: split_dim=1." if split_dim == -1 and x.dim() == 4 else ""
        raise ValueError(f"{where}: x needs an even {what} to split into (x1, x2); got x.shape={tuple(x.shape)}.{fix}")
    x1, x2 = x.chunk(2, dim=split_dim)
    return x1, x2


def _event_dim(x: torch.Tensor, split_dim: int) -> int:
    """The log-det sums over ``split_dim`` and every dim after it."""
    return x.dim() - split_dim % x.dim()


def _check_layers(where: str, layers: Any) -> List[Tuple[nn.Module, nn.Module]]:
    """``layers`` as a list of ``(f, g)`` module pairs, or a TypeError naming ``layers[i]``."""
    if isinstance(layers, nn.Module) and not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            _checks.msg(where, "layers", "an nn.ModuleList of (f, g) module pairs", _checks.describe(layers))
        )
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(
            _checks.msg(where, "layers", "an nn.ModuleList of (f, g) module pairs", _checks.describe(layers))
        ) from None
    pairs = []
    for i, pair in enumerate(items):
        pair = list(pair) if isinstance(pair, (nn.ModuleList, nn.Sequential, list, tuple)) else pair
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(m, nn.Module) for m in pair)):
            raise TypeError(
                _checks.msg(
                    where,
                    f"layers[{i}]",
                    "a pair (f, g) of nn.Modules",
                    _checks.describe(pair),
                    "Wrap plain functions in an nn.Module; pass one (f, g) pair per block.",
                )
            )
        pairs.append((pair[0], pair[1]))
    return pairs


def _check_layer_dropout(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(_checks.msg(where, "layer_dropout", "a float probability in [0, 1)", _checks.describe(value)))
    if not 0.0 <= value < 1.0:  # also rejects nan
        raise ValueError(_checks.msg(where, "layer_dropout", "a probability in [0, 1)", repr(value)))
    return float(value)


def _kept_layers(module: Any, depth: int, generator: Optional[torch.Generator]) -> List[int]:
    if module.training and module.layer_dropout > 0:
        return layer_drop(depth, module.layer_dropout, generator)
    return list(range(depth))


class ReversibleSequence(nn.Module):
    """Drop-in for the classic ``ReversibleSequence``, with activation memory O(1) in depth.

    Args:
        blocks: ``nn.ModuleList`` of ``(f, g)`` module pairs; each maps ``(*, d)`` to ``(*, d)``.
        args_route: ``{name: ((to_f, to_g),) * depth}`` routing call keywords to branches.
        layer_dropout: probability of dropping each block in training (never all).
        context_fn: selective saving (see :func:`revfunc.reversible_sequence`), e.g.
            ``revfunc.selective.save_attention`` to keep each block's attention output.
        coupling: how each branch output updates its half (:mod:`revfunc.couplings`):
            one coupling, a pair ``(c_f, c_g)``, or one pair per block; ``None``: additive.
        split_dim: ``None``, the classic container: the stack runs on ``(x, x)`` and
            returns ``y1 + y2``. An int: ``x`` is split into halves along that dim
            (RevLib's ``split_dim``; ``1`` for the channels of ``(B, C, H, W)``) and the
            halves' concatenation is returned: then ``inverse`` and
            ``forward(x, return_logdet=True)`` exist.
        checkpoint_every: keep the exact stream every ``k`` blocks (bounds reconstruction
            drift; see docs/numerics.md).

    ``forward(x, generator=None, return_logdet=False, **kwargs)``: ``generator`` drives
    layer dropout and every random op in the blocks (replayed exactly in backward);
    ``None`` draws one seed from the global RNG per call. ``return_logdet`` (with
    ``split_dim``) also returns the log-determinant, summed over ``split_dim`` and every
    dim after it: one value per sample for ``(B, C, H, W)`` split on channels.

    Lazy modules (``nn.LazyLinear``, ...) are materialized by the first ``forward``, which
    runs the blocks once more in plain mode under no grad, as a plain model's first call
    would infer their shapes.

    Shapes: (*, d) -> (*, d); with ``split_dim``: x -> same shape[, (B,)].

    Raises:
        ValueError: at construction, for a route whose length is not the depth or for
            submodules that update running statistics (BatchNorm); at call, for an
            unrouted keyword.
    """

    def __init__(
        self,
        blocks: Iterable[Any],
        args_route: Optional[Mapping[str, Any]] = None,
        layer_dropout: float = 0.0,
        context_fn: Optional[Any] = None,
        *,
        coupling: CouplingSpec = None,
        split_dim: Optional[int] = None,
        checkpoint_every: Optional[int] = None,
    ):
        super().__init__()
        where = "revfunc.nn.ReversibleSequence"
        _checks.check_context_fn_type(where, context_fn)
        self.context_fn = context_fn
        pairs = _check_layers(where, blocks)
        self.args_route = dict(args_route or {})
        check_router(where, self.args_route, len(pairs))
        self.layer_dropout = _check_layer_dropout(where, layer_dropout)
        self.split_dim = _check_split_dim(where, split_dim)
        _checks.check_positive_int(where, "checkpoint_every", checkpoint_every)
        self.checkpoint_every = checkpoint_every
        couplings = per_block(where, coupling, len(pairs)) or [None] * len(pairs)
        blocks = [
            ReversibleBlock(f=f, g=g, coupling=c, split_dim=-1 if split_dim is None else split_dim)
            for (f, g), c in zip(pairs, couplings)
        ]
        self.blocks: Any = nn.ModuleList(blocks)  # of ReversibleBlock
        _reject_stateful(where, self.blocks, "blocks")
        for block in blocks:
            block.pure()  # settle the pure views after the registrations above

    def forward(
        self, x: torch.Tensor, generator: Optional[torch.Generator] = None, return_logdet: bool = False, **kwargs: Any
    ):
        where = "revfunc.nn.ReversibleSequence"
        if generator is None and torch.compiler.is_compiling():
            _reject_unseeded_dropout(_random_submodules(self))  # full names; traced once per graph
        split_dim = self.__dict__.get("split_dim")  # absent on pickles before it
        if return_logdet and split_dim is None:
            raise ValueError(_needs_split_dim(where, "return_logdet=True"))
        routed = route_args(self.args_route, kwargs, len(self.blocks))
        if len(self.blocks) == 0:  # the classic container returns the two halves' sum
            return x + x if split_dim is None else x
        x1, x2 = (x, x.view_as(x)) if split_dim is None else _split(where, x, split_dim)
        if any(block.__dict__.get("_lazy") for block in self.blocks):
            _materialize(where, self.blocks, x1, x2, routed)
        keep, fns, params, deterministic = self._kept(generator)
        # Classic: both halves start as x (cat([x, x], -1)); a view keeps the two Function
        # inputs distinct tensors, which Dynamo requires.
        out = apply_stack(
            list(fns),
            list(params),
            x1,
            x2,
            kwargs=[routed[i] for i in keep],
            generator=generator,
            deterministic=deterministic,
            context_fn=self.__dict__.get("context_fn"),
            units=_units(self.blocks, keep, params),
            where=where,
            coupling=_couplings([self.blocks[i] for i in keep]),
            checkpoint_every=self.__dict__.get("checkpoint_every"),
            return_logdet=return_logdet,
            event_dim=1 if split_dim is None else _event_dim(x, split_dim),
        )
        if split_dim is None:
            return out[0] + out[1]
        y = torch.cat([out[0], out[1]], dim=split_dim)
        return (y, out[2]) if return_logdet else y

    def _kept(self, generator: Optional[torch.Generator]):
        """``(keep, fns, params, deterministic)`` of one walk: the blocks layer dropout
        keeps, their pure views and live parameters, and whether the call is
        deterministic. With no dropout-like submodule active (none, all p == 0, or eval
        mode) no seed is drawn and no RNG state is forked per branch; the walk instead
        checks that no branch touched the global RNG (a custom random op raises, naming
        the block)."""
        keep = _kept_layers(self, len(self.blocks), generator)
        fns, params = zip(*(self.blocks[i].pure() for i in keep))  # also refreshes the candidates
        candidates = [c for i in keep for c in self.blocks[i].random_candidates()]
        return keep, fns, params, generator is None and not _active(candidates)

    def inverse(self, y: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs: Any) -> torch.Tensor:
        """``x`` with ``self(x) == y``, for a container with ``split_dim`` (the classic one
        returns ``y1 + y2``, which no inverse can split again). Give ``generator`` in the
        state ``forward`` got it (layer dropout and random branches replay), or call it in
        eval mode. Sampling a flow is this inverse run on noise.

        Shapes: y -> x of the same shape.
        """
        where = "revfunc.nn.ReversibleSequence.inverse"
        split_dim = self.__dict__.get("split_dim")
        if split_dim is None:
            raise ValueError(_needs_split_dim(where, "inverse"))
        routed = route_args(self.args_route, kwargs, len(self.blocks))
        if len(self.blocks) == 0:
            return y
        y1, y2 = _split(where, y, split_dim)
        keep, fns, params, deterministic = self._kept(generator)
        x1, x2 = apply_inverse(
            list(fns),
            list(params),
            y1,
            y2,
            kwargs=[routed[i] for i in keep],
            generator=generator,
            where=where,
            coupling=_couplings([self.blocks[i] for i in keep]),
            deterministic=deterministic,
        )
        return torch.cat([x1, x2], dim=split_dim)


def _needs_split_dim(where: str, what: str) -> str:
    return (
        f"{where}: {what} needs split_dim: the classic container (split_dim=None) runs on (x, x) and returns "
        "y1 + y2, which is not invertible. Build it with split_dim=-1 (features) or split_dim=1 (channels)."
    )


def _units(blocks: nn.ModuleList, keep: List[int], params) -> Optional[Tuple[Optional[nn.Module], ...]]:
    """Per kept block, the block itself if it is an FSDP2 module (``fully_shard`` on the
    block): the walk then runs the block inside its call, where FSDP2 gathers and
    releases its parameters. ``None`` when no block is one.

    Raises:
        RuntimeError: a block that is not a unit holds sharded parameters (``fully_shard``
            on its branches or their submodules), which no call would gather.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    if fsdp is None or torch.compiler.is_compiling():  # compiled: the stack's Function refuses units
        return None
    units = tuple(blocks[i] if isinstance(blocks[i], fsdp.FSDPModule) else None for i in keep)
    from torch.distributed.tensor import DTensor

    for unit, i, pair in zip(units, keep, params):
        # One parameter per branch: a sharded branch has them all sharded (a sharded
        # submodule deeper down fails in DTensor's own check instead).
        if unit is None and any(isinstance(next(iter(p.values()), None), DTensor) for p in pair):
            raise RuntimeError(
                f"revfunc.nn.ReversibleSequence: block {i}'s parameters are sharded (DTensor), but block {i} is "
                f"not an FSDP2 unit, so nothing would gather them: call fully_shard on model.blocks[{i}] itself "
                "(one unit per block, not on its branches or their submodules) and on the model; see "
                "docs/distributed.md."
            )
    return units if any(u is not None for u in units) else None


class _LiveModule:
    """A module called with its own live parameters, in branch-function form."""

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    def accepts_generator(self) -> bool:
        return accepts_generator(self.module.forward)

    def __call__(self, _params: Any, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.module(x, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self.module).__name__}"


class SequentialSequence(nn.Module):
    """Drop-in for the classic ``SequentialSequence``: ``x = x + f(x); x = x + g(x)``.

    Plain autograd (stores every activation). ``args_route`` and ``layer_dropout`` as in
    :class:`ReversibleSequence`. With ``generator``, each branch runs with its own child
    seed (see :mod:`revfunc.random`); with ``None`` it uses the global RNG as is, like
    the classic class.

    With ``coupling`` or ``split_dim`` it is the plain-autograd reference of
    :class:`ReversibleSequence` built with the same arguments: the same two-stream
    coupling (``forward(x, return_logdet=True)`` with ``split_dim``), storing everything.

    Shapes: (*, d) -> (*, d).
    """

    def __init__(
        self,
        layers: Iterable[Any],
        args_route: Optional[Mapping[str, Any]] = None,
        layer_dropout: float = 0.0,
        *,
        coupling: CouplingSpec = None,
        split_dim: Optional[int] = None,
    ):
        super().__init__()
        where = "revfunc.nn.SequentialSequence"
        pairs = _check_layers(where, layers)
        self.args_route = dict(args_route or {})
        check_router(where, self.args_route, len(pairs))
        self.layers: Any = layers if isinstance(layers, nn.Module) else nn.ModuleList(nn.ModuleList(p) for p in pairs)
        self.layer_dropout = _check_layer_dropout(where, layer_dropout)
        self.split_dim = _check_split_dim(where, split_dim)
        self.couplings = per_block(where, coupling, len(pairs))
        self.coupled = coupling is not None or split_dim is not None  # the two-stream walk

    def forward(
        self, x: torch.Tensor, generator: Optional[torch.Generator] = None, return_logdet: bool = False, **kwargs: Any
    ):
        where = "revfunc.nn.SequentialSequence"
        coupled = self.__dict__.get("coupled", False)  # absent on pickles before it
        split_dim = self.__dict__.get("split_dim")
        if return_logdet and split_dim is None:
            raise ValueError(_needs_split_dim(where, "return_logdet=True"))
        routed = route_args(self.args_route, kwargs, len(self.layers))
        if len(self.layers) == 0:
            return x + x if coupled and split_dim is None else x
        _checks.check_stream_pair(where, x, x, ("x", "x"))
        _checks.check_generator(where, generator, x.device)
        keep = _kept_layers(self, len(self.layers), generator)
        blocks = [(_LiveModule(self.layers[i][0]), _LiveModule(self.layers[i][1])) for i in keep]
        x1, x2 = (x, None) if not coupled else (x, x) if split_dim is None else _split(where, x, split_dim)
        couplings = self.__dict__.get("couplings")
        # The one engine, as a plain walk: seeds only with a generator (the global RNG as
        # is otherwise, like the classic class); no recomputation. Without a coupling or a
        # split, the classic single-stream residual walk.
        plan, tensors = make_plan(
            where,
            blocks,
            [({}, {})] * len(keep),
            [routed[i] for i in keep],
            generator,
            x1,
            x2,
            replay=generator is not None,
            recomputes=False,
            residual=not coupled,
            coupling=None if couplings is None else [couplings[i] for i in keep],
            logdet=return_logdet,
            event_dim=1 if split_dim is None else _event_dim(x, split_dim),
        )
        y1, y2, _, logdet = _walk.forward(plan, x1, x2, tensors)
        if not coupled:
            return y1
        if split_dim is None:
            return y1 + y2
        y = torch.cat([y1, y2], dim=split_dim)
        return (y, logdet) if return_logdet else y
