"""Inside other code: the autograd contexts users wrap around a model (saved-tensor hooks,
``save_on_cpu``, ``torch.utils.checkpoint`` around the model or inside a branch) give plain
autograd's gradients on every eager path, and the branch edge cases that used to lose a
gradient silently give plain autograd's result or a clear error.

Every cell compares the gradients of ``x`` and of every parameter, taken with
``.backward()`` (a reentrant checkpoint refuses ``torch.autograd.grad``), with those of the
same blocks in plain autograd, float64, rtol 1e-10. Each case runs in a fresh stack (new
modules, new branch functions), so that no earlier call can hide a failure.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_all_close
from torch import nn
from torch.utils.checkpoint import checkpoint

import revfunc
import revfunc.nn as rnn
from revfunc.couplings import scaled
from revfunc.selective import save_attention
from revfunc.testing.blocks import transformer_layers

RTOL, ATOL = 1e-10, 1e-12
DIM, DEPTH = 8, 3


class Checkpointed(nn.Module):
    """A branch that runs its module under ``torch.utils.checkpoint`` itself."""

    def __init__(self, net: nn.Module, reentrant: bool):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        return checkpoint(self.net, x, use_reentrant=self.reentrant)


def _layers(inner=None):
    """Attention + feed-forward blocks (float64); ``inner``: wrap each branch in a checkpoint."""
    torch.manual_seed(0)
    layers = transformer_layers(DEPTH, DIM, heads=2).double()
    if inner is not None:
        layers = nn.ModuleList(nn.ModuleList([Checkpointed(f, inner), Checkpointed(g, inner)]) for f, g in layers)
    return layers


def _x():
    return torch.randn(2, 5, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()


def _clone_hooks():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t.clone())


def _identity_hooks():
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


# Each context: (name, how to run ``model(x)`` inside it, how a branch is wrapped).
CONTEXTS = {
    "none": (lambda run, x: run(x), None),
    "identity_hooks": (lambda run, x: _within(_identity_hooks, run, x), None),
    "clone_hooks": (lambda run, x: _within(_clone_hooks, run, x), None),
    "save_on_cpu": (lambda run, x: _within(torch.autograd.graph.save_on_cpu, run, x), None),
    "checkpoint_around": (lambda run, x: checkpoint(run, x, use_reentrant=False), None),
    "checkpoint_around_reentrant": (lambda run, x: checkpoint(run, x, use_reentrant=True), None),
    "checkpoint_inside": (lambda run, x: run(x), False),
    "checkpoint_inside_reentrant": (lambda run, x: run(x), True),
}


def _within(context, run, x):
    with context():
        return run(x)


def _adapter(layers):
    model = rnn.ReversibleSequence(layers)
    return model, list(layers.parameters())


def _functional(layers, live=True, **options):
    blocks, params = revfunc.pure_blocks(layers)
    if not live:  # detached leaves of their own, as a torch.func user holds them
        params = [
            tuple({k: v.detach().clone().requires_grad_() for k, v in p.items()} for p in pair) for pair in params
        ]

    def run(x):
        y1, y2 = revfunc.reversible_sequence(blocks, params, x, x, **options)
        return y1 + y2

    return run, [t for pair in params for p in pair for t in p.values()]


# Each path: a function of the layers returning ``(run, leaves)``.
PATHS = {
    "nn.ReversibleSequence": _adapter,
    "reversible_sequence_live": _functional,
    "reversible_sequence_detached": functools.partial(_functional, live=False),
    "checkpoint_every": functools.partial(_functional, checkpoint_every=2),
    "context_fn": functools.partial(_functional, context_fn=save_attention),
    "coupling_scaled": functools.partial(_functional, coupling=scaled(0.7)),
}

# The update each path's blocks make, for the reference (additive unless named here).
UPDATES = {"coupling_scaled": lambda x, h: 0.7 * x + h}


def _add(x, h):
    return x + h


def _reference(branches, x, leaves, update=_add):
    """The same blocks in plain autograd: ``x1 <- update(x1, f(x2)); x2 <- update(x2, g(x1))``
    from ``(x, x)``; ``branches``: ``(f, g)`` callables, ``leaves``: the tensors to
    differentiate besides ``x``."""
    x1 = x2 = x
    for f, g in branches:
        x1 = update(x1, f(x2))
        x2 = update(x2, g(x1))
    leaves = [x, *leaves]
    for t in leaves:
        t.grad = None
    ((x1 + x2) ** 2).sum().backward()  # not autograd.grad: a reentrant checkpoint refuses it
    return [t.grad for t in leaves]


def _with_params(layers, leaves):
    """``(f, g)`` callables: ``layers`` run with ``leaves`` (in ``pure_blocks`` order) as their tensors."""
    it = iter(leaves)
    branches = []
    for f, g in layers:
        pair = []
        for m in (f, g):
            values = {name: next(it) for name in revfunc.pure(m)[1]}
            pair.append(functools.partial(lambda m, values, x: torch.func.functional_call(m, values, (x,)), m, values))
        branches.append(tuple(pair))
    return branches


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("context", CONTEXTS)
def test_gradients_inside_ambient_contexts_equal_plain_autograd(context, path):
    if context == "checkpoint_inside_reentrant" and path == "reversible_sequence_detached":
        pytest.skip(
            "does not apply: a reentrant checkpoint recomputes its module in backward, outside "
            "functional_call's swap, so it differentiates the module's own parameters, not the "
            "detached copies; plain autograd gives those copies no gradient either"
        )
    around, inner = CONTEXTS[context]
    layers = _layers(inner)
    run, leaves = PATHS[path](layers)
    x = _x()
    (around(run, x) ** 2).sum().backward()
    got = [x.grad, *(t.grad.clone() for t in leaves)]
    # The reference differentiates the same tensors: the live parameters, or the detached
    # copies the path was given, through the modules' own forward.
    branches = _with_params(layers, leaves) if path == "reversible_sequence_detached" else list(layers)
    want = _reference(branches, x.detach().requires_grad_(), leaves, UPDATES.get(path, _add))
    assert_all_close(got, want, rtol=RTOL, atol=ATOL)


def test_the_detached_reference_really_uses_the_detached_leaves():
    layers = _layers()
    _, leaves = _functional(layers, live=False)
    with torch.no_grad():
        for t in leaves:
            t.mul_(1.1)
    x = _x()
    direct = _reference(list(layers), x, list(layers.parameters()))
    swapped = _reference(_with_params(layers, leaves), x, leaves)
    assert not torch.allclose(direct[0], swapped[0])


# --- the branch edge cases that used to lose a gradient silently ----------------------


def _plain_and_reversible(make_layers, x_seed=1):
    """``(plain, revfunc)``: output and gradients (x, then every parameter) of the same
    freshly built layers, in plain autograd and through ``revfunc.nn.ReversibleSequence``."""
    results = []
    for run in ("plain", "revfunc"):
        layers = make_layers()
        x = _x()
        if run == "plain":
            x1 = x2 = x
            for f, g in layers:
                x1 = x1 + f(x2)
                x2 = x2 + g(x1)
            y = x1 + x2
        else:
            y = rnn.ReversibleSequence(layers)(x)
        leaves = [x, *layers.parameters()]
        grads = torch.autograd.grad((y**2).sum(), leaves, allow_unused=True)
        results.append((y.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]))
    return results


class GradModeDependent(nn.Module):
    """A branch whose output depends on ``torch.is_grad_enabled()`` (as fast paths do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM).double()

    def forward(self, x):
        scale = 1.0 if torch.is_grad_enabled() else 0.5
        return torch.tanh(self.lin(x)) * scale


class CachesDerivedWeight(nn.Module):
    """Caches a tensor derived from its parameter on its first call (then reuses it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM).double()
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = self.lin.weight * 2
        return torch.tanh(x @ self.cache.T + self.lin.bias)


def _pairs(make_branch):
    torch.manual_seed(0)
    return nn.ModuleList(nn.ModuleList([make_branch(), make_branch()]) for _ in range(2))


@pytest.mark.parametrize("branch", [GradModeDependent, CachesDerivedWeight])
def test_a_branch_sees_plain_autograds_grad_mode_and_keeps_its_cache_graph(branch):
    (y_plain, g_plain), (y_rev, g_rev) = _plain_and_reversible(lambda: _pairs(branch))
    assert_all_close([y_rev], [y_plain], rtol=RTOL, atol=ATOL)
    assert_all_close(g_rev, g_plain, rtol=RTOL, atol=ATOL)
    assert all(g.abs().sum() > 0 for g in g_plain)  # every parameter gets a gradient


def test_a_branch_in_no_grad_sees_no_grad_as_in_plain_autograd():
    seen = []

    def f(p, x):
        seen.append(torch.is_grad_enabled())
        return torch.tanh(x @ p["w"])

    w = torch.eye(4, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, dtype=torch.float64)
    with torch.no_grad():
        revfunc.reversible_sequence([(f, f)], [({"w": w}, {"w": w})], x, x)
    assert seen == [False, False]
    seen.clear()
    y1, y2 = revfunc.reversible_sequence([(f, f)], [({"w": w}, {"w": w})], x, x)
    (y1.sum() + y2.sum()).backward()
    assert seen == [True] * 4  # forward and recomputation alike


def test_a_closure_captured_tensor_reached_on_a_later_call_is_refused_then():
    captured = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.eye(4, dtype=torch.float64, requires_grad=True)

    def f(p, x):
        out = x @ p["w"]
        return out + x @ captured if x.sum() > 0 else out  # reaches `captured` for some inputs only

    def g(p, x):
        return torch.tanh(x @ p["w"])

    blocks, params = [(f, g)], [({"w": w}, {"w": w})]
    negative = -torch.ones(2, 4, dtype=torch.float64)
    y1, y2 = revfunc.reversible_sequence(blocks, params, negative, negative)
    (y1.sum() + y2.sum()).backward()  # nothing captured is reached: fine
    positive = torch.ones(2, 4, dtype=torch.float64)
    y1, y2 = revfunc.reversible_sequence(blocks, params, positive, positive)
    with pytest.raises(
        RuntimeError,
        match=r"block 0 branch f .* uses a tensor that requires grad but was not "
        r"passed to it \(shape \(4, 4\), dtype torch.float64\)",
    ):
        (y1.sum() + y2.sum()).backward()


def test_a_closure_captured_tensor_that_starts_requiring_grad_is_refused_then():
    captured = torch.randn(4, 4, dtype=torch.float64)
    w = torch.eye(4, dtype=torch.float64, requires_grad=True)

    def f(p, x):
        return torch.tanh(x @ p["w"] + x @ captured)

    blocks, params = [(f, f)], [({"w": w}, {"w": w})]
    x = torch.randn(2, 4, dtype=torch.float64)
    y1, y2 = revfunc.reversible_sequence(blocks, params, x, x)
    (y1.sum() + y2.sum()).backward()  # a constant: fine
    captured.requires_grad_()
    y1, y2 = revfunc.reversible_sequence(blocks, params, x, x)
    with pytest.raises(RuntimeError, match=r"block 0 branch g .* uses a tensor that requires grad but was not"):
        (y1.sum() + y2.sum()).backward()


class StoresAuxLoss(nn.Module):
    """Keeps an auxiliary loss computed from its input on the module (as MoE routers do)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM).double()
        self.aux = None

    def forward(self, x):
        out = torch.tanh(self.lin(x))
        self.aux = out.pow(2).mean()
        return out


def test_a_branch_keeping_a_tensor_computed_from_its_input_is_warned_about_once():
    import warnings

    model = rnn.ReversibleSequence(_pairs(StoresAuxLoss))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(_x()).sum().backward()
        model(_x()).sum().backward()  # once per branch
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4, messages
    for (i, branch), text in zip([(0, "f"), (0, "g"), (1, "f"), (1, "g")], messages):
        assert text.startswith(
            f"revfunc.nn.ReversibleSequence: block {i} branch {branch} (PureModule(StoresAuxLoss)) "
            "kept a tensor computed from its input beyond its forward call"
        ), text
        assert text.endswith("or use revfunc.nn.SequentialSequence. (Warned once per branch.)"), text
