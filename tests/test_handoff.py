"""Gradients leave the walk block by block: each block's parameter gradients reach their
accumulators (and hooks) right after its backward, before the block below is recomputed,
exactly once, and equal plain autograd's. (Memory: tests/test_memory.py.)"""

import pytest
import torch
from helpers import assert_all_close
from torch import nn

import revfunc
import revfunc.nn as rnn
from revfunc.testing.blocks import transformer_layers

RTOL = 1e-10
DEPTH, DIM = 4, 8


def layers_and_input():
    torch.manual_seed(0)
    layers = transformer_layers(DEPTH, DIM, heads=2, causal=True).double()
    x = torch.randn(2, 6, DIM, dtype=torch.float64, requires_grad=True)
    return layers, x


def plain_loss(layers, x):
    x1 = x2 = x
    for f, g in layers:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    return (x1 + x2).pow(2).mean()


def block_of(layers):
    return {p: i for i, pair in enumerate(layers) for p in pair.parameters()}


def test_post_accumulate_grad_hooks_fire_once_with_plain_autograds_gradients():
    layers, x = layers_and_input()
    want = torch.autograd.grad(plain_loss(layers, x), [x, *layers.parameters()])
    calls = {p: 0 for p in layers.parameters()}

    def hook(p):
        calls[p] += 1

    for p in layers.parameters():
        p.register_post_accumulate_grad_hook(hook)
    rnn.ReversibleSequence(layers)(x).pow(2).mean().backward()
    assert set(calls.values()) == {1}
    assert_all_close([x.grad, *(p.grad for p in layers.parameters())], want, rtol=RTOL)


def test_tensor_hooks_fire_once_under_autograd_grad():
    layers, x = layers_and_input()
    params = list(layers.parameters())
    want = torch.autograd.grad(plain_loss(layers, x), params)
    calls = {p: 0 for p in params}
    for p in params:
        p.register_hook(lambda g, p=p: calls.__setitem__(p, calls[p] + 1))
    got = torch.autograd.grad(rnn.ReversibleSequence(layers)(x).pow(2).mean(), params)
    assert set(calls.values()) == {1}
    assert all(p.grad is None for p in params)  # autograd.grad writes no .grad
    assert_all_close(got, want, rtol=RTOL)


def test_a_blocks_gradients_arrive_before_the_block_below_is_recomputed():
    layers, x = layers_and_input()
    model = rnn.ReversibleSequence(layers)
    owner = block_of(layers)
    events = []
    for i, (f, g) in enumerate(layers):
        for module in (f, g):
            module.register_forward_pre_hook(lambda m, args, i=i: events.append(("run", i)))
    for p in layers.parameters():
        p.register_post_accumulate_grad_hook(lambda p: events.append(("grad", owner[p])))
    loss = model(x).pow(2).mean()
    events.clear()  # the forward's runs
    loss.backward()
    position = {}
    for n, event in enumerate(events):
        position.setdefault(event, n)
        if event[0] == "grad":
            position[event] = n  # the last gradient of the block
    for i in range(1, DEPTH):
        assert position["grad", i] < position["run", i - 1], events
    # and each block's gradients arrive after its own recomputation
    for i in range(DEPTH):
        assert position["run", i] < position["grad", i], events


def test_a_parameter_shared_by_two_blocks_accumulates_once_with_both_terms():
    torch.manual_seed(0)
    shared = nn.Linear(DIM, DIM).double()
    layers = nn.ModuleList(
        [
            nn.ModuleList([nn.Sequential(shared, nn.Tanh()), nn.Sequential(nn.Linear(DIM, DIM), nn.Tanh())])
            for _ in range(3)
        ]
    ).double()
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    want = torch.autograd.grad(plain_loss(layers, x), [x, *layers.parameters()])
    calls = []
    shared.weight.register_post_accumulate_grad_hook(lambda p: calls.append(1))
    rnn.ReversibleSequence(layers)(x).pow(2).mean().backward()
    assert len(calls) == 1
    assert_all_close([x.grad, *(p.grad for p in layers.parameters())], want, rtol=RTOL)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_functional_backward_with_boundaries_and_gradient_accumulation(checkpoint_every):
    layers, x = layers_and_input()
    blocks, params = revfunc.pure_blocks(layers)
    live = list(layers.parameters())

    def loss(seq, **options):
        y1, y2 = seq(blocks, params, x, x, **options)
        return (y1 * y2).sum()

    want = torch.autograd.grad(loss(revfunc.sequential_sequence) * 2, [x, *live])
    for _ in range(2):  # accumulation into existing .grad
        loss(revfunc.reversible_sequence, checkpoint_every=checkpoint_every).backward()
    assert_all_close([x.grad, *(p.grad for p in live)], want, rtol=RTOL)


def test_torch_func_paths_still_return_gradients_as_values():
    layers, x = layers_and_input()
    blocks, params = revfunc.pure_blocks(layers)
    detached = [tuple({k: v.detach() for k, v in d.items()} for d in pair) for pair in params]

    def loss(seq, p):
        y1, y2 = seq(blocks, p, x.detach(), x.detach())
        return (y1 * y2).sum()

    got = torch.func.grad(lambda p: loss(revfunc.reversible_sequence, p))(detached)
    want = torch.func.grad(lambda p: loss(revfunc.sequential_sequence, p))(detached)
    assert_all_close(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), rtol=RTOL)
    assert all(p.grad is None for p in layers.parameters())
