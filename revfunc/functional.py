"""Turn ``nn.Module`` s into pure branch functions over parameter dicts.

A branch function is ``fn(params, x, **kwargs) -> Tensor``; ``params`` is a dict
``{name: tensor}`` (a pytree), so ``torch.func.grad`` differentiates it at argnums 0.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import nn

from revfunc import _checks
from revfunc._types import Block, BranchFn, Params

__all__ = ["pure", "pure_blocks", "PureModule", "split_buffers", "merge_buffers"]

# Bumped whenever any module anywhere registers a submodule, parameter or buffer
# (assignment, weight_norm, parametrizations, register_*): containers that cache the
# structure of their modules compare it to rebuild when their tree may have changed.
# Each registering module is stamped with the new count, so a container can tell
# whether a registration touched *its* modules (a few lookups) without walking its tree.
_STRUCTURE_GENERATION = [0]
_STAMPS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_STAMPS_UNTRACKED = [0]  # the last count stamped on a module that takes no weak reference


def _structure_changed(module: nn.Module, *_args: Any) -> None:
    _STRUCTURE_GENERATION[0] += 1
    try:
        _STAMPS[module] = _STRUCTURE_GENERATION[0]
    except TypeError:  # a module that cannot be weakly referenced: every check then rebuilds
        _STAMPS_UNTRACKED[0] = _STRUCTURE_GENERATION[0]
    # returns None: the registration proceeds unchanged


for _register in (
    nn.modules.module.register_module_module_registration_hook,
    nn.modules.module.register_module_parameter_registration_hook,
    nn.modules.module.register_module_buffer_registration_hook,
):
    _register(_structure_changed)


def structure_generation() -> int:
    """A counter that changes whenever any module registers a submodule, parameter or buffer."""
    return _STRUCTURE_GENERATION[0]


def registered_since(generation: int, modules: Iterable[nn.Module]) -> bool:
    """Whether any of ``modules`` registered a submodule, parameter or buffer after
    :func:`structure_generation` returned ``generation``."""
    if _STAMPS_UNTRACKED[0] > generation:
        return True
    return any(_STAMPS.get(m, 0) > generation for m in modules)


class PureModule:
    """``fn(params, *args, **kwargs) == torch.func.functional_call(module, params, args, kwargs)``.

    Holds a reference to ``module`` (its structure, not its state: the tensors used are
    the ones passed in ``params``). ``accepts_generator`` tells revfunc whether the
    module's ``forward`` declares an explicit ``generator`` keyword.

    Pure: calling it reads ``params`` and the arguments; it mutates nothing (unless the
    module itself updates buffers in forward, which reversible stacks reject).
    """

    __slots__ = ("module", "accepts_generator", "submodules", "_owners", "_layout", "__weakref__")

    def __init__(self, module: nn.Module):
        self.module = module
        try:
            parameter = inspect.signature(module.forward).parameters.get("generator")
        except (TypeError, ValueError):
            parameter = None
        self.accepts_generator = parameter is not None and parameter.kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        # (name, the dict holding it, its key there) for each parameter and buffer.
        owners = []
        for kind in ("_parameters", "_buffers"):
            for prefix, sub in module.named_modules():
                for key in getattr(sub, kind):
                    owners.append((f"{prefix}.{key}" if prefix else key, getattr(sub, kind), key))
        self._owners = tuple(owners)
        #: every module of the tree (for replaying the forward's train/eval state).
        self.submodules = tuple(module.modules())
        self._layout = self._current_layout()

    def _current_layout(self):
        return tuple(
            (name, tuple(sub._parameters), tuple(sub._buffers), tuple(sub._modules))
            for name, sub in self.module.named_modules()
        )

    def is_current(self) -> bool:
        """Whether the module tree still has the submodules, parameter and buffer names
        this view was built from (compared after any registration anywhere)."""
        return self._layout == self._current_layout() and all(
            a is b for a, b in zip(self.submodules, self.module.modules())
        )

    def live_params(self) -> Dict[str, torch.Tensor]:
        """The module's current parameters and buffers, like :func:`module_params`, read
        through the holders recorded at construction (no module traversal per call)."""
        out = {}
        for name, holder, key in self._owners:
            t = holder.get(key)
            if t is not None:
                out[name] = t
        return out

    def is_live(self, params: Params) -> bool:
        """Whether ``params`` are exactly the module's current tensors (by identity)."""
        if len(params) > len(self._owners):
            return False
        seen = 0
        for name, holder, key in self._owners:
            t = params.get(name)
            if t is None:
                if holder.get(key) is not None:
                    return False
                continue
            if holder.get(key) is not t:
                return False
            seen += 1
        return seen == len(params)

    def __call__(self, params: Params, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.is_live(params):  # same tensors: functional_call would swap in what is there
            return self.module(*args, **kwargs)
        return torch.func.functional_call(self.module, params, args, kwargs)  # type: ignore[arg-type]  # a Mapping

    def __repr__(self) -> str:
        return f"PureModule({type(self.module).__name__})"


def module_params(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Live parameters and buffers of ``module`` as ``{name: tensor}`` (tied ones once)."""
    params: Dict[str, torch.Tensor] = dict(module.named_parameters())
    params.update(module.named_buffers())
    return params


def pure(module: nn.Module) -> Tuple[BranchFn, Dict[str, torch.Tensor]]:
    """Split a module into a pure function and its parameter dict.

    Args:
        module: any ``nn.Module``.

    Returns:
        ``(fn, params)``: ``fn(params, *args, **kwargs)`` equals
        ``torch.func.functional_call(module, params, args, kwargs)``; ``params`` maps the
        names of the module's parameters and buffers to its live tensors (not copies:
        gradients of a loss built from them reach ``module``'s ``.grad`` as usual).

    Pure: reads the module; mutates nothing.

    Example:
        >>> fn, params = pure(torch.nn.Linear(3, 3))
        >>> sorted(params)
        ['bias', 'weight']
        >>> fn(params, torch.zeros(2, 3)).shape
        torch.Size([2, 3])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(_checks.msg("revfunc.pure", "module", "an nn.Module", _checks.describe(module)))
    return PureModule(module), module_params(module)


def pure_blocks(
    layers: Iterable[Any],
) -> Tuple[List[Block], List[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]]:
    """Pure ``(f, g)`` pairs and their parameter dicts from ``(f_module, g_module)`` pairs.

    Args:
        layers: an iterable of ``(f_module, g_module)`` pairs, e.g. an ``nn.ModuleList``
            of two-element ``nn.ModuleList`` s (what the classic container takes).

    Returns:
        ``(blocks, params)`` with ``blocks[i] == (f_fn, g_fn)`` and
        ``params[i] == (f_params, g_params)``, ready for
        :func:`revfunc.reversible_sequence`.

    Pure: reads the modules; mutates nothing.
    """
    blocks, params = [], []
    for i, pair in enumerate(layers):
        pair = list(pair) if isinstance(pair, (nn.ModuleList, nn.Sequential)) else pair
        if not isinstance(pair, (list, tuple)) or len(pair) != 2 or not all(isinstance(m, nn.Module) for m in pair):
            raise TypeError(
                _checks.msg(
                    "revfunc.pure_blocks",
                    f"layers[{i}]",
                    "a pair (f_module, g_module) of nn.Modules",
                    _checks.describe(pair),
                )
            )
        (f, fp), (g, gp) = pure(pair[0]), pure(pair[1])
        blocks.append((f, g))
        params.append((fp, gp))
    return blocks, params


def _map_dicts(fn, tree):
    """Apply ``fn`` to every dict of a nested list/tuple of dicts (params' structure)."""
    if isinstance(tree, dict):
        return fn(tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_dicts(fn, t) for t in tree)
    raise TypeError(
        _checks.msg("revfunc.split_buffers", "params", "a dict or nested lists/tuples of dicts", _checks.describe(tree))
    )


def split_buffers(params: Any) -> Tuple[Any, Any]:
    """Split parameter dicts into floating tensors and everything else, as torch.func expects.

    ``pure``/``pure_blocks`` put a module's buffers next to its parameters (so a branch
    sees all its tensors), but ``torch.func.grad`` refuses integer tensors (e.g.
    BatchNorm's ``num_batches_tracked``). Differentiate the first part, pass the second
    along, and join them with :func:`merge_buffers` inside the loss.

    Args:
        params: a dict ``{name: tensor}`` or nested lists/tuples of such dicts (what
            ``pure_blocks`` returns).

    Returns:
        ``(floating, rest)``: two structures shaped like ``params``; ``floating`` holds
        the floating-point tensors, ``rest`` every other entry.

    Pure: yes (the tensors are not copied).

    Example:
        >>> import torch
        >>> _, p = pure(torch.nn.BatchNorm1d(2))
        >>> floating, rest = split_buffers(p)
        >>> sorted(floating), sorted(rest)
        (['bias', 'running_mean', 'running_var', 'weight'], ['num_batches_tracked'])
    """

    def floating(d):
        return {k: v for k, v in d.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}

    def rest(d):
        return {k: v for k, v in d.items() if not (isinstance(v, torch.Tensor) and v.is_floating_point())}

    return _map_dicts(floating, params), _map_dicts(rest, params)


def merge_buffers(params: Any, buffers: Any) -> Any:
    """Join what :func:`split_buffers` split: the same structure, each dict merged.

    Pure: yes.
    """
    if isinstance(params, dict):
        return {**params, **buffers}
    if isinstance(params, (list, tuple)) and isinstance(buffers, (list, tuple)) and len(params) == len(buffers):
        return type(params)(merge_buffers(p, b) for p, b in zip(params, buffers))
    raise TypeError(
        _checks.msg("revfunc.merge_buffers", "buffers", "the structure of params", _checks.describe(buffers))
    )
