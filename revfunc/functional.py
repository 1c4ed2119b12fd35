"""Turn ``nn.Module`` s into pure branch functions over parameter dicts.

A branch function is ``fn(params, x, **kwargs) -> Tensor``; ``params`` is a dict
``{name: tensor}`` (a pytree), so ``torch.func.grad`` differentiates it at argnums 0.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import nn

from revfunc import _checks
from revfunc._types import Block, BranchFn, Params

__all__ = ["pure", "pure_blocks", "PureModule"]

# Bumped whenever any module anywhere registers a submodule, parameter or buffer
# (assignment, weight_norm, parametrizations, register_*): containers that cache the
# structure of their modules compare it to rebuild when their tree may have changed.
_STRUCTURE_GENERATION = [0]


def _structure_changed(*_args: Any) -> None:
    _STRUCTURE_GENERATION[0] += 1  # returns None: the registration proceeds unchanged


for _register in (nn.modules.module.register_module_module_registration_hook,
                  nn.modules.module.register_module_parameter_registration_hook,
                  nn.modules.module.register_module_buffer_registration_hook):
    _register(_structure_changed)


def structure_generation() -> int:
    """A counter that changes whenever any module registers a submodule, parameter or buffer."""
    return _STRUCTURE_GENERATION[0]


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
        return tuple((name, tuple(sub._parameters), tuple(sub._buffers), tuple(sub._modules))
                     for name, sub in self.module.named_modules())

    def is_current(self) -> bool:
        """Whether the module tree still has the submodules, parameter and buffer names
        this view was built from (compared after any registration anywhere)."""
        return self._layout == self._current_layout() and all(
            a is b for a, b in zip(self.submodules, self.module.modules()))
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
        return torch.func.functional_call(self.module, params, args, kwargs)

    def __repr__(self) -> str:
        return f"PureModule({type(self.module).__name__})"


def module_params(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Live parameters and buffers of ``module`` as ``{name: tensor}`` (tied ones once)."""
    params = dict(module.named_parameters())
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


def pure_blocks(layers: Iterable[Any]) -> Tuple[List[Block], List[Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]]]:
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
            raise TypeError(_checks.msg("revfunc.pure_blocks", f"layers[{i}]",
                                        "a pair (f_module, g_module) of nn.Modules", _checks.describe(pair)))
        (f, fp), (g, gp) = pure(pair[0]), pure(pair[1])
        blocks.append((f, g))
        params.append((fp, gp))
    return blocks, params
