"""Input validation and error messages.

Every message has the form ``"<where>: <arg> expected <X>, got <Y>. <fix>"`` so the
given value is never dropped. Validators raise before any computation.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch


def msg(where: str, arg: str, expected: str, got: str, fix: str = "") -> str:
    text = f"{where}: {arg} expected {expected}, got {got}."
    return f"{text} {fix}" if fix else text


def describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    return f"{type(value).__name__} {value!r}"[:200]


def check_stream_pair(where: str, x1: Any, x2: Any, names=("x1", "x2")) -> None:
    """The two halves of the stream: floating tensors of one shape, dtype and device."""
    for name, x in zip(names, (x1, x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(msg(where, name, "a torch.Tensor", describe(x)))
        if not x.is_floating_point():
            raise TypeError(msg(where, name, "a floating-point tensor", f"dtype={x.dtype}",
                                "Cast it, e.g. x.float()."))
    a, b = names
    if x1.dtype != x2.dtype:
        raise TypeError(msg(where, b, f"the dtype of {a} ({x1.dtype})", f"{x2.dtype}"))
    if x1.device != x2.device:
        raise ValueError(msg(where, b, f"the device of {a} ({x1.device})", f"{x2.device}"))
    if x1.shape != x2.shape:
        raise ValueError(msg(where, b, f"the shape of {a} {tuple(x1.shape)}", f"{tuple(x2.shape)}",
                             "Additive coupling needs two halves of one shape."))


def check_blocks(where: str, blocks: Any, params: Any) -> None:
    """``blocks``: non-empty sequence of callable pairs; ``params``: same length, dict pairs."""
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(msg(where, "blocks", "a list of (f, g) pairs", describe(blocks)))
    if not isinstance(params, (list, tuple)):
        raise TypeError(msg(where, "params", "a list of (f_params, g_params) pairs", describe(params)))
    if len(blocks) == 0:
        raise ValueError(msg(where, "blocks", "at least one (f, g) pair", "an empty sequence"))
    if len(blocks) != len(params):
        raise ValueError(msg(where, "params", f"one (f_params, g_params) pair per block ({len(blocks)})",
                             f"{len(params)} pairs"))
    for i, (block, pair) in enumerate(zip(blocks, params)):
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(map(callable, block))):
            raise TypeError(msg(where, f"blocks[{i}]", "a pair (f, g) of callables", describe(block)))
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(p, Mapping) for p in pair)):
            raise TypeError(msg(where, f"params[{i}]", "a pair (f_params, g_params) of dicts",
                                describe(pair)))


def check_params_device(where: str, params: Any, device: torch.device) -> None:
    for i, pair in enumerate(params):
        for branch, p in zip("fg", pair):
            for name, t in p.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(msg(where, f"params[{i}] ({branch}) {name!r}", "a torch.Tensor",
                                        describe(t)))
                if t.device != device:
                    raise ValueError(msg(where, f"params[{i}] ({branch}) {name!r}",
                                         f"a tensor on the input's device ({device})", f"{t.device}",
                                         "Move the module or the input with .to()."))


def check_kwargs(where: str, kwargs: Any, depth: int) -> None:
    if kwargs is None:
        return
    if not isinstance(kwargs, (list, tuple)):
        raise TypeError(msg(where, "kwargs", "None or a list of (f_kwargs, g_kwargs) pairs",
                            describe(kwargs), "Build it with revfunc.route_args."))
    if len(kwargs) != depth:
        raise ValueError(msg(where, "kwargs", f"one (f_kwargs, g_kwargs) pair per block ({depth})",
                             f"{len(kwargs)} pairs", "Build it with revfunc.route_args."))
    for i, pair in enumerate(kwargs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(k, Mapping) for k in pair)):
            raise TypeError(msg(where, f"kwargs[{i}]", "a pair (f_kwargs, g_kwargs) of dicts", describe(pair)))


def check_generator(where: str, generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(msg(where, "generator", "None or a torch.Generator", describe(generator)))
    if generator.device.type != device.type:
        raise ValueError(msg(where, "generator", f"a torch.Generator on the input's device ({device})",
                             f"a generator on {generator.device}",
                             f"Create it with torch.Generator(device={str(device)!r})."))


def check_output_shape(where: str, out: Any, x: torch.Tensor, index: int, branch: str) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else describe(out)
        raise ValueError(msg(where, f"block {index} branch {branch}", f"an output shaped like its input "
                             f"{tuple(x.shape)}", got, "A reversible branch must preserve the shape."))


def check_positive_int(where: str, arg: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(msg(where, arg, "None or a positive int" if allow_none else "a positive int",
                             describe(value)))
