"""The one ``torch.autograd.Function`` behind :func:`revfunc.reversible_sequence`.

This is the only module that touches ``ctx``. ``forward`` runs the whole stack without
storing activations; ``setup_context`` saves the final ``(y1, y2)``, the exact
boundary states kept by ``checkpoint_every`` and the caller's tensors (parameters,
keyword tensors) with ``ctx.save_for_backward``; ``backward`` walks the blocks in
reverse, rebuilding each block's input from its output and back-propagating through a
recomputation of ``f`` and ``g`` (``torch.autograd.grad`` in plain eager mode,
``torch.func.vjp`` otherwise). Under a ``torch.func`` grad transform the walk runs one
functorch level down, so nothing is recorded at the transform's level (O(1) memory in
depth; ``revfunc._levels``). Parameter gradients are *returned*, never written to ``.grad``.
Forward branch calls go through :func:`checked_call`, which refuses in-place updates
that a recomputation would repeat.

All per-call state (the blocks, where each flat tensor goes, the child seeds, the
autocast state) lives in a :class:`Plan` passed as the first argument and kept on
``ctx``, so two forwards followed by two backwards each get their own gradients.

``torch.compile(fullgraph=True)`` on torch 2.13 needs a fixed number of positional
arguments in ``forward``: :func:`function_for` makes (and caches) one Function class per
tensor count for compiled code; eager calls use the variadic
:class:`ReversibleSequenceFunction` (binding arguments to a fixed-arity signature costs
time per tensor on every call).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.autograd.graph import _engine_run_backward  # private, but stable from 2.11 to 2.13 (tested)

from revfunc import _checks
from revfunc._levels import SAME_LEVEL, current_grad_interpreter, guarded, records_below
from revfunc.random import call_branch, device_module

# (param_slots, differentiable_kwarg_slots, other_kwarg_slots, static_kwargs) for one branch.
Bind = Tuple[Tuple[Tuple[str, int], ...], Tuple[Tuple[str, int], ...], Tuple[Tuple[str, int], ...], Dict[str, Any]]


class Plan:
    """Everything non-tensor about one call of a reversible stack (immutable after build).

    Attributes:
        where: the public function name, for messages.
        blocks: the ``(f, g)`` pairs.
        binds: per block, per branch, where its params / kwargs come from in the flat
            tensor list, plus its non-tensor kwargs.
        seeds: per block ``(f_seed, g_seed)`` child seeds, or ``None`` (run as is).
        exact: sorted state indices ``j`` (input of block ``j``) kept exactly.
        autocast: ``(device_type, dtype, enabled)`` at forward, replayed in backward.
        higher_order: record the backward's recomputation at every ``torch.func`` level
            (see :func:`revfunc.reversible_sequence`).
        modes: per block, per branch, ``(modules, training flags)`` of a module-backed
            branch at forward (``None`` otherwise), replayed in backward.
        rng_check: the call was declared deterministic: raise if a branch touches the
            global RNG in forward.
    """

    __slots__ = ("where", "blocks", "binds", "seeds", "exact", "autocast", "higher_order", "modes", "rng_check")

    def __init__(self, where, blocks, binds, seeds, exact, autocast, higher_order=False, modes=None,
                 rng_check=False):
        self.where = where
        self.higher_order = higher_order
        self.modes = modes
        self.rng_check = rng_check
        self.blocks = blocks
        self.binds = binds
        self.seeds = seeds
        self.exact = exact
        self.autocast = autocast

    def seed(self, index: int, branch: int) -> Optional[int]:
        return None if self.seeds is None else self.seeds[index][branch]

    def mode(self, index: int, branch: int):
        return None if self.modes is None else self.modes[index][branch]


_BRANCH = ("f", "g")


def _watch(params, x, kwargs):
    """``(kind, name, tensor)`` whose in-place modification by a branch is an error."""
    watched = [("input", "x", x)]
    watched += [("param", name, t) for name, t in params.items() if isinstance(t, torch.Tensor)]
    watched += [("keyword", name, v) for name, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return watched


def _label(kind: str, name: str) -> str:
    return {"input": "its input x", "param": f"parameter/buffer {name!r}", "keyword": f"keyword {name!r}"}[kind]


def _module_of(fn, label: str) -> str:
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


def _rng_states(device: torch.device):
    """The global RNG states a branch on ``device`` can draw from: CPU, and the accelerator's."""
    states = [torch.get_rng_state()]
    module = device_module(device)
    if module is not None:
        states.append(module.get_rng_state(device.index if device.index is not None else module.current_device()))
    return states


def checked_call(where: str, index: int, branch: str, fn, params, x, kwargs, seed, rng_check: bool = False):
    """:func:`call_branch` for a reversible path, refusing what recomputation cannot replay.

    Raises ``ValueError`` naming the block, the branch and the tensor when the call
    modified its input or a parameter, buffer or keyword tensor in place (the stream
    and the caller's tensors would change; a buffer such as BatchNorm's running
    statistics would be updated again by the backward's recomputation), and
    ``RuntimeError`` when ``rng_check`` is set and the call used the global RNG. A
    ``TypeError`` raised by the call is re-raised naming the block. Checks use tensor
    version counters: under ``vmap`` and ``torch.compile`` they are skipped.
    """
    if torch.compiler.is_compiling():
        return call_branch(fn, params, x, kwargs, seed)
    watched = _watch(params, x, kwargs)
    before = [t._version for _, _, t in watched]
    rng_before = _rng_states(x.device) if rng_check else None
    out = _call_naming_block(where, index, branch, fn, params, x, kwargs, seed)
    for (kind, name, t), version in zip(watched, before):
        if t._version != version:
            raise _mutation_error(where, index, branch, fn, _label(kind, name))
    if rng_check and not _same_states(rng_before, _rng_states(x.device)):
        raise _rng_error(where, index, branch)
    return out


def _call_naming_block(where: str, index: int, branch: str, fn, params, x, kwargs, seed):
    """:func:`call_branch`, re-raising a ``TypeError`` (a routed keyword the branch rejects)
    with the block and branch named."""
    try:
        return call_branch(fn, params, x, kwargs, seed)
    except TypeError as error:
        raise TypeError(f"{where}: block {index} branch {branch} ({fn!r}) raised: {error}") from error


def _same_states(a, b) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


def _mutation_error(where: str, index: int, branch: str, fn, label: str) -> ValueError:
    return ValueError(
        f"{where}: block {index} branch {branch} modified {label}{_module_of(fn, label)} in place during "
        "forward. A reversible stack re-runs every branch in backward, so in-place updates would be applied "
        "twice (BatchNorm running statistics, spectral_norm's power iteration) or would corrupt the stream "
        "and the caller's tensors (nn.ReLU(inplace=True), x.mul_()). Use out-of-place ops and stateless "
        "modules (LayerNorm/GroupNorm, track_running_stats=False), call .eval() for modules that only update "
        "in training, or use revfunc.sequential_sequence.")


def _rng_error(where: str, index: Optional[int], branch: Optional[str]) -> RuntimeError:
    who = "a branch" if index is None else f"block {index} branch {branch}"
    return RuntimeError(
        f"{where}: {who} drew random numbers from the global RNG, but the call was "
        "declared deterministic (deterministic=True, or revfunc.nn.ReversibleSequence, which found no active "
        "dropout-like submodule: eval mode, or none with p > 0), so the backward could not replay them. Pass "
        "generator=torch.Generator() (to forward, or to reversible_sequence), or deterministic=False.")


def _first_user(plan: Plan, slot: int):
    """``(block, branch, fn, label)`` of the first branch call bound to flat ``slot``."""
    for i, pair in enumerate(plan.binds):
        for branch, (param_slots, diff_slots, other_slots, _) in enumerate(pair):
            for kind, slots in (("param", param_slots), ("keyword", diff_slots + other_slots)):
                for name, j in slots:
                    if j == slot:
                        return i, _BRANCH[branch], plan.blocks[i][branch], _label(kind, name)
    raise AssertionError(slot)


def bind(b: Bind, tensors: Sequence[torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """The ``(params, kwargs)`` of one branch call, from the flat tensor list."""
    param_slots, diff_slots, other_slots, static = b
    params = {name: tensors[j] for name, j in param_slots}
    kwargs = dict(static)
    for name, j in diff_slots:
        kwargs[name] = tensors[j]
    for name, j in other_slots:
        kwargs[name] = tensors[j]
    return params, kwargs


def run_forward(plan: Plan, x1: torch.Tensor, x2: torch.Tensor, tensors: Sequence[torch.Tensor]):
    """The stack's forward, storing only the states listed in ``plan.exact``.

    Returns ``(y1, y2, *boundaries)`` where ``boundaries`` alternates x1, x2 of each
    exact state.

    Refuses (eagerly) what the backward's recomputation could not replay, as
    :func:`checked_call` does, with the checks hoisted out of the per-branch path: each
    branch's stream input is checked around its call, the flat tensors' version counters
    and (``plan.rng_check``) the global RNG once around the whole stack. A failure names
    the block and branch: the RNG offender is found by replaying the stack from the
    saved RNG state with per-branch checks (error path only).
    """
    if torch.compiler.is_compiling():
        return _forward_loop(plan, x1, x2, tensors, _call_unchecked)
    versions = [t._version for t in tensors]
    rng_before = _rng_states(x1.device) if plan.rng_check else None
    out = _forward_loop(plan, x1, x2.clone(), tensors, _call_checking_input)  # f sees a copy of the caller's x2
    for j, (t, version) in enumerate(zip(tensors, versions)):
        if t._version != version:
            i, branch, fn, label = _first_user(plan, j)
            raise _mutation_error(plan.where, i, branch, fn, label)
    if rng_before is not None and not _same_states(rng_before, _rng_states(x1.device)):
        _set_rng_states(x1.device, rng_before)
        _forward_loop(plan, x1, x2.clone(), tensors, _call_checking_rng)  # raises naming the branch
        raise _rng_error(plan.where, None, None)  # the replay did not repeat the draw: name no branch
    return out


def _call_unchecked(plan: Plan, i: int, branch: int, fn, params, x, kwargs):
    return call_branch(fn, params, x, kwargs, plan.seed(i, branch))


def _call_checking_input(plan: Plan, i: int, branch: int, fn, params, x, kwargs):
    version = x._version
    out = _call_naming_block(plan.where, i, _BRANCH[branch], fn, params, x, kwargs, plan.seed(i, branch))
    if x._version != version:
        raise _mutation_error(plan.where, i, _BRANCH[branch], fn, "its input x")
    return out


def _call_checking_rng(plan: Plan, i: int, branch: int, fn, params, x, kwargs):
    return checked_call(plan.where, i, _BRANCH[branch], fn, params, x, kwargs, plan.seed(i, branch), rng_check=True)


def _forward_loop(plan: Plan, x1, x2, tensors, call):
    exact = plan.exact
    boundaries: List[torch.Tensor] = []
    for i, (f, g) in enumerate(plan.blocks):
        (fp, fk), (gp, gk) = bind(plan.binds[i][0], tensors), bind(plan.binds[i][1], tensors)
        fx = call(plan, i, 0, f, fp, x2, fk)
        _checks.check_output_shape(plan.where, fx, x2, i, "f")
        y1 = x1 + fx
        gy = call(plan, i, 1, g, gp, y1, gk)
        _checks.check_output_shape(plan.where, gy, y1, i, "g")
        x1, x2 = y1, x2 + gy
        if i + 1 in exact:
            boundaries += (x1, x2)
    return (x1, x2, *boundaries)


def _set_rng_states(device: torch.device, states) -> None:
    torch.set_rng_state(states[0])
    module = device_module(device)
    if module is not None and len(states) > 1:
        module.set_rng_state(states[1], device.index if device.index is not None else module.current_device())


def _replay(autocast, fn, params, x, kwargs, seed, mode=None):
    """Recompute one branch under the forward's autocast state (the only autocast scope:
    the vjp itself runs outside it, as plain autograd's backward does) and, for a
    module-backed branch, the forward's train/eval flags (``model.eval()`` between
    forward and backward must not change what is recomputed)."""
    device_type, dtype, enabled = autocast
    switched = []
    if mode is not None:
        for module, training in zip(*mode):
            if module.training != training:
                module.training = training
                switched.append(module)
    try:
        if not enabled and not torch.is_autocast_enabled(device_type):
            return call_branch(fn, params, x, kwargs, seed)  # already the forward's state
        with torch.autocast(device_type, dtype=dtype, enabled=enabled):
            return call_branch(fn, params, x, kwargs, seed)
    finally:
        for module in switched:
            module.training = not module.training


def _diff_slots(b: Bind, tensors: Sequence[torch.Tensor], needs: Sequence[bool]) -> Tuple[int, ...]:
    """The flat slots one branch call differentiates: each tensor once, however many names
    (or both params and kwargs) refer to it, so tied tensors sum their gradient terms."""
    param_slots, diff_slots, _, _ = b
    slots = dict.fromkeys(j for _, j in param_slots + diff_slots if needs[j] and tensors[j].is_floating_point())
    return tuple(slots)


def _bind_with(b: Bind, tensors: Sequence[torch.Tensor], replaced: Dict[int, torch.Tensor]):
    """:func:`bind` with the tensors of some slots replaced (the differentiated inputs)."""
    if not replaced:
        return bind(b, tensors)
    return bind(b, [replaced.get(j, t) for j, t in enumerate(tensors)])


def _branch_vjp(fn, b, tensors, needs, x, cotangent, seed, eager, autocast, mode=None, partner=None):
    """Recompute ``fn`` at ``x``, rebuild the stream from it, and take the vjp of ``cotangent``.

    Returns ``(rebuilt, grads, x_grad)``: ``rebuilt = partner - fn(x)`` (the other half
    of the block's input; ``None`` when ``partner`` is ``None``; ``partner`` is a
    one-item list, emptied here so that the old half is freed), ``grads`` as
    ``{flat_slot: tensor}`` for the flat tensors (params and kwargs) that need a gradient,
    and the gradient for ``x``. Gradients are taken per slot, so a tensor bound under
    several names gets the sum of its terms. The rebuilt half is computed before the
    vjp, so the branch output is dead (and freed) while the vjp runs.
    """
    slots = _diff_slots(b, tensors, needs)
    if eager:
        return _autograd_vjp(fn, b, tensors, slots, x, cotangent, seed, autocast, mode, partner)

    def call(diff, inp):
        params, kwargs = _bind_with(b, tensors, dict(zip(slots, diff)))
        return _replay(autocast, fn, params, inp, kwargs, seed, mode)

    out, vjp_fn = torch.func.vjp(call, tuple(tensors[j] for j in slots), x)
    rebuilt = None if partner is None else partner.pop() - out
    cotangent = cotangent.to(out.dtype)
    del out
    g_slots, gx = vjp_fn(cotangent)
    return rebuilt, dict(zip(slots, g_slots)), gx


def _autograd_vjp(fn, b, tensors, slots, x, cotangent, seed, autocast, mode=None, partner=None):
    """The same with ``torch.autograd.grad`` (no functorch level active, no graph kept).

    Where possible the parameters are the caller's, as saved: the recomputation's graph
    reaches them directly (no ``functional_call`` swap when they are a module's live
    parameters), and ``autograd.grad`` returns their gradients without touching
    ``.grad``. A tensor that does not require grad here (a ``torch.func`` input seen one
    level down) or that has tensor hooks (which would fire twice) is differentiated
    through a fresh alias instead. The output is differentiated through its gradient
    edge, so its memory is released before the vjp runs.
    """
    replaced = {}
    for j in slots:
        t = tensors[j]
        if not t.requires_grad or getattr(t, "_backward_hooks", None) or t.grad_fn is not None:
            replaced[j] = t.detach().requires_grad_()
    with torch.enable_grad():
        xin = x.detach().requires_grad_()
        params, kwargs = _bind_with(b, tensors, replaced)
        out = _replay(autocast, fn, params, xin, kwargs, seed, mode)
        inputs = (xin, *(replaced.get(j, tensors[j]) for j in slots))
        del params, kwargs, replaced
    rebuilt = None if partner is None else partner.pop() - out.detach()
    if cotangent.dtype != out.dtype:  # autocast: the branch ran in lower precision
        cotangent = cotangent.to(out.dtype)
    if out.grad_fn is None:  # nothing to differentiate (a branch that ignores its inputs)
        grads = (None,) * len(inputs)
    else:
        root = torch.autograd.graph.get_gradient_edge(out)
        del out
        # torch.autograd.grad without its per-call argument normalization (shapes and
        # dtypes match by construction): no retain/create graph, unused inputs give None.
        grads = _engine_run_backward((root,), (cotangent,), False, False, inputs, True, False)
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return rebuilt, {j: g for j, g in zip(slots, grads[1:]) if g is not None}, gx


def _block_vjp(plan: Plan, i: int, branch: int, fn, tensors, needs, x, cotangent, eager, partner=None):
    """:func:`_branch_vjp` of block ``i``'s branch; errors name the block and branch."""
    try:
        return _branch_vjp(fn, plan.binds[i][branch], tensors, needs, x, cotangent, plan.seed(i, branch), eager,
                           plan.autocast, plan.mode(i, branch), partner)
    except RuntimeError as error:
        if str(error).startswith(plan.where):
            raise
        raise RuntimeError(f"{plan.where}: block {i} branch {_BRANCH[branch]} failed in the backward "
                           f"recomputation: {error}") from error


def run_backward(plan: Plan, dy1, dy2, saved: List[Optional[torch.Tensor]], needs: Sequence[bool]):
    """Walk the blocks in reverse: rebuild inputs, recompute, back-propagate.

    Args:
        dy1, dy2: cotangents of the final outputs (``None`` counts as zero).
        saved: ``[y1, y2, *boundaries, *tensors]`` as saved in ``setup_context``. A list:
            the walk drops its references to ``y1``/``y2`` (sets them to ``None``), so a
            caller that holds no other reference frees them after the last block.
        needs: ``needs_input_grad`` of the flat tensors.

    Returns:
        ``(dx1, dx2, grads)`` with ``grads[j]`` the gradient of flat tensor ``j`` (or None).

    Memory: besides one branch's recomputation, the walk keeps four stream tensors alive
    (the two halves and their cotangents): each value is released as soon as it is dead.
    """
    y1, y2 = saved[0], saved[1]
    saved[0] = saved[1] = None
    nb = 2 * len(plan.exact)
    bounds = saved[2:2 + nb]
    tensors = saved[2 + nb:]
    exact = {j: (bounds[2 * m], bounds[2 * m + 1]) for m, j in enumerate(plan.exact)}
    dy1 = torch.zeros_like(y1) if dy1 is None else dy1
    dy2 = torch.zeros_like(y2) if dy2 is None else dy2
    grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
    # With no graph to record and no functorch level active, the cheaper
    # torch.autograd.grad path; otherwise (create_graph, a transform one level down,
    # torch.compile) torch.func.vjp, which every transform and Dynamo can trace.
    eager = not (torch.is_grad_enabled() or torch.compiler.is_compiling()
                 or torch._C._functorch.peek_interpreter_stack() is not None)
    for i in range(len(plan.blocks) - 1, -1, -1):
        f, g = plan.blocks[i]
        if i + 1 in exact:
            y1, y2 = exact[i + 1]
        # g at y1 rebuilds x2 = y2 - g(y1); y2 is dead once x2 exists.
        # (The partner goes in a one-item list that the callee empties: no frame keeps it.)
        box, y2 = (None if i in exact else [y2]), None
        x2, g_grads, dy1_g = _block_vjp(plan, i, 1, g, tensors, needs, y1, dy2, eager, box)
        if i in exact:
            x2 = exact[i][1]
        a1 = dy1 + dy1_g
        dy1 = dy1_g = None
        # f at x2 rebuilds x1 = y1 - f(x2) (not needed below block 0); y1 is then dead.
        box, y1 = (None if i == 0 or i in exact else [y1]), None
        x1, f_grads, dx2_f = _block_vjp(plan, i, 0, f, tensors, needs, x2, a1, eager, box)
        dy1, dy2 = a1, dy2 + dx2_f
        a1 = dx2_f = None
        if i > 0:
            y1, y2 = (x1, x2) if i not in exact else (None, None)
        x1 = x2 = None
        for block_grads in (g_grads, f_grads):
            for j, v in block_grads.items():
                grads[j] = v if grads[j] is None else grads[j] + v
        g_grads = f_grads = None
    return dy1, dy2, grads


def _backward_one_level_down(interpreter, plan: Plan, dy1, dy2, saved, needs):
    """The backward walk for a ``torch.func`` grad level, recorded only below it.

    ``torch.func.grad``/``vjp`` differentiate with ``create_graph=True`` and would record
    every block's recomputation at their own level, keeping it alive through the returned
    gradients (O(depth) memory). Here the saved tensors are unwrapped from that level and
    the walk runs one level down, so outer transforms (``grad(grad)``, ``vmap(grad)``)
    still see it, and the results are rewrapped. When no grad level is left below, the
    walk also records nothing at base; results that base autograd could otherwise
    differentiate get a node that raises (never a silent detach).
    """
    from torch._C._functorch import _unwrap_for_grad, _wrap_for_grad

    level = interpreter.level()

    def unwrap(t):
        return None if t is None else _unwrap_for_grad(t, level)

    saved_down = [unwrap(t) for t in saved]
    anchors = tuple(saved_down)  # run_backward drops y1/y2 from its list; the saved variables keep them anyway
    message = SAME_LEVEL.format(where=plan.where)
    with interpreter.lower():
        records = records_below()
        base_grad = torch.is_grad_enabled()
        with contextlib.nullcontext() if records else torch.no_grad():
            dx1, dx2, grads = run_backward(plan, unwrap(dy1), unwrap(dy2), saved_down, needs)
        results = [dx1, dx2, *grads]
        if not records and base_grad and torch._C._functorch.peek_interpreter_stack() is None:
            results = guarded(results, anchors, message)
    results = [None if r is None else _wrap_for_grad(r, level) for r in results]
    if torch.is_grad_enabled():
        results = guarded(results, (dy1, dy2, *saved), message, level)
    return results[0], results[1], results[2:]


class _ReversibleBase(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):
        plan = inputs[0]
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*output, *inputs[3:])

    @staticmethod
    def backward(ctx, dy1, dy2, *_boundary_grads):
        needs = ctx.needs_input_grad
        plan = ctx.plan
        saved = list(ctx.saved_tensors)
        interpreter = None if plan.higher_order else current_grad_interpreter()
        if interpreter is not None:
            dx1, dx2, grads = _backward_one_level_down(interpreter, plan, dy1, dy2, saved, needs[3:])
        else:
            dx1, dx2, grads = run_backward(plan, dy1, dy2, saved, needs[3:])
        return (None, dx1 if needs[1] else None, dx2 if needs[2] else None, *grads)


def _make_function(n_tensors: int) -> type:
    names = [f"t{i}" for i in range(n_tensors)]
    args = "".join(f", {n}" for n in names)
    tup = "(" + "".join(f"{n}, " for n in names) + ")"
    namespace: Dict[str, Any] = {"run_forward": run_forward}
    exec(f"def forward(plan, x1, x2{args}):\n    return run_forward(plan, x1, x2, {tup})\n", namespace)
    return type(
        f"ReversibleSequenceFunction{n_tensors}",
        (_ReversibleBase,),
        {"forward": staticmethod(namespace["forward"]), "__module__": __name__},
    )


@torch.compiler.assume_constant_result
def _function_name(n_tensors: int) -> str:
    name = f"ReversibleSequenceFunction{n_tensors}"
    if name not in globals():
        globals()[name] = _make_function(n_tensors)
    return name


class ReversibleSequenceFunction(_ReversibleBase):
    """The eager Function: ``forward(plan, x1, x2, *tensors)``.

    ``Function.apply`` binds its arguments to ``forward``'s signature on every call
    (``inspect``), which costs time per parameter of a fixed-arity ``forward``: eager
    calls use this variadic one instead.
    """

    @staticmethod
    def forward(plan, x1, x2, *tensors):
        return run_forward(plan, x1, x2, tensors)


def function_for(n_tensors: int) -> type:
    """The Function class to apply to ``(plan, x1, x2, t0, ..., t{n-1})``.

    Eager: :class:`ReversibleSequenceFunction`. Inside ``torch.compile`` (torch 2.13
    needs a fixed number of positional arguments there) one class whose
    ``forward(plan, x1, x2, t0, ..., t{n-1})`` has fixed arity, made once per tensor
    count and kept as a global of this module, so that Dynamo sees an ordinary module
    attribute (guardable).
    """
    if not torch.compiler.is_compiling():
        return ReversibleSequenceFunction
    return getattr(_this_module, _function_name(n_tensors))


_this_module = sys.modules[__name__]
