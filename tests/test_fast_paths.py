"""The host-overhead fast paths are taken when they should be, and never give a wrong gradient.

- ``revfunc.nn.ReversibleSequence`` forks no RNG state when no dropout-like submodule is
  active (none, p == 0, or eval mode), and does when one is; a random op it cannot see
  (``torch.rand`` in a custom forward) is caught, naming the block.
- Eager calls use the variadic Function; compiled ones the fixed-arity classes.
- The in-place and RNG checks hoisted out of the per-branch path still name the branch.
"""

import pytest
import torch
from helpers import assert_all_close
from torch import nn

import revfunc
import revfunc.nn as rnn
import revfunc.random
from revfunc._function import ReversibleSequenceFunction, function_for
from revfunc.testing.blocks import mlp_layers, transformer_layers

RTOL = 1e-10


@pytest.fixture
def forks(monkeypatch):
    """Counts RNG forks (revfunc.random._forked, used per branch call with a seed)."""
    calls = []
    real = revfunc.random._forked

    def counting(seed, device):
        calls.append(seed)
        return real(seed, device)

    monkeypatch.setattr(revfunc.random, "_forked", counting)
    return calls


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


def _reference_grads(model, x):
    """Plain autograd on the same modules (revfunc.nn.SequentialSequence semantics of (x, x))."""
    y1 = y2 = x
    for block in model.blocks:
        y1 = y1 + block.f.net(y2)
        y2 = y2 + block.g.net(y1)
    return torch.autograd.grad((y1 + y2).pow(2).sum(), list(model.parameters()))


def test_no_dropout_in_training_forks_nothing_and_is_exact(forks):
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(transformer_layers(3, 8, heads=2).double())
    assert model.training
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    state = torch.get_rng_state()
    got = _grads(model, x)
    assert forks == [] and torch.equal(torch.get_rng_state(), state)  # fast path: no seed, no fork
    assert_all_close(got, _reference_grads(model, x), rtol=RTOL)


def test_active_dropout_forks_and_replays(forks):
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2, dropout=0.3).double())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    model(x).sum().backward()
    assert len(forks) == 2 * 2 * 2  # every branch, forward and backward recomputation
    forks.clear()
    model.eval()  # eval mode: dropout inactive, fast path again
    model(x).sum().backward()
    assert forks == []


def test_dropout_p_set_to_zero_later_takes_the_fast_path(forks):
    model = rnn.ReversibleSequence(transformer_layers(1, 8, heads=2, dropout=0.3))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
    model(torch.randn(1, 3, 8)).sum().backward()
    assert forks == []


class Noisy(nn.Module):
    """Random numbers from a custom op: no dropout-like attribute for the adapter to see."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.randn_like(x)


def test_a_random_op_the_adapter_cannot_see_is_caught_naming_the_block():
    layers = mlp_layers(2, 4)
    layers[1][1] = Noisy()
    model = rnn.ReversibleSequence(layers)
    with pytest.raises(RuntimeError, match=r"block 1 branch g drew random numbers from the global RNG"):
        model(torch.randn(3, 4))


def test_with_a_generator_the_same_random_op_is_replayed_exactly():
    torch.manual_seed(0)
    layers = mlp_layers(2, 4).double()
    layers[1][1] = Noisy().double()
    model = rnn.ReversibleSequence(layers)
    x = torch.randn(3, 4, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    model(x, generator=torch.Generator().manual_seed(5)).pow(2).sum().backward()
    got = [p.grad for p in model.parameters()]
    blocks, params = revfunc.pure_blocks(layers)  # plain autograd, the same child seeds
    y1, y2 = revfunc.sequential_sequence(blocks, params, x, x, generator=torch.Generator().manual_seed(5))
    want = torch.autograd.grad((y1 + y2).pow(2).sum(), list(model.parameters()))
    assert_all_close(got, want, rtol=RTOL)


def test_eager_calls_use_the_variadic_function_and_compiled_ones_a_fixed_arity_class():
    assert function_for(7) is ReversibleSequenceFunction

    seen = []

    @torch.compile(backend="eager", fullgraph=True)
    def pick(x):
        seen.append(function_for(3).__name__)
        return x + 1

    torch._dynamo.reset()
    pick(torch.ones(1))
    assert seen == ["ReversibleSequenceFunction3"]


def test_hoisted_checks_name_the_branch_that_modified_a_parameter():
    blocks, params = revfunc.pure_blocks(mlp_layers(3, 4))

    def bumps(p, x):
        p["0.bias"].add_(0.0)  # any in-place update of a parameter
        return x

    blocks[2] = (blocks[2][0], bumps)
    with pytest.raises(ValueError, match=r"block 2 branch g modified parameter/buffer '0.bias'"):
        with torch.no_grad():
            revfunc.reversible_sequence(blocks, params, torch.randn(2, 4), torch.randn(2, 4))


def test_a_registration_elsewhere_neither_walks_nor_rebuilds_the_pure_views(monkeypatch):
    from revfunc.functional import PureModule

    model = rnn.ReversibleSequence(mlp_layers(2, 4))
    x = torch.randn(3, 4)
    model(x).sum().backward()
    views = [block._pure for block in model.blocks]
    walks = []
    real = PureModule._current_layout
    monkeypatch.setattr(PureModule, "_current_layout", lambda self: walks.append(self) or real(self))
    nn.Module().register_buffer("b", torch.zeros(1))  # any registration anywhere bumps the global count
    model(x).sum().backward()
    assert walks == [] and all(block._pure is view for block, view in zip(model.blocks, views))
    model.blocks[1].g.net[0].register_buffer("extra", torch.zeros(1))  # inside a branch: rechecked, rebuilt
    model(x).sum().backward()
    assert walks and model.blocks[1]._pure is not views[1] and model.blocks[0]._pure is views[0]
