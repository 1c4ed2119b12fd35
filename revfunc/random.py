"""Explicit, replayable randomness for reversible stacks.

revfunc never captures or reseeds global RNG state behind the caller's back. One call of
:func:`revfunc.reversible_sequence` draws one *base seed* (from the ``generator`` it is
given, or once from the global RNG when it is given none) and derives a *child seed*
for every ``(block, branch)`` pair with :func:`derive_seed`. Each branch call then runs
either

- with its own fresh ``torch.Generator`` seeded with the child seed, when the branch
  function declares an explicit ``generator`` keyword parameter (pure code, e.g. using
  :func:`dropout`), or
- under :func:`fork_and_seed`: the global RNG of the CPU and of the input's accelerator
  is saved, seeded with the child seed, and restored afterwards (so stock ``nn.Dropout``
  and ``F.dropout`` work unchanged).

The recomputation in backward derives the same child seeds, so it sees exactly the same
random numbers as the forward, in train and in eval mode.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from typing import Callable, Iterator, Optional

import torch

from revfunc import _checks

__all__ = ["derive_seed", "draw_base_seed", "fork_and_seed", "dropout", "accepts_generator"]

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(z: int) -> int:
    """One splitmix64 output for state ``z`` (Steele, Lea and Flood, 2014)."""
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(base: int, index: int, branch: int) -> int:
    """Child seed of ``(block index, branch)`` for a call with base seed ``base``.

    ``seed = splitmix64(splitmix64(splitmix64(base) ^ index) ^ branch) & (2**63 - 1)``,
    with ``branch`` 0 for ``f`` and 1 for ``g``. Deterministic, pure Python integers, so
    it never touches any RNG and costs the same in forward and in the recomputation.

    Pure: yes.

    Example:
        >>> derive_seed(1234, 0, 0) == derive_seed(1234, 0, 0)
        True
        >>> derive_seed(1234, 0, 0) != derive_seed(1234, 0, 1)
        True
    """
    for name, value in (("base", base), ("index", index), ("branch", branch)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(_checks.msg("revfunc.random.derive_seed", name, "an int", _checks.describe(value)))
    z = _splitmix64(base & _MASK64)
    z = _splitmix64(z ^ (index & _MASK64))
    z = _splitmix64(z ^ (branch & _MASK64))
    return z & _MASK63


def draw_base_seed(generator: Optional[torch.Generator] = None) -> int:
    """Draw one base seed: one ``randint`` from ``generator`` (the global CPU RNG if None).

    The draw bypasses torch.func transforms, so it also works inside ``vmap`` (where
    random ops otherwise follow the ``randomness`` mode): it advances the generator by
    exactly one draw and returns a Python ``int`` in ``[0, 2**63 - 1)``.

    Pure: no; advances ``generator`` (or the global CPU RNG) by one draw.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            _checks.msg(
                "revfunc.random.draw_base_seed", "generator", "None or a torch.Generator", _checks.describe(generator)
            )
        )
    device = generator.device if generator is not None else torch.device("cpu")
    with torch._C._DisableFuncTorch():
        seed = torch.randint(0, _MASK63, (), generator=generator, device=device)
        return int(seed.item())


def device_module(device: torch.device):
    """``torch.cuda`` (etc.) for an accelerator device with RNG state functions, else ``None``."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type, None)
    if module is None or not hasattr(module, "get_rng_state"):
        return None
    return module


@contextlib.contextmanager
def fork_and_seed(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Run a block with the global RNG seeded with ``seed``, and restore it afterwards.

    Saves the CPU RNG state and, for an accelerator ``device``, that device's RNG state;
    seeds both with ``seed``; restores both on exit (also on error). Other devices'
    states are not touched.

    Pure: restores every RNG state it changes.

    Example:
        >>> state = torch.get_rng_state()
        >>> with fork_and_seed(7):
        ...     a = torch.rand(2)
        >>> with fork_and_seed(7):
        ...     b = torch.rand(2)
        >>> bool(torch.equal(a, b)) and bool(torch.equal(state, torch.get_rng_state()))
        True
    """
    where = "revfunc.random.fork_and_seed"
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(_checks.msg(where, "seed", "an int in [0, 2**64)", _checks.describe(seed)))
    if not 0 <= seed < 2**64:
        raise ValueError(
            _checks.msg(
                where, "seed", "an int in [0, 2**64)", repr(seed), "Use revfunc.random.derive_seed to make seeds."
            )
        )
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            _checks.msg(
                where, "device", "a torch.device or device string such as 'cpu' or 'cuda:0'", _checks.describe(device)
            )
        ) from error
    module = device_module(device)
    if device.type != "cpu" and (module is None or not module.is_available()):
        raise ValueError(
            _checks.msg(
                where,
                "device",
                "a device this torch build can use",
                f"{device} (torch.{device.type} is not available here)",
            )
        )
    with _forked(seed, device):
        yield


@contextlib.contextmanager
def _forked(seed: int, device: torch.device) -> Iterator[None]:
    """:func:`fork_and_seed` without argument checks, for revfunc's own calls (a seed from
    :func:`derive_seed` and a tensor's device are valid by construction): per branch call."""
    module = device_module(device)
    cpu_state = torch.get_rng_state()
    accel_state = None
    if module is not None:
        index = device.index if device.index is not None else module.current_device()
        accel_state = module.get_rng_state(index)
    try:
        torch.default_generator.manual_seed(seed)
        if module is not None:
            module.default_generators[index].manual_seed(seed)
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if module is not None:
            module.set_rng_state(accel_state, index)


# Weak keys: a branch function (and whatever its closure captures) is never kept alive
# by this cache.
_DECLARES_GENERATOR: "weakref.WeakKeyDictionary[Callable, bool]" = weakref.WeakKeyDictionary()


def _declares_generator(fn: Callable) -> bool:
    try:
        parameter = inspect.signature(fn).parameters.get("generator")
    except (TypeError, ValueError):
        return False
    return parameter is not None and parameter.kind in (
        inspect.Parameter.KEYWORD_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    )


def accepts_generator(fn: Callable) -> bool:
    """Whether ``fn`` declares an explicit ``generator`` keyword parameter.

    ``**kwargs`` does not count: stock modules must never be handed an unexpected
    ``generator=``. Functions made by :func:`revfunc.pure` answer for their module's
    ``forward`` (their ``accepts_generator`` attribute, which Dynamo reads as a constant).

    Pure: yes (cached per function, weakly: the cache keeps nothing alive).
    """
    declared = getattr(fn, "accepts_generator", None)
    if isinstance(declared, bool):
        return declared
    try:
        return _DECLARES_GENERATOR[fn]
    except KeyError:
        answer = _DECLARES_GENERATOR[fn] = _declares_generator(fn)
        return answer
    except TypeError:  # not weak-referenceable (e.g. a builtin): no cache
        return _declares_generator(fn)


def call_branch(fn, params, x, kwargs, seed: Optional[int], args: tuple = ()):
    """Call ``fn(params, x, *args, **kwargs)`` with the randomness of child seed ``seed``
    (``args``: an invertible layer's second half).

    ``seed=None`` calls it as is (no randomness handling: deterministic blocks under
    ``torch.compile``). Otherwise see the module docstring.
    """
    if seed is None:
        return fn(params, x, *args, **kwargs)
    if accepts_generator(fn):
        generator = torch.Generator(device=x.device)
        generator.manual_seed(seed)
        return fn(params, x, *args, generator=generator, **kwargs)
    with _forked(seed, x.device):
        return fn(params, x, *args, **kwargs)


def dropout(
    x: torch.Tensor,
    p: float,
    generator: Optional[torch.Generator],
    training: bool = True,
) -> torch.Tensor:
    """Inverted dropout drawing its mask from an explicit ``generator``.

    Zeroes each element with probability ``p`` and scales the rest by ``1 / (1 - p)``;
    the identity when ``training`` is False or ``p == 0``. The mask is drawn with
    ``torch.rand(x.shape, generator=generator)``, so the same generator state gives the
    same mask. Under ``vmap`` the mask is drawn per example shape (see the README for
    the randomness modes).

    Shapes: (*) -> (*).
    Pure: reads ``generator``'s state and advances it; mutates nothing else.
    Differentiable in: x.

    Raises:
        ValueError: if ``p`` is not in ``[0, 1)``. TypeError: ``x``, ``p`` or
            ``generator`` of the wrong type.
    """
    where = "revfunc.random.dropout"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(_checks.msg(where, "x", "a floating-point torch.Tensor", _checks.describe(x)))
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(_checks.msg(where, "p", "a float probability in [0, 1)", _checks.describe(p)))
    if not 0.0 <= p < 1.0:
        raise ValueError(_checks.msg(where, "p", "a probability in [0, 1)", repr(p)))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(_checks.msg(where, "generator", "None or a torch.Generator", _checks.describe(generator)))
    if not training or p == 0.0:
        return x
    keep = 1.0 - p
    mask = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) < keep
    return x * mask / keep
