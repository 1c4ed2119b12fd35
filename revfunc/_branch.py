"""The branch call: one branch of one block, run the one way every path runs it.

Forward: :func:`call` (``Watch.NONE``, ``INPUT``, ``ALL`` or ``RNG``) binds the branch's
parameters and keywords from the flat tensor list, runs it with its child seed
(:func:`revfunc.random.call_branch`), names the block and branch in a ``TypeError``
it raises, checks its output's shape and dtype, and, on reversible paths, refuses what
the backward's recomputation could not replay: in-place writes to its input or to its
parameters, buffers and keyword tensors (tensor version counters) and, when the call
was declared deterministic, global RNG use.

Backward: :func:`vjp` recomputes the branch at its rebuilt input under the forward's
autocast state and train/eval flags (:func:`replay`), rebuilds the other half of the
block's input from it, and takes the vjp of the cotangent.
"""

from __future__ import annotations

import contextlib
import enum
import weakref
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch.autograd.graph import _engine_run_backward  # private, but stable from 2.11 to 2.13 (tested)
from torch.utils._pytree import tree_flatten, tree_unflatten

from revfunc import _checks
from revfunc._plan import BRANCHES, Bind, Plan, bind, label
from revfunc.random import call_branch, device_module


class Watch(enum.IntEnum):
    """What a forward branch call checks besides its output."""

    NONE = 0  #: plain paths and compiled code (in-place updates are legal there)
    INPUT = 1  #: the stream input's version (the rest is checked once around the stack)
    ALL = 2  #: the input, parameters, buffers and keyword tensors
    RNG = 3  #: ALL, plus the global RNG (the error path of a deterministic call)


def call(
    plan: Plan,
    i: int,
    branch: int,
    x: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    watch: Watch = Watch.NONE,
    saving: bool = False,
) -> torch.Tensor:
    """Run block ``i``'s ``branch`` (0: f, 1: g) at ``x``; see the module docstring.
    ``saving``: the memory-saving forward, which runs the branch in the plan's
    selective-saving forward context (``context_fn``), if any, and in the caller's grad
    mode (see :func:`_saving_call`)."""
    fn = plan.blocks[i][branch]
    params, kwargs = bind(plan.binds[i][branch], tensors)
    watched = rng_before = None
    before: Any = None
    if watch >= Watch.ALL:
        watched = _watched(params, x, kwargs)
        before = [t._version for _, _, t in watched]
    elif watch:
        before = x._version
    if watch == Watch.RNG:
        rng_before = rng_states(x.device)
    try:
        if saving:
            out = _saving_call(plan, i, branch, fn, params, x, kwargs)
        else:
            out = call_branch(fn, params, x, kwargs, plan.seed(i, branch))
    except TypeError as error:
        raise _checks.branch_type_error(plan.where, i, BRANCHES[branch], fn, error) from error
    except RuntimeError as error:
        if saving and _INPLACE_INPUT in str(error):
            raise _checks.mutation_error(plan.where, i, BRANCHES[branch], fn, label("input", "x")) from error
        if saving and _INPLACE_LEAF in str(error):
            what = _written_leaf(plan, i, branch, fn, params, x, kwargs)
            raise _checks.mutation_error(plan.where, i, BRANCHES[branch], fn, what) from error
        if str(error).startswith("revfunc."):  # already names its call
            raise
        raise _checks.branch_runtime_error(plan.where, i, BRANCHES[branch], fn, x, error) from error
    if watch == Watch.INPUT and x._version != before:
        raise _checks.mutation_error(plan.where, i, BRANCHES[branch], fn, label("input", "x"))
    if watched is not None:
        for (kind, name, t), version in zip(watched, before):
            if t._version != version:
                raise _checks.mutation_error(plan.where, i, BRANCHES[branch], fn, label(kind, name))
    if rng_before is not None and not same_states(rng_before, rng_states(x.device)):
        raise _checks.rng_error(plan.where, i, BRANCHES[branch])
    _checks.check_branch_output(
        plan.where, out, x, i, BRANCHES[branch], None if plan.couplings is None else plan.couplings[i][branch]
    )
    return out


def _keep(t: torch.Tensor) -> torch.Tensor:
    return t.detach()  # no reference cycle through a saved output (see saved_tensors_hooks)


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _saving_call(plan: Plan, i: int, branch: int, fn, params, x, kwargs):
    """The memory-saving forward's branch call, in the caller's grad mode (see
    :attr:`revfunc._plan.Plan.grad_mode`), inside the selective-saving forward context if
    any.

    In grad mode the call is recorded and its output returned detached, so the graph dies
    with it, while a tensor the branch keeps (a cache derived from its parameters) keeps
    its graph to them, as in plain autograd. Outside ``torch.func`` transforms (which
    disable saved-tensor hooks and ``requires_grad_``):

    - it runs under identity saved-tensor hooks, so ``save_on_cpu`` and the caller's
      hooks never see this transient graph, and a checkpoint around the model counts
      the same saved tensors in its recomputation as in its forward;
    - its input is a view of a fresh leaf that requires grad, as the stream does in
      plain autograd, and no graph reaches past it into the caller's: an in-place write
      to it, or to a parameter, is refused by autograd there (re-raised naming the block
      and the branch), and a tensor computed from it that outlives the call (an
      auxiliary loss kept on the module, a hook's capture) keeps the leaf alive, which
      :func:`_warn_kept` reports.
    """
    seed = plan.seed(i, branch)
    if not plan.grad_mode:
        if plan.contexts is None:
            return call_branch(fn, params, x, kwargs, seed)
        with plan.contexts.forward_context(i, branch):
            return call_branch(fn, params, x, kwargs, seed)
    leaf = None
    hooks = (
        torch.autograd.graph.saved_tensors_hooks(_keep, _unpack)
        if _caller_hooks_active()  # each pack is a Python call: only when the caller's would run instead
        else contextlib.nullcontext()
    )
    with torch.enable_grad(), hooks:
        if torch._C._functorch.peek_interpreter_stack() is None:
            leaf = x.detach().requires_grad_()
            x = leaf.view_as(leaf)
        if plan.contexts is None:
            out = call_branch(fn, params, x, kwargs, seed)
        else:
            with plan.contexts.forward_context(i, branch):
                out = call_branch(fn, params, x, kwargs, seed)
    if not isinstance(out, torch.Tensor):
        return out  # refused by the output check
    result = out.detach()
    if leaf is not None:
        kept = weakref.ref(leaf)
        del x, out, leaf
        if kept() is not None:
            _warn_kept(plan, i, branch, fn)
    return result


def _caller_hooks_active() -> bool:
    """Whether default saved-tensor hooks are set here (``save_on_cpu``, a checkpoint, the
    caller's own) and may be replaced (not under ``torch.func``, which disables them)."""
    autograd = torch._C._autograd
    return (
        autograd._saved_tensors_hooks_is_enabled()  # type: ignore[attr-defined]  # private, 2.11 to 2.13
        and autograd._top_saved_tensors_default_hooks(False) is not None  # type: ignore[attr-defined]
    )


# Branch functions warned about keeping a tensor computed from their input (weakly).
_WARNED_KEPT: "weakref.WeakSet" = weakref.WeakSet()


def _warn_kept(plan: Plan, i: int, branch: int, fn) -> None:
    """Warn, once per branch function, that it kept a tensor computed from its input."""
    try:
        if fn in _WARNED_KEPT:
            return
        _WARNED_KEPT.add(fn)
    except TypeError:  # not weak-referenceable: warned each time
        pass
    import warnings

    warnings.warn(_checks.kept_tensor_warning(plan.where, i, BRANCHES[branch], fn), UserWarning, stacklevel=6)


# Autograd's refusals of an in-place write in grad mode: to the input (a view of the leaf
# alias above) or to a parameter (a leaf).
_INPLACE_INPUT = "a view of a leaf Variable that requires grad is being used in an in-place operation"
_INPLACE_LEAF = "a leaf Variable that requires grad is being used in an in-place operation"


def _written_leaf(plan: Plan, i: int, branch: int, fn, params, x, kwargs) -> str:
    """Which parameter or keyword tensor the branch writes in place (the error path of a
    write that autograd refused in grad mode): the branch is run once more on copies, under
    no grad, and the copies' version counters tell. The caller's tensors are not touched."""
    copies = {k: v.detach().clone() for k, v in params.items()}
    kw = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    watched = _watched(copies, x.detach().clone(), kw)
    before = [t._version for _, _, t in watched]
    try:
        with torch.no_grad():
            call_branch(fn, copies, watched[0][2], kw, plan.seed(i, branch))
    except Exception:
        pass
    for (kind, name, t), version in zip(watched, before):
        if t._version != version:
            return label(kind, name)
    return "a parameter or keyword tensor that requires grad"


def _watched(params, x, kwargs):
    """``(kind, name, tensor)`` whose in-place modification by a branch is an error."""
    watched = [("input", "x", x)]
    watched += [("param", name, t) for name, t in params.items() if isinstance(t, torch.Tensor)]
    watched += [("keyword", name, v) for name, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return watched


def rng_states(device: torch.device) -> List[torch.Tensor]:
    """The global RNG states a branch on ``device`` can draw from: CPU, and the accelerator's."""
    states = [torch.get_rng_state()]
    module = device_module(device)
    if module is not None:
        states.append(module.get_rng_state(device.index if device.index is not None else module.current_device()))
    return states


def set_rng_states(device: torch.device, states) -> None:
    torch.set_rng_state(states[0])
    module = device_module(device)
    if module is not None and len(states) > 1:
        module.set_rng_state(states[1], device.index if device.index is not None else module.current_device())


def same_states(a, b) -> bool:
    return all(torch.equal(s, t) for s, t in zip(a, b))


def replay(plan: Plan, i: int, branch: int, params, x, kwargs):
    """Recompute block ``i``'s ``branch`` under the forward's autocast state (the only
    autocast scope: the vjp itself runs outside it, as plain autograd's backward does)
    and, for a module-backed branch, the forward's train/eval flags (``model.eval()``
    between forward and backward must not change what is recomputed), inside the
    recomputation context of ``context_fn`` when the forward saved op outputs."""
    fn, seed, mode = plan.blocks[i][branch], plan.seed(i, branch), plan.mode(i, branch)
    cached = None if plan.contexts is None else plan.contexts.take(i, branch)
    switched = []
    if mode is not None:
        for module, training in zip(*mode):
            if module.training != training:
                module.training = training
                switched.append(module)
    try:
        with contextlib.nullcontext() if cached is None else cached:  # the forward's saved op outputs
            return in_forward_autocast(plan, lambda: call_branch(fn, params, x, kwargs, seed))
    finally:
        for module in switched:
            module.training = not module.training


def in_forward_autocast(plan: Plan, run):
    """``run()`` under the forward's autocast state (as is when that is already the state)."""
    device_type, dtype, enabled = plan.autocast
    if not enabled and not torch.is_autocast_enabled(device_type):
        return run()
    with torch.autocast(device_type, dtype=dtype, enabled=enabled):
        return run()


def _diff_slots(b: Bind, tensors: Sequence[torch.Tensor], needs: Sequence[bool]):
    """The flat slots one branch call differentiates: each tensor once, however many names
    (or both params and kwargs) refer to it, so tied tensors sum their gradient terms."""
    slots = dict.fromkeys(j for _, j in b.params + b.diff_kwargs if needs[j] and tensors[j].is_floating_point())
    return tuple(slots)


def _bind_with(b: Bind, tensors: Sequence[torch.Tensor], replaced: Dict[int, torch.Tensor]):
    """:func:`bind` with the tensors of some slots replaced (the differentiated inputs)."""
    params, kwargs = bind(b, tensors)
    if replaced:
        params = {name: replaced.get(j, params[name]) for name, j in b.params}
        for name, j in b.diff_kwargs:
            if j in replaced:
                kwargs[name] = replaced[j]
    return params, kwargs


def vjp(
    plan: Plan,
    i: int,
    branch: int,
    tensors,
    needs,
    x,
    cotangent,
    mode: str,
    partner=None,
    captures: bool = True,
    exact=None,
    dlogdet=None,
):
    """Recompute block ``i``'s ``branch`` at ``x``, rebuild the stream, take the vjp of ``cotangent``.

    ``mode``: ``"eager"`` (no graph recorded, no functorch level: ``autograd`` engine
    call), ``"graph"`` (``create_graph=True`` outside transforms: the recomputation is
    recorded, so the gradients can be differentiated again) or ``"func"`` (a functorch
    level or ``torch.compile``: ``torch.func.vjp``, which every transform and Dynamo trace).

    Returns ``(rebuilt, grads, x_grad, partner_grad)``: ``rebuilt``, the other half of the
    block's input, rebuilt from ``partner`` (a one-item list holding the updated half,
    emptied here so that it is freed) through the coupling's inverse (``partner - fn(x)``
    when additive; ``None`` when ``partner`` is ``None``); ``grads`` as ``{flat_slot:
    tensor}`` for the flat tensors (params and kwargs) that need a gradient; the gradient
    for ``x``; and the gradient for the rebuilt half (``cotangent`` itself when additive).
    Gradients are taken per slot, so a tensor bound under several names gets the sum of
    its terms. The rebuilt half is computed before the vjp, so the branch output is dead
    (and freed) while the vjp runs. Errors name the block and the branch.

    A non-additive update (``plan.coupling(i, branch)``) runs :func:`_coupled_vjp`:
    ``exact`` is the half's exact value where the plan keeps one (``boundaries``), and
    ``dlogdet`` the cotangent of the stack's log-determinant (or ``None``).
    """
    try:
        b = plan.binds[i][branch]
        slots = _diff_slots(b, tensors, needs)
        coupling = None if plan.couplings is None else plan.couplings[i][branch]
        if coupling is not None:
            return _coupled_vjp(
                plan, i, branch, coupling, b, tensors, slots, x, cotangent, partner, mode, captures, exact, dlogdet
            )
        if mode == "func":
            return _func_vjp(plan, i, branch, b, tensors, slots, x, cotangent, partner)
        return _autograd_vjp(plan, i, branch, b, tensors, slots, x, cotangent, partner, mode == "graph", captures)
    except RuntimeError as error:
        if str(error).startswith(plan.where):
            raise
        raise _checks.recomputation_error(plan.where, i, BRANCHES[branch], error, plan.contexts is not None) from error


def _func_vjp(plan, i, branch, b, tensors, slots, x, cotangent, partner):
    def run(diff, inp):
        params, kwargs = _bind_with(b, tensors, dict(zip(slots, diff)))
        return replay(plan, i, branch, params, inp, kwargs)

    out, vjp_fn = torch.func.vjp(run, tuple(tensors[j] for j in slots), x)
    rebuilt = None if partner is None else partner.pop() - out
    cotangent = cotangent.to(out.dtype)
    del out
    g_slots, gx = vjp_fn(cotangent)
    return rebuilt, dict(zip(slots, g_slots)), gx, None


# Branch functions whose recomputation needs an engine call without ``inputs=``: a
# reentrant ``torch.utils.checkpoint`` inside the branch refuses one (weakly: the set
# keeps no function alive).
_REENTRANT: "weakref.WeakSet" = weakref.WeakSet()
_REENTRANT_ERROR = "torch.utils.checkpoint is incompatible with .grad()"


def _autograd_vjp(plan, i, branch, b, tensors, slots, x, cotangent, partner, create_graph, captures):
    """The vjp with the autograd engine (no functorch level active).

    Where possible the parameters are the caller's, as saved: the recomputation's graph
    reaches them directly (no ``functional_call`` swap when they are a module's live
    parameters), and the engine returns their gradients without touching ``.grad``. A
    tensor that does not require grad here (a ``torch.func`` input seen one level down)
    or that has tensor hooks (which would fire twice) is differentiated through a fresh
    alias instead. The output is differentiated through its gradient edge, so its
    memory is released before the vjp runs. A branch that returns its input (or a
    parameter) itself is differentiated through a view of it. With ``create_graph``
    the recomputation is recorded on differentiable aliases of the caller's tensors, so
    the results can be differentiated again (double backward, O(depth) memory).

    A branch with a reentrant ``torch.utils.checkpoint`` inside refuses an engine call
    that names its ``inputs``: it is then recomputed on fresh aliases of every input and
    differentiated without ``inputs=``, reading the gradients off the aliases (see
    :func:`_vjp_into_aliases`).
    """
    fn = plan.blocks[i][branch]
    if not create_graph and _is_reentrant(fn):
        return _vjp_into_aliases(plan, i, branch, b, tensors, slots, x, cotangent, partner, captures)
    with torch.enable_grad():
        replaced, xin = _differentiated(tensors, slots, x, create_graph)
        params, kwargs = _bind_with(b, tensors, replaced)
        out = replay(plan, i, branch, params, xin, kwargs)
        if out.grad_fn is None and out.requires_grad:  # the input or a parameter itself
            out = out.view_as(out)
        inputs = (xin, *(replaced.get(j, tensors[j]) for j in slots))
        del params, kwargs, replaced
    if captures and not create_graph and out.grad_fn is not None:
        check_captures(plan, i, branch, fn, (out,), inputs)
    if cotangent.dtype != out.dtype:  # autocast: the branch ran in lower precision
        cotangent = cotangent.to(out.dtype)
    if out.grad_fn is None:  # nothing to differentiate (a branch that ignores its inputs)
        rebuilt = None if partner is None else partner.pop() - out.detach()
        grads = (None,) * len(inputs)
    elif create_graph:
        rebuilt = None if partner is None else partner.pop() - out
        grads = torch.autograd.grad(out, inputs, cotangent, create_graph=True, allow_unused=True)
    else:
        root = torch.autograd.graph.get_gradient_edge(out)
        rebuilt = None if partner is None else partner.pop() - out.detach()
        del out
        # torch.autograd.grad without its per-call argument normalization (shapes and
        # dtypes match by construction): no retain/create graph, unused inputs give None.
        try:
            grads = _engine_run_backward((root,), (cotangent,), False, False, inputs, True, False)
        except RuntimeError as error:
            if _REENTRANT_ERROR not in str(error):
                raise
            _mark_reentrant(fn)
            # This graph is spent: recompute on aliases.
            del root, inputs
            _, grads_by_slot, gx, _ = _vjp_into_aliases(
                plan, i, branch, b, tensors, slots, x, cotangent, None, captures
            )
            return rebuilt, grads_by_slot, gx, None
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return rebuilt, {j: g for j, g in zip(slots, grads[1:]) if g is not None}, gx, None


def _differentiated(tensors, slots, x, create_graph: bool, into_aliases: bool = False):
    """``(replaced, xin)``: what a recomputation differentiates in place of the caller's
    tensors (see :func:`_autograd_vjp`), under grad mode. With ``create_graph``, a
    differentiable alias of a tensor that requires grad: the engine captures the gradient
    there and never walks on into the caller's graph (which leads back into this
    Function); otherwise a fresh leaf where the caller's tensor does not require grad, has
    tensor hooks (they would fire twice) or is not a leaf; ``into_aliases``: a fresh leaf
    for every one (see :func:`pull`). ``xin``: the branch input."""
    if into_aliases:
        return {j: tensors[j].detach().requires_grad_() for j in slots}, x.detach().requires_grad_()
    replaced = {}
    for j in slots:
        t = tensors[j]
        if create_graph and t.requires_grad:
            replaced[j] = t.view_as(t)
        elif not t.requires_grad or getattr(t, "_backward_hooks", None) or t.grad_fn is not None:
            replaced[j] = t.detach().requires_grad_()
    xin = x.view_as(x) if create_graph and x.requires_grad else x.detach().requires_grad_()
    return replaced, xin


def _mark_reentrant(fn) -> None:
    """From now on, recompute ``fn`` on aliases directly (see :func:`_vjp_into_aliases`)."""
    try:
        _REENTRANT.add(fn)
    except TypeError:  # not weak-referenceable: found out again each call
        pass


def _grads_into_aliases(live: list, aliases: Sequence[torch.Tensor]) -> List[Any]:
    """The engine without ``inputs=`` (what a reentrant checkpoint inside accepts) from
    ``live``, ``[(output, cotangent)]`` (emptied here), read off the fresh leaf ``aliases``'
    ``.grad`` (``None`` where unused)."""
    roots = tuple(torch.autograd.graph.get_gradient_edge(o) for o, _ in live)
    cotangents = tuple(g for _, g in live)
    live.clear()
    _engine_run_backward(roots, cotangents, False, False, (), True, True)
    return [t.grad for t in aliases]


def _is_reentrant(fn) -> bool:
    try:
        return fn in _REENTRANT
    except TypeError:  # not weak-referenceable
        return False


def _vjp_into_aliases(plan, i, branch, b, tensors, slots, x, cotangent, partner, captures):
    """The vjp for a branch whose graph refuses ``inputs=`` (a reentrant checkpoint inside):
    the branch is recomputed on fresh leaf aliases of its input and of every tensor it
    differentiates, and the engine runs without ``inputs=``, accumulating into the
    aliases' ``.grad`` only (the capture check first refuses any other leaf the graph
    reaches), so the caller's ``.grad`` is never written."""
    with torch.enable_grad():
        replaced, xin = _differentiated(tensors, slots, x, False, into_aliases=True)
        params, kwargs = _bind_with(b, tensors, replaced)
        out = replay(plan, i, branch, params, xin, kwargs)
        inputs = (xin, *(replaced[j] for j in slots))
        del params, kwargs, replaced
    if captures and out.grad_fn is not None:
        check_captures(plan, i, branch, plan.blocks[i][branch], (out,), inputs)
    rebuilt = None if partner is None else partner.pop() - out.detach()
    live = [] if out.grad_fn is None else [(out, cotangent.to(out.dtype))]
    del out
    grads = _grads_into_aliases(live, inputs)
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return rebuilt, {j: g for j, g in zip(slots, grads[1:]) if g is not None}, gx, None


# --- couplings: how a branch output updates its half of the stream -------------------


def _parts(h) -> Tuple[Tuple[torch.Tensor, ...], Any]:
    """A (prepared) branch output as ``(its tensors, its structure)``: a tensor, a pair,
    or any pytree a coupling's ``prepare`` returns (``affine``: a dict ``{"s", "t"}``)."""
    leaves, spec = tree_flatten(h)
    return tuple(leaves), spec


def _as_output(parts: Sequence[torch.Tensor], spec):
    """:func:`_parts`' inverse: the tensors put back in their structure."""
    return tree_unflatten(list(parts), spec)


def _grads_like(dh, h, want, where: str, what: str) -> Tuple[torch.Tensor, ...]:
    """A coupling ``vjp``'s ``dp`` as tensors in the order of the prepared output ``h``'s
    (a dict's keys in ``h``'s order); refused, naming ``what``, if its structure is not
    ``h``'s, ``want`` (:func:`_parts`)."""
    if isinstance(h, dict) and isinstance(dh, dict):
        dh = {k: dh.get(k) for k in h}
    leaves, got = tree_flatten(dh)
    if got != want:
        raise TypeError(_checks.msg(where, what, f"dp with the prepared output's structure {want}", f"{got}"))
    return tuple(leaves)


def event_sum(term, x: torch.Tensor, event_dim: int) -> torch.Tensor:
    """An elementwise log-det ``term`` broadcast to ``x`` and summed over its last
    ``event_dim`` dimensions, in ``x``'s dtype: shape ``x.shape[:x.dim() - event_dim]``."""
    term = torch.as_tensor(term, device=x.device).to(x.dtype)
    term = torch.broadcast_to(term, x.shape)
    return term.sum(dim=tuple(range(x.dim() - event_dim, x.dim()))) if event_dim else term


def update(plan: Plan, i: int, branch: int, x: torch.Tensor, h):
    """``(y, logdet term)``: block ``i``'s ``branch`` update of its half ``x`` with the
    branch output ``h`` (``x + h`` when additive), and its log-det summed over the event
    dimensions (``None`` unless the plan returns a log-det, or when volume preserving)."""
    c = plan.coupling(i, branch)
    if c is None:
        return x + h, None
    return in_coupling(plan, i, branch, c, _coupled_update, c, x, h, plan.event_dim if plan.logdet else None)


def _coupled_update(c, x: torch.Tensor, h, event_dim):
    """:func:`update` through ``c``; the log-det term only with an ``event_dim``."""
    p = c.prepared(h)
    y = c.forward(x, p)
    if event_dim is None or c.logdet is None:
        return y, None
    return y, event_sum(c.logdet(x, p), x, event_dim)


def _coupled_rebuild(c, y: torch.Tensor, h) -> torch.Tensor:
    """:func:`rebuild` through ``c``."""
    return c.inverse(y, c.prepared(h))


def rebuild(plan: Plan, i: int, branch: int, y: torch.Tensor, h) -> torch.Tensor:
    """The half before block ``i``'s ``branch`` update: ``y - h`` when additive."""
    c = plan.coupling(i, branch)
    return y - h if c is None else in_coupling(plan, i, branch, c, _coupled_rebuild, c, y, h)


def in_coupling(plan: Plan, i: int, branch: int, c, fn, *args):
    """``fn(*args)``, a call of block ``i``'s ``branch`` coupling ``c``'s functions: its
    errors re-raised naming the block, the branch, the coupling and the container (a
    message of revfunc's own, which already names its call, as is)."""
    try:
        return fn(*args)
    except (TypeError, ValueError, RuntimeError) as error:
        if str(error).startswith("revfunc."):
            raise
        raise _checks.coupling_error(plan.where, i, BRANCHES[branch], c, error) from error


def _coupling_vjp(c, x, h, dy, dlogdet, event_dim: int, mode: str, where: str = "", what: str = ""):
    """``(dx, dh parts)``: the vjp of ``y = c.forward(x, h)`` (and of its summed log-det,
    when ``dlogdet`` is given) at ``(x, h)``, ``h`` already prepared (``c.prepared``), the
    parts in :func:`_parts`' order. ``where``, ``what``: how an error names the update.
    Elementwise and cheap: a few stream tensors. ``mode`` as in :func:`vjp`: the autograd
    engine, recording with ``"graph"``, or ``torch.func.vjp`` under a functorch level or
    ``torch.compile``."""
    with_logdet = dlogdet is not None and c.logdet is not None
    parts, spec = _parts(h)
    if c.vjp is not None:  # the coupling's closed form: no recomputation of forward
        dterm = None
        if with_logdet:
            dterm = dlogdet.to(x.dtype).reshape(dlogdet.shape + (1,) * event_dim).expand_as(x)
        result = c.vjp(x, h, dy.to(x.dtype), dterm)
        dx, dh = _checks.check_vjp_result(where, what, result, (torch.Tensor, object), "a pair (dx, dp)")
        if dx.shape != x.shape:
            raise ValueError(
                _checks.msg(where, what, f"dx shaped like the half {tuple(x.shape)}", f"shape {tuple(dx.shape)}")
            )
        grads = _grads_like(dh, h, spec, where, what)
        return dx, tuple(g if g.shape == t.shape else g.sum_to_size(t.shape) for g, t in zip(grads, parts))

    def run(xx, *hh):
        h_in = _as_output(hh, spec)
        y = c.forward(xx, h_in)
        if not with_logdet:
            return (y,)
        return y, event_sum(c.logdet(xx, h_in), xx, event_dim)

    cotangents = (dy.to(x.dtype),) if not with_logdet else (dy.to(x.dtype), dlogdet.to(x.dtype))
    if mode == "func":
        pullback = torch.func.vjp(run, x, *parts)[1]
        grads = pullback(cotangents)
        return grads[0], tuple(grads[1:])
    with torch.enable_grad():

        def leaf(t):
            # Recording: a fresh view, so that the vjp in ``h`` is the partial one (``x``
            # is the rebuilt half, itself computed from ``h``: through ``t`` itself the
            # engine would add that path). Otherwise a detached leaf.
            return t.view_as(t) if mode == "graph" and t.requires_grad else t.detach().requires_grad_()

        xx, hh = leaf(x), tuple(leaf(t) for t in parts)
        live = [(o, g) for o, g in zip(run(xx, *hh), cotangents) if o.requires_grad]  # a constant log-det is not
        grads = torch.autograd.grad(
            [o for o, _ in live], (xx, *hh), [g for _, g in live], create_graph=mode == "graph", allow_unused=True
        )
    grads = tuple(torch.zeros_like(t) if g is None else g for t, g in zip((xx, *hh), grads))
    return grads[0], grads[1:]


def _coupled_vjp(plan, i, branch, c, b, tensors, slots, x, cotangent, partner, mode, captures, exact, dlogdet):
    """:func:`vjp` for a non-additive update ``y = c(partner_x, fn(x))``: recompute the
    branch and its coupling's ``prepare`` (once: the inverse and the vjp share it), rebuild
    its half with ``c.inverse``, take the coupling's vjp (for the rebuilt half and the
    prepared output, including the log-det's cotangent), then the branch's."""
    fn = plan.blocks[i][branch]
    half = None if partner is None else partner.pop()
    who = (plan.where, f"block {i} branch {BRANCHES[branch]}'s coupling {c!r}: its vjp")

    def guard(fn, *args):  # the coupling's own functions: errors name it (see in_coupling)
        return in_coupling(plan, i, branch, c, fn, *args)

    if mode == "func":

        def run(diff, inp):
            params, kwargs = _bind_with(b, tensors, dict(zip(slots, diff)))
            return guard(c.prepared, replay(plan, i, branch, params, inp, kwargs))

        h, pullback = torch.func.vjp(run, tuple(tensors[j] for j in slots), x)
        rebuilt = None if half is None else guard(c.inverse, half, h)
        half = None
        at = exact if exact is not None else rebuilt
        d_half, d_h = guard(_coupling_vjp, c, at, h, cotangent, dlogdet, plan.event_dim, "func", *who)
        outs, spec = _parts(h)
        d_h = _as_output([g.to(o.dtype) for g, o in zip(d_h, outs)], spec)
        del outs, h
        g_slots, gx = pullback(d_h)
        return rebuilt, dict(zip(slots, g_slots)), gx, d_half
    create_graph = mode == "graph"
    # A reentrant checkpoint inside refuses an engine call with ``inputs=``: recompute on
    # fresh leaf aliases of every input and read the gradients off them.
    into_aliases = not create_graph and _is_reentrant(fn)
    with torch.enable_grad():
        replaced, xin = _differentiated(tensors, slots, x, create_graph, into_aliases)
        params, kwargs = _bind_with(b, tensors, replaced)
        outs, spec = _parts(guard(c.prepared, replay(plan, i, branch, params, xin, kwargs)))
        outs = tuple(o.view_as(o) if o.grad_fn is None and o.requires_grad else o for o in outs)
        inputs = (xin, *(replaced.get(j, tensors[j]) for j in slots))
        del params, kwargs, replaced
    if captures and not create_graph:
        check_captures(plan, i, branch, fn, outs, inputs)
    h = _as_output(outs if create_graph else [o.detach() for o in outs], spec)
    with contextlib.nullcontext() if create_graph else torch.no_grad():
        rebuilt = None if half is None else guard(c.inverse, half, h)
    half = None
    at = exact if exact is not None else rebuilt
    d_half, d_h = guard(_coupling_vjp, c, at, h, cotangent, dlogdet, plan.event_dim, mode, *who)
    del h
    live = [(o, g.to(o.dtype)) for o, g in zip(outs, d_h) if o.grad_fn is not None]
    del outs
    grads = pull(fn, live, inputs, create_graph, into_aliases)
    if grads is None:  # a reentrant checkpoint inside: again on aliases, at the half rebuilt here
        again = _coupled_vjp(plan, i, branch, c, b, tensors, slots, x, cotangent, None, mode, captures, at, dlogdet)
        return (rebuilt, *again[1:])
    gx = torch.zeros_like(x) if grads[0] is None else grads[0]
    return rebuilt, {j: g for j, g in zip(slots, grads[1:]) if g is not None}, gx, d_half


def pull(fn, live: list, inputs: Sequence[torch.Tensor], create_graph: bool, into_aliases: bool):
    """The gradients of ``live``, ``[(output, cotangent)]`` (emptied here), into ``inputs``
    (``None`` where unused): recorded with ``create_graph``; read off fresh leaf aliases
    with ``into_aliases`` (:func:`_grads_into_aliases`); else :func:`engine_grad`.

    Returns ``None`` where a reentrant ``torch.utils.checkpoint`` inside ``fn`` refused
    the engine call: ``fn`` is then marked, and the caller recomputes on aliases."""
    if not live:  # nothing to differentiate (a branch that ignores its inputs)
        return (None,) * len(inputs)
    if create_graph:
        outs, cotangents = [o for o, _ in live], [g for _, g in live]
        live.clear()
        return torch.autograd.grad(outs, inputs, cotangents, create_graph=True, allow_unused=True)
    if into_aliases:
        return _grads_into_aliases(live, inputs)
    try:
        return engine_grad(live, inputs)
    except RuntimeError as error:
        if _REENTRANT_ERROR not in str(error):
            raise
        _mark_reentrant(fn)
        return None


def engine_grad(live: list, inputs: Sequence[torch.Tensor]) -> Sequence[Any]:
    """``torch.autograd.grad`` of ``live``, ``[(output, cotangent)]`` (emptied here), into
    ``inputs``, unused ones ``None``, without recording and without its per-call argument
    normalization (shapes and dtypes match by construction). The outputs are held by their
    gradient edges only, so they are freed before the engine runs."""
    roots = tuple(torch.autograd.graph.get_gradient_edge(o) for o, _ in live)
    cotangents = tuple(g for _, g in live)
    live.clear()
    return _engine_run_backward(roots, cotangents, False, False, tuple(inputs), True, False)


def check_captures(plan, i, branch, fn, outs, inputs) -> None:
    """Refuse a recomputation whose graph (from its outputs ``outs``, one walk for all)
    reaches a leaf that requires grad but is not one of the branch's inputs (a
    closure-captured ``nn.Parameter``): its gradient would be silently lost.

    Checked on every call (a branch can reach a captured tensor for some inputs only, or
    a tensor can start requiring grad later). Tensors are compared by their gradient
    edge (the node their gradient flows into), never by Python identity: a saved-tensor
    round trip (``save_on_cpu``, any ``saved_tensors_hooks``, a checkpoint around the
    model) hands back new tensor objects that share the original's edge.
    """
    passed = {id(t) for t in inputs}  # the fast path: a leaf passed as itself
    edges = None  # the inputs' gradient edges, the rule, built on the first leaf not passed as itself
    seen = set()
    stack = [o.grad_fn for o in outs if o.grad_fn is not None]
    accumulate = _accumulate_grad_type()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node) is accumulate:
            if id(node.variable) in passed:
                continue
            if edges is None:
                edges = {torch.autograd.graph.get_gradient_edge(t).node for t in inputs if t.requires_grad}
            if node not in edges:
                raise _checks.captured_tensor_error(plan.where, i, plan.branch_label(i, branch), fn, node.variable)
            continue
        for next_node, _ in node.next_functions:
            if next_node is not None and next_node not in seen:
                stack.append(next_node)


_ACCUMULATE_GRAD: List[Any] = []


def _accumulate_grad_type() -> Any:
    """The class of the autograd node a leaf's gradient accumulates in."""
    if not _ACCUMULATE_GRAD:
        leaf = torch.zeros((), requires_grad=True)
        _ACCUMULATE_GRAD.append(type(torch.autograd.graph.get_gradient_edge(leaf).node))
    return _ACCUMULATE_GRAD[0]
