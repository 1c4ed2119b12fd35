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


def describe(value: Any, depth: int = 0) -> str:
    """What ``value`` is, for a message: shapes, dtypes and types, never tensor values
    (also inside tuples, lists and dicts, which are described element by element)."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(shape={tuple(value.shape)}, dtype={value.dtype}, device={value.device})"
    if isinstance(value, (tuple, list, dict)):
        items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
        if depth >= 2:
            return f"{type(value).__name__} of {len(items)} items"
        parts = [
            describe(v, depth + 1) if isinstance(value, (tuple, list)) else f"{k!r}: {describe(v, depth + 1)}"
            for k, v in items[:4]
        ]
        more = f", ... ({len(items)} items)" if len(items) > 4 else ""
        return f"{type(value).__name__}({', '.join(parts)}{more})"[:300]
    return f"{type(value).__name__} {value!r}"[:200]


def plain_alternative(where: str) -> str:
    """The plain-autograd twin of the path named ``where``, for a message's fix."""
    return "revfunc.nn.SequentialSequence" if where.startswith("revfunc.nn") else "revfunc.sequential_sequence"


def check_stream_pair(where: str, x1: Any, x2: Any, names=("x1", "x2")) -> None:
    """The two halves of the stream: floating tensors of one shape, dtype and device."""
    for name, x in zip(names, (x1, x2)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(msg(where, name, "a torch.Tensor", describe(x)))
        if not x.is_floating_point():
            raise TypeError(msg(where, name, "a floating-point tensor", f"dtype={x.dtype}", "Cast it, e.g. x.float()."))
    a, b = names
    if x1.dtype != x2.dtype:
        raise TypeError(msg(where, b, f"the dtype of {a} ({x1.dtype})", f"{x2.dtype}"))
    if x1.device != x2.device:
        raise ValueError(msg(where, b, f"the device of {a} ({x1.device})", f"{x2.device}"))
    if x1.shape != x2.shape:
        raise ValueError(
            msg(
                where,
                b,
                f"the shape of {a} {tuple(x1.shape)}",
                f"{tuple(x2.shape)}",
                "Additive coupling needs two halves of one shape.",
            )
        )


def check_blocks(where: str, blocks: Any, params: Any) -> None:
    """``blocks``: non-empty sequence of callable pairs; ``params``: same length, dict pairs."""
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(msg(where, "blocks", "a list of (f, g) pairs", describe(blocks)))
    if not isinstance(params, (list, tuple)):
        raise TypeError(msg(where, "params", "a list of (f_params, g_params) pairs", describe(params)))
    if len(blocks) == 0:
        raise ValueError(msg(where, "blocks", "at least one (f, g) pair", "an empty sequence"))
    if len(blocks) != len(params):
        raise ValueError(
            msg(where, "params", f"one (f_params, g_params) pair per block ({len(blocks)})", f"{len(params)} pairs")
        )
    from revfunc.invertible import Invertible

    for i, (block, pair) in enumerate(zip(blocks, params)):
        if isinstance(block, Invertible):
            if not isinstance(pair, Mapping):
                raise TypeError(
                    msg(
                        where,
                        f"params[{i}]",
                        f"a dict, the parameters of block {i}'s invertible layer {block!r} ({{}} for none)",
                        describe(pair),
                    )
                )
            continue
        if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(map(callable, block))):
            raise TypeError(
                msg(where, f"blocks[{i}]", "a pair (f, g) of callables or a revfunc.Invertible layer", describe(block))
            )
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, Mapping) for p in pair)):
            raise TypeError(msg(where, f"params[{i}]", "a pair (f_params, g_params) of dicts", describe(pair)))


def check_params_device(where: str, params: Any, device: torch.device, layers=()) -> None:
    """Every parameter a tensor on ``device`` (``params`` as pairs; ``layers``: the indices
    of invertible layers, whose dict is the first of its pair)."""
    from torch.nn.parameter import UninitializedTensorMixin  # type: ignore[attr-defined]  # not in __all__

    for i, pair in enumerate(params):
        for branch, p in zip(("layer", "") if i in layers else "fg", pair):
            for name, t in p.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(msg(where, f"params[{i}] ({branch}) {name!r}", "a torch.Tensor", describe(t)))
                if isinstance(t, UninitializedTensorMixin):
                    raise TypeError(
                        msg(
                            where,
                            f"block {i} branch {branch} parameter {name!r}",
                            "an initialized tensor",
                            "an uninitialized parameter of a lazy module (nn.LazyLinear, nn.LazyConv2d, ...)",
                            "Lazy modules infer their shapes on their first call: call each branch "
                            "module once on an example input (module(x)) before revfunc.pure / "
                            "pure_blocks, or use revfunc.nn.ReversibleSequence, which does that "
                            "itself.",
                        )
                    )
                if t.device != device:
                    raise ValueError(
                        msg(
                            where,
                            f"params[{i}] ({branch}) {name!r}",
                            f"a tensor on the input's device ({device})",
                            f"{t.device}",
                            "Move the module or the input with .to().",
                        )
                    )


def check_kwargs(where: str, kwargs: Any, depth: int, layers=()) -> None:
    """``kwargs``: ``None`` or one ``(f_kwargs, g_kwargs)`` pair per block; an invertible
    layer's (indices ``layers``) is ``(layer_kwargs, {})``."""
    if kwargs is None:
        return
    if not isinstance(kwargs, (list, tuple)):
        raise TypeError(
            msg(
                where,
                "kwargs",
                "None or a list of (f_kwargs, g_kwargs) pairs",
                describe(kwargs),
                "Build it with revfunc.route_args.",
            )
        )
    if len(kwargs) != depth:
        raise ValueError(
            msg(
                where,
                "kwargs",
                f"one (f_kwargs, g_kwargs) pair per block ({depth})",
                f"{len(kwargs)} pairs",
                "Build it with revfunc.route_args.",
            )
        )
    for i, pair in enumerate(kwargs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(k, Mapping) for k in pair)):
            raise TypeError(msg(where, f"kwargs[{i}]", "a pair (f_kwargs, g_kwargs) of dicts", describe(pair)))
        if i in layers and pair[1]:
            raise ValueError(
                msg(
                    where,
                    f"kwargs[{i}]",
                    f"(layer_kwargs, {{}}) for block {i}, an invertible layer (it has no branch g)",
                    f"g keywords {sorted(pair[1])}",
                )
            )


def check_generator(where: str, generator: Optional[torch.Generator], device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(msg(where, "generator", "None or a torch.Generator", describe(generator)))
    if generator.device.type != device.type:
        raise ValueError(
            msg(
                where,
                "generator",
                f"a torch.Generator on the input's device ({device})",
                f"a generator on {generator.device}",
                f"Create it with torch.Generator(device={str(device)!r}).",
            )
        )


def check_positive_int(where: str, arg: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(msg(where, arg, "None or a positive int" if allow_none else "a positive int", describe(value)))


# Messages of the engine's per-branch checks (raised by revfunc._branch and revfunc._walk).


def check_logdet_args(where: str, return_logdet: Any, event_dim: Any, x: torch.Tensor) -> None:
    """``return_logdet``: a bool; ``event_dim``: an int from 0 to ``x.dim()``."""
    check_bool(where, "return_logdet", return_logdet)
    if isinstance(event_dim, bool) or not isinstance(event_dim, int) or not 0 <= event_dim <= x.dim():
        raise ValueError(
            msg(
                where,
                "event_dim",
                f"an int from 0 to the stream's {x.dim()} dims",
                describe(event_dim),
                "It counts the trailing dims the log-det sums over, as in torch.distributions.",
            )
        )


def check_bool(where: str, arg: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(msg(where, arg, "a bool", describe(value)))


def check_context_fn_type(where: str, context_fn: Any) -> None:
    """``context_fn``: ``None`` or a callable (as in ``torch.utils.checkpoint``)."""
    if context_fn is not None and not callable(context_fn):
        raise TypeError(
            msg(
                where,
                "context_fn",
                "None or a callable returning two context managers (e.g. revfunc.selective.save_attention)",
                describe(context_fn),
            )
        )


def branch_name(index: int, branch: str) -> str:
    """``"block 3 branch f"``; ``"block 3 invertible layer"`` for a layer."""
    return f"block {index} {branch}" if branch.startswith("invertible") else f"block {index} branch {branch}"


def check_branch_output(where: str, out: Any, x: torch.Tensor, index: int, branch: str, coupling: Any = None) -> None:
    """A branch output: a floating tensor shaped like its input, whose dtype does not widen
    the stream (``x + out`` keeps ``x.dtype``; a lower-precision output under autocast is fine).

    ``coupling``: the update's :class:`revfunc.couplings.Coupling` (``None``: additive).
    One whose output is ``"pair"`` (``affine``) takes a pair of such tensors or one tensor
    of twice the size along its ``dim``; ``"any"`` (a user's coupling) is not checked here.
    """
    if coupling is not None and coupling.output != "tensor":
        if coupling.output == "pair":
            _check_pair_output(where, out, x, index, branch, coupling)
        return
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else describe(out)
        fix = "A reversible branch must preserve the shape."
        if isinstance(out, (tuple, list)):
            fix = (
                "A branch returns one tensor: wrap a module that returns several (nn.MultiheadAttention "
                "returns (output, weights)) and return the one shaped like its input."
            )
        raise ValueError(
            msg(where, branch_name(index, branch), f"an output shaped like its input {tuple(x.shape)}", got, fix)
        )
    _check_output_dtype(where, out, x, index, branch)


def check_vjp_result(where: str, what: str, result: Any, kinds: tuple, expected: str) -> tuple:
    """A closed-form vjp's ``result`` (a coupling's ``(dx, dp)``, a layer's ``(dx1, dx2,
    dparams)``) as a tuple, refused naming ``what`` unless it is a tuple or list of one
    item per type of ``kinds``, each an instance of its type."""
    if not (
        isinstance(result, (tuple, list))
        and len(result) == len(kinds)
        and all(isinstance(r, k) for r, k in zip(result, kinds))
    ):
        raise TypeError(msg(where, what, expected, describe(result)))
    return tuple(result)


def check_layer_output(
    where: str, out: Any, a: torch.Tensor, b: torch.Tensor, index: int, layer: Any, which: str, event_dim: int
) -> tuple:
    """An invertible layer's result: ``forward`` gives ``(y1, y2, logdet)``, ``inverse``
    ``(x1, x2)``; the halves shaped like its input halves ``a``, ``b``, no wider in dtype;
    the log-det a number or a tensor broadcastable to ``a.shape[:-event_dim]``."""
    label = f"block {index} invertible layer {layer!r}"
    n = 3 if which == "forward" else 2
    expected = "(y1, y2, logdet)" if n == 3 else "(x1, x2)"
    if not (isinstance(out, (tuple, list)) and len(out) == n):
        raise ValueError(msg(where, f"{label} {which}", f"a tuple {expected}", describe(out)))
    for name, t, x in zip(("first half", "second half"), out[:2], (a, b)):
        if not isinstance(t, torch.Tensor) or t.shape != x.shape:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else describe(t)
            raise ValueError(
                msg(
                    where,
                    f"{label} {which}",
                    f"a {name} shaped like its input's {tuple(x.shape)}",
                    got,
                    "An invertible layer keeps the shapes of both halves.",
                )
            )
        if t.dtype != x.dtype and (not t.is_floating_point() or torch.promote_types(t.dtype, x.dtype) != x.dtype):
            raise TypeError(
                msg(where, f"{label} {which}", f"a {name} no wider than its input's dtype {x.dtype}", f"{t.dtype}")
            )
    if n == 3:
        logdet = out[2]
        batch = tuple(a.shape[: a.dim() - event_dim])
        shape = tuple(logdet.shape) if isinstance(logdet, torch.Tensor) else ()
        ok = isinstance(logdet, (int, float, torch.Tensor)) and not isinstance(logdet, bool)
        if ok:
            try:
                ok = torch.broadcast_shapes(shape, batch) == batch
            except RuntimeError:
                ok = False
        if not ok:
            raise ValueError(
                msg(
                    where,
                    f"{label} forward",
                    f"a log-det broadcastable to x1.shape[:-event_dim] = {batch} (event_dim={event_dim})",
                    f"shape {shape}" if isinstance(logdet, torch.Tensor) else describe(logdet),
                    "Sum the per-element log-det over the event dimensions, or return a scalar for a map that is "
                    "the same for every sample.",
                )
            )
    return tuple(out)


def _check_pair_output(where: str, out: Any, x: torch.Tensor, index: int, branch: str, coupling: Any) -> None:
    """``affine``'s branch output: ``(s_raw, t)`` shaped like ``x``, or one tensor with twice
    ``x``'s size along ``coupling.dim``."""
    shape = tuple(x.shape)
    dim = coupling.dim % max(x.dim(), 1) if x.dim() else 0
    double = shape[:dim] + (2 * shape[dim],) + shape[dim + 1 :] if x.dim() else None
    if isinstance(out, (tuple, list)):
        ok = len(out) == 2 and all(isinstance(t, torch.Tensor) and tuple(t.shape) == shape for t in out)
        parts = tuple(out)
    else:
        ok = isinstance(out, torch.Tensor) and tuple(out.shape) == double
        parts = (out,)
    if not ok:
        raise ValueError(
            msg(
                where,
                branch_name(index, branch),
                f"for {coupling!r} an output (s, t) of two tensors shaped like its input {shape}, or one tensor of "
                f"shape {double} (twice the size along dim {coupling.dim})",
                f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else describe(out),
                "Make the branch's last layer output twice the width (FrEIA's subnet convention) or return (s, t).",
            )
        )
    for part in parts:
        _check_output_dtype(where, part, x, index, branch)


def _check_output_dtype(where: str, out: torch.Tensor, x: torch.Tensor, index: int, branch: str) -> None:
    if out.dtype != x.dtype and (not out.is_floating_point() or torch.promote_types(out.dtype, x.dtype) != x.dtype):
        raise TypeError(
            msg(
                where,
                branch_name(index, branch),
                f"a floating output no wider than its input's dtype {x.dtype}",
                f"dtype {out.dtype}",
                "The stream x + f(x) would change dtype: cast the branch output (out.to(x.dtype)).",
            )
        )


def branch_type_error(where: str, index: int, branch: str, fn: Any, error: TypeError) -> TypeError:
    """A ``TypeError`` raised by a branch call (typically a routed keyword it does not
    accept), re-raised naming the block and the branch."""
    return TypeError(f"{where}: {branch_name(index, branch)} ({fn!r}) raised: {error}")


def coupling_error(where: str, index: int, branch: str, coupling: Any, error: Exception) -> Exception:
    """An error raised by one of a coupling's functions (``prepare``, ``forward``,
    ``inverse``, ``logdet``, ``vjp``), re-raised as its kind (``TypeError``, ``ValueError``
    or ``RuntimeError``) naming the block, the branch and the coupling."""
    kind = next(k for k in (TypeError, ValueError, RuntimeError) if isinstance(error, k))
    return kind(f"{where}: {branch_name(index, branch)}'s coupling {coupling!r} raised: {error}")


def branch_runtime_error(where: str, index: int, branch: str, fn: Any, x: torch.Tensor, error: Exception):
    """A ``RuntimeError`` raised inside a branch's forward, re-raised naming the call, the
    block, the branch and the input's shape (a branch built for another width, say)."""
    return RuntimeError(
        f"{where}: {branch_name(index, branch)} ({fn!r}) raised on its input of shape {tuple(x.shape)}: {error}"
    )


def module_of(fn: Any, label: str) -> str:
    """`` (module 'net.1', BatchNorm1d)`` for a parameter/buffer label of a module branch."""
    module = getattr(fn, "module", None)
    if module is None or "'" not in label:
        return ""
    path = label.split("'")[1].rpartition(".")[0]
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return ""
    return f" (module {path or '<root>'!r}, {type(sub).__name__})"


def mutation_error(where: str, index: int, branch: str, fn: Any, label: str) -> ValueError:
    return ValueError(
        f"{where}: {branch_name(index, branch)} modified {label}{module_of(fn, label)} in place during "
        "forward. A reversible stack re-runs every branch in backward, so in-place updates would be applied "
        "twice (BatchNorm running statistics, spectral_norm's power iteration) or would corrupt the stream "
        "and the caller's tensors (nn.ReLU(inplace=True), x.mul_()). Use out-of-place ops and stateless "
        "modules (LayerNorm/GroupNorm, track_running_stats=False), call .eval() for modules that only update "
        f"in training, or use {plain_alternative(where)}."
    )


def rng_error(where: str, index: Optional[int], branch: Optional[str]) -> RuntimeError:
    who = "a branch" if index is None or branch is None else branch_name(index, branch)
    return RuntimeError(
        f"{where}: {who} drew random numbers from the global RNG, but the call was "
        "declared deterministic (deterministic=True, or revfunc.nn.ReversibleSequence, which found no active "
        "dropout-like submodule: eval mode, or none with p > 0), so the backward could not replay them. Pass "
        "generator=torch.Generator() (to forward, or to reversible_sequence), or deterministic=False."
    )


def recomputation_error(where: str, index: int, branch: str, error: Exception, selective: bool = False) -> RuntimeError:
    hint = (
        " (With context_fn, the recomputation must run the same ops as the forward did: a branch whose op "
        "sequence depends on state that changed between forward and backward cannot use selective saving.)"
        if selective
        else ""
    )
    return RuntimeError(f"{where}: {branch_name(index, branch)} failed in the backward recomputation: {error}{hint}")


def captured_tensor_error(where: str, index: int, branch: str, fn: Any, tensor: torch.Tensor) -> RuntimeError:
    return RuntimeError(
        f"{where}: {branch_name(index, branch)} ({fn!r}) uses a tensor that requires grad but was not passed "
        f"to it (shape {tuple(tensor.shape)}, dtype {tensor.dtype}): a closure-captured nn.Parameter, or a "
        "module held in a plain Python list instead of an nn.ModuleList. The memory-saving backward returns "
        "gradients only for the tensors passed in params and kwargs, so this one would silently get none. "
        "Register it (nn.ModuleList, nn.Parameter attribute, register_parameter) or pass it in params or as a "
        f"routed keyword, or use {plain_alternative(where)}. (Under torch.func transforms closed-over tensors "
        "are constants by design.)"
    )


def kept_tensor_warning(where: str, index: int, branch: str, fn: Any) -> str:
    return (
        f"{where}: {branch_name(index, branch)} ({fn!r}) kept a tensor computed from its input beyond its forward "
        "call (an auxiliary loss or activations stored on a module, a forward hook's capture). A reversible stack "
        "does not keep the stream between blocks, so that tensor's graph ends at this block's input: a loss built "
        "on it gets this branch's parameter gradients but none for earlier blocks or the input, and it holds this "
        f"branch's activations until it is dropped. Return what a loss needs instead, or use "
        f"{plain_alternative(where)}. (Warned once per branch.)"
    )


def hooks_warning(where: str, index: int, branch: str, name: str, module: Any) -> str:
    return (
        f"{where}: {branch_name(index, branch)} has forward hooks on submodule {name!r} "
        f"({type(module).__name__}). The backward recomputes the branch, so they fire twice per training step "
        "(in forward and in the recomputation), and the graph of a tensor they (or the forward) capture, such as an "
        "auxiliary loss stored on the module, ends at the block's input: a loss built on it gets no gradient for "
        "earlier blocks. Use "
        "revfunc.sequential_sequence / revfunc.nn.SequentialSequence for such modules. (Warned once per module.)"
    )


def compiled_transform_warning(where: str) -> str:
    return (
        f"{where}: traced by torch.compile inside a torch.func gradient transform. Dynamo inlines the "
        "memory-saving Function's forward and drops its backward there (PyTorch issue #193279), so this "
        "compiled step stores every block's activations (O(depth) memory), like plain autograd. Compile a step "
        "written with revfunc.reversible_vjp instead: it keeps activation memory constant in depth."
    )


def sharded_blocks_error(higher_order: bool) -> RuntimeError:
    inside = "with higher_order=True" if higher_order else "under a torch.func transform or inside torch.compile"
    return RuntimeError(
        f"revfunc.nn.ReversibleSequence: blocks sharded with FSDP2 (fully_shard on each block) cannot run {inside}: "
        "each block must run inside its own module call, where FSDP2 gathers and releases its parameters, and "
        "these paths run the whole stack in one autograd Function. Use loss.backward() or torch.autograd.grad, "
        "or shard the root only (fully_shard(model)); see docs/distributed.md."
    )
