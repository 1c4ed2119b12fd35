"""The block walk: the one loop over a plan's blocks, in each direction.

- :func:`forward`: blocks in order, with or without recording (the Function's forward
  runs it under no grad; ``sequential_sequence``, ``coupling`` and
  ``nn.SequentialSequence`` run it with autograd recording), optionally keeping each
  block's input (drift, ``revfunc.testing``) and the ``boundaries`` states.
- :func:`inverse`: blocks in reverse, rebuilding each block's input from its output.
- :func:`backward`: blocks in reverse, rebuilding each input and back-propagating
  through a recomputation of its branches (the memory-saving backward).
- :func:`gathered`: the one place where a block's parameters are gathered and released
  (its FSDP2 unit's call), for every walk that runs blocks forward.
- :func:`checked`: runs a reversible walk with its checks hoisted around it (version
  counters of the flat tensors and the global RNG once around the stack; the stream
  input per branch call), naming the offending block and branch on the error path.

Every branch is called through ``revfunc._branch``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, TypeVar

import torch

from revfunc import _checks, _layer
from revfunc._branch import Watch, call, rebuild, rng_states, same_states, set_rng_states, update, vjp
from revfunc._plan import Overlay, Plan

T = TypeVar("T")


def forward(
    plan: Plan,
    x1: torch.Tensor,
    x2: Any,
    tensors: Sequence[torch.Tensor],
    watch: Watch = Watch.NONE,
    inputs: Optional[list] = None,
    saving: bool = False,
):
    """The stack's forward: ``x1 <- c_f(x1, f_i(x2)); x2 <- c_g(x2, g_i(x1))`` for each block
    (``x + h`` when additive; residual plans: ``x1 <- x1 + f_i(x1); x1 <- x1 + g_i(x1)``,
    ``x2`` is ``None``).

    Returns ``(y1, y2, kept, logdet)``: ``kept`` alternates x1, x2 of each
    ``plan.boundaries`` state; ``logdet`` the stack's log-determinant when
    ``plan.logdet`` (else ``None``). ``inputs``: a list to append each block's input ``(x1, x2)`` to. When
    ``watch`` is set, the first branch sees a copy of the caller's tensor, so a branch
    that writes its input is caught before it can reach the caller's data.
    """
    kept: List[torch.Tensor] = []
    boundaries = plan.boundaries
    logdet = None
    if watch and not plan.residual:
        x2 = x2.clone()
    for i in range(len(plan.blocks)):
        if inputs is not None:
            inputs.append((x1, x2))
        if plan.residual:
            x1 = x1 + call(plan, i, 0, x1, tensors, watch)
            x1 = x1 + call(plan, i, 1, x1, tensors, watch)
            continue
        x1, x2, term = gathered(plan, i, tensors, block_forward, x1, x2, watch, saving)
        if term is not None:
            logdet = term if logdet is None else logdet + term
        if i + 1 in boundaries:
            kept += (x1, x2)
    if plan.logdet and logdet is None:
        logdet = zero_logdet(plan, x1)
    return x1, x2, kept, logdet


def zero_logdet(plan: Plan, x1: torch.Tensor) -> torch.Tensor:
    """The log-det of a volume-preserving stack: zeros shaped ``x1.shape[:-event_dim]``."""
    return x1.new_zeros(x1.shape[: x1.dim() - plan.event_dim])


def block_forward(plan: Plan, i: int, tensors, x1: torch.Tensor, x2: torch.Tensor, watch: Watch, saving: bool):
    """Block ``i``: ``y1 = c_f(x1, f(x2)); y2 = c_g(x2, g(y1))`` (``x + h`` when additive),
    or an invertible layer's forward (:func:`revfunc._layer.forward`).
    Returns ``(y1, y2, logdet term or None)``."""
    if plan.layer(i) is not None:
        return _layer.forward(plan, i, tensors, x1, x2, watch)
    if plan.couplings is None:
        x1 = x1 + call(plan, i, 0, x2, tensors, watch, saving)
        return x1, x2 + call(plan, i, 1, x1, tensors, watch, saving), None
    x1, term_f = update(plan, i, 0, x1, call(plan, i, 0, x2, tensors, watch, saving))
    x2, term_g = update(plan, i, 1, x2, call(plan, i, 1, x1, tensors, watch, saving))
    if term_f is None or term_g is None:
        return x1, x2, term_g if term_f is None else term_f
    return x1, x2, term_f + term_g


def gathered(plan: Plan, i: int, tensors, step: Callable, x1: torch.Tensor, x2: torch.Tensor, *args):
    """``step(plan, i, tensors, x1, x2, *args)``, block ``i``'s forward, with the block's
    parameters gathered: the one place where the walk gathers and releases them.

    A block with a unit (``plan.units[i]``, an FSDP2 module) runs inside the unit's own
    call, so that its hooks do what they do around any module: all-gather the block's
    parameters before, free them after (``reshard_after_forward``), and hook the
    block's backward (all-gather again before its recomputation; reduce-scatter its
    gradients and free them once they are in). ``step`` then reads the block's
    parameters as the unit holds them inside its call (:class:`revfunc._plan.Overlay`),
    and the next block's all-gather is started first (``unshard(async_op=True)``, a
    prefetch). Blocks without a unit run ``step`` directly on the flat ``tensors``.
    """
    units = plan.units
    if units is None or units[i] is None:
        return step(plan, i, tensors, x1, x2, *args)
    return units[i](Gathered(step, plan, i, tensors, args), x1, x2)


class Gathered:
    """Block ``i``'s forward as its unit runs it: ``unit(Gathered(...), x1, x2)`` calls
    ``self(live, x1, x2)`` from inside the unit's ``forward`` (see
    :class:`revfunc.nn.ReversibleBlock`), with ``live`` the ``(f_params, g_params)`` it
    holds there."""

    __slots__ = ("step", "plan", "index", "tensors", "args")

    def __init__(self, step: Callable, plan: Plan, index: int, tensors, args: tuple) -> None:
        self.step, self.plan, self.index, self.tensors, self.args = step, plan, index, tensors, args

    def __call__(self, live, x1: torch.Tensor, x2: torch.Tensor):
        plan, i, units = self.plan, self.index, self.plan.units or ()
        if i + 1 < len(units) and units[i + 1] is not None:
            units[i + 1].unshard(async_op=True)  # prefetch: the unit's pre-forward waits for it
        view = Overlay(self.tensors, plan.binds[i], live)
        return self.step(plan, i, view, x1, x2, *self.args)


def inverse(
    plan: Plan,
    y1: torch.Tensor,
    y2: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    watch: Watch = Watch.NONE,
    boundary_states=None,
) -> Iterator[Tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(i, x1, x2)``, block ``i``'s input rebuilt from its output, from the last
    block down: ``x2 = c_g^-1(y2, g_i(y1)); x1 = c_f^-1(y1, f_i(x2))`` (``y - h`` when
    additive). ``boundary_states``: ``{j: (x1, x2)}``
    true states to restart from at ``j`` (``boundaries``), as the backward does.
    With ``watch``, the last ``g`` sees a copy of the caller's ``y1``."""
    if watch:
        y1 = y1.clone()
    for i in range(len(plan.blocks) - 1, -1, -1):
        if boundary_states and i + 1 in boundary_states:
            y1, y2 = boundary_states[i + 1]
        if plan.layer(i) is not None:
            y1, y2 = _layer.inverse(plan, i, y1, y2, tensors, watch)
        else:
            y2 = rebuild(plan, i, 1, y2, call(plan, i, 1, y1, tensors, watch))
            y1 = rebuild(plan, i, 0, y1, call(plan, i, 0, y2, tensors, watch))
        yield i, y1, y2


def checked(plan: Plan, tensors: Sequence[torch.Tensor], device: torch.device, run: Callable[[Watch], T]) -> T:
    """``run(watch)``, a reversible walk, with what the recomputation cannot replay refused.

    The stream input is checked around each branch call (``Watch.INPUT``); the flat
    tensors' version counters and (``plan.rng_check``) the global RNG once around the
    whole walk. A failure names the block and branch: the first user of a modified
    tensor, and for the RNG the branch found by replaying the walk from the saved RNG
    state with per-branch checks (error path only). Inside ``torch.compile`` and
    inference mode there are no version counters to read: nothing is checked.
    """
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return run(Watch.NONE)
    versions = [t._version for t in tensors]
    rng_before = rng_states(device) if plan.rng_check else None
    out = run(Watch.INPUT)
    for j, (t, version) in enumerate(zip(tensors, versions)):
        if t._version != version:
            i, branch, fn, label = plan.first_user(j)
            raise _checks.mutation_error(plan.where, i, branch, fn, label)
    if rng_before is not None and not same_states(rng_before, rng_states(device)):
        set_rng_states(device, rng_before)
        run(Watch.RNG)  # raises naming the branch
        raise _checks.rng_error(plan.where, None, None)  # the replay did not repeat the draw: name no branch
    return out


def reversible_forward(plan: Plan, x1: torch.Tensor, x2: torch.Tensor, tensors) -> Tuple[torch.Tensor, ...]:
    """The memory-saving forward (the Function's, and :func:`revfunc.reversible_vjp`'s):
    ``(y1, y2, *kept)``, and the log-det last when ``plan.logdet``; nothing recorded, its
    checks hoisted around the walk."""
    y1, y2, kept, logdet = checked(
        plan, tensors, x1.device, lambda watch: forward(plan, x1, x2, tensors, watch, saving=True)
    )
    return (y1, y2, *kept) if logdet is None else (y1, y2, *kept, logdet)


def rebuilt_inputs(
    plan: Plan, x1, x2, tensors
) -> List[Tuple[int, Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]:
    """``[(i, (x1', x2'), (x1, x2))]`` from the last block down: block i's input as the
    memory-saving backward rebuilds it, and as a plain forward computed it (no grad).
    At ``plan.boundaries`` states the rebuild restarts from the true stream, as in backward."""

    inputs: list = []

    def recorded(watch):
        inputs.clear()  # a replay (the RNG check's error path) records afresh
        return forward(plan, x1, x2, tensors, watch, inputs)

    with torch.no_grad():
        # Checked one direction at a time: a stateful branch is refused after the
        # forward has updated it once, as one plain forward would.
        y1, y2, _, _ = checked(plan, tensors, x1.device, recorded)
        boundary_states = {j: inputs[j] for j in plan.boundaries}
        rebuilt = checked(
            plan, tensors, x1.device, lambda watch: list(inverse(plan, y1, y2, tensors, watch, boundary_states))
        )
    return [(i, (r1, r2), inputs[i]) for i, r1, r2 in rebuilt]


def backward_mode() -> str:
    """How a backward step differentiates here: ``"eager"`` (no graph to record, no
    functorch level: the autograd engine directly), ``"graph"`` (``create_graph=True``:
    the same, recording) or ``"func"`` (a functorch level or ``torch.compile``:
    ``torch.func.vjp``, which every transform and Dynamo can trace)."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return "func"
    return "graph" if torch.is_grad_enabled() else "eager"


def block_backward(
    plan: Plan,
    i: int,
    state: list,
    tensors,
    needs,
    mode: str,
    captures: bool = True,
    boundary_input=None,
    rebuild: bool = True,
    dlogdet=None,
):
    """One block of the backward walk: from block ``i``'s output and its cotangents, rebuild
    its input, recompute both branches and back-propagate through them.

    Args:
        state: ``[y1, y2, dy1, dy2]``, emptied here (so no caller frame keeps a dead
            tensor alive); ``None`` cotangents count as zero.
        boundary_input: block ``i``'s input ``(x1, x2)`` kept exactly (``boundaries``), or
            ``None`` to rebuild it.
        rebuild: whether the input is needed at all (``False`` for block 0).
        dlogdet: the cotangent of the stack's log-determinant, or ``None``.

    Returns:
        ``(x1, x2, dx1, dx2, grads)``: the input (``None`` when not rebuilt), its
        cotangents, and ``{flat slot: gradient}`` of the block's tensors.

    Memory: besides one branch's recomputation, four stream tensors are alive (the two
    halves and their cotangents): each value is released as soon as it is dead.
    """
    if plan.layer(i) is not None:
        return _layer.backward(plan, i, state, tensors, needs, mode, captures, boundary_input, rebuild, dlogdet)
    dy2, dy1, y2, y1 = state.pop(), state.pop(), state.pop(), state.pop()
    dy1 = torch.zeros_like(y1) if dy1 is None else dy1
    dy2 = torch.zeros_like(y2) if dy2 is None else dy2
    exact1, exact2 = (None, None) if boundary_input is None else boundary_input
    # A non-additive update's vjp needs its half rebuilt (the coupling's own vjp), even
    # where the half is kept exactly or not needed further.
    if plan.couplings is None:
        coupled_f = coupled_g = False
    else:
        coupled_f, coupled_g = (c is not None for c in plan.couplings[i])
    # g at y1 rebuilds x2 = c_g^-1(y2, g(y1)); y2 is dead once x2 exists.
    # (The partner goes in a one-item list that the callee empties: no frame keeps it.)
    box, y2 = ([y2] if boundary_input is None or coupled_g else None), None
    x2, grads, dy1_g, dx2 = vjp(plan, i, 1, tensors, needs, y1, dy2, mode, box, captures, exact2, dlogdet)
    if exact2 is not None:
        x2 = exact2
    dx2 = dy2 if dx2 is None else dx2  # additive: the cotangent passes through
    a1 = dy1 + dy1_g
    dy1 = dy1_g = dy2 = None
    # f at x2 rebuilds x1 = c_f^-1(y1, f(x2)) (when needed); y1 is then dead.
    box, y1 = ([y1] if (rebuild and boundary_input is None) or coupled_f else None), None
    x1, f_grads, dx2_f, dx1 = vjp(plan, i, 0, tensors, needs, x2, a1, mode, box, captures, exact1, dlogdet)
    if exact1 is not None:
        x1 = exact1
    dx1 = a1 if dx1 is None else dx1
    dx2 = dx2 + dx2_f
    a1 = dx2_f = None
    for j, v in f_grads.items():
        grads[j] = v if j not in grads else grads[j] + v
    if not rebuild:
        x1 = x2 = None
    return x1, x2, dx1, dx2, grads


def backward(
    plan: Plan,
    dy1,
    dy2,
    saved: List[Optional[torch.Tensor]],
    needs: Sequence[bool],
    captures: bool = True,
    dlogdet=None,
):
    """Walk the blocks in reverse (:func:`block_backward` each), summing the gradients.

    Args:
        dy1, dy2: cotangents of the final outputs (``None`` counts as zero).
        saved: ``[y1, y2, *kept, *tensors]`` as saved in ``setup_context``. A list:
            the walk drops its references to ``y1``/``y2`` (sets them to ``None``), so a
            caller that holds no other reference frees them after the last block.
        needs: ``needs_input_grad`` of the flat tensors.
        captures: refuse a branch whose recomputation reaches a tensor that requires
            grad but was not passed to it (its gradient would be lost). Off under
            ``torch.func`` transforms, where closed-over tensors are constants.
        dlogdet: the cotangent of the stack's log-determinant (``plan.logdet``), or ``None``.

    Returns:
        ``(dx1, dx2, grads)`` with ``grads[j]`` the gradient of flat tensor ``j`` (or None).
    """
    state = [saved[0], saved[1], dy1, dy2]
    saved[0] = saved[1] = dy1 = dy2 = None
    nk = 2 * len(plan.boundaries)
    kept = saved[2 : 2 + nk]
    tensors = saved[2 + nk :]
    boundary_states = {j: (kept[2 * m], kept[2 * m + 1]) for m, j in enumerate(plan.boundaries)}
    grads: List[Optional[torch.Tensor]] = [None] * len(tensors)
    mode = backward_mode()
    for i in range(len(plan.blocks) - 1, -1, -1):
        if i + 1 in boundary_states:
            state[:2] = boundary_states[i + 1]
        x1, x2, dx1, dx2, block_grads = block_backward(
            plan, i, state, tensors, needs, mode, captures, boundary_states.get(i), rebuild=i > 0, dlogdet=dlogdet
        )
        state += (x1, x2, dx1, dx2)
        x1 = x2 = dx1 = dx2 = None
        for j, v in block_grads.items():
            grads[j] = v if grads[j] is None else grads[j] + v
        block_grads = None
    return state[2], state[3], grads
