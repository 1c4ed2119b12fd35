"""revfunc.testing: the assertions catch real defects, and revfunc passes them."""

import itertools

import pytest
import torch
from helpers import inputs, make_pure_stack
from hypothesis import given

from revfunc.testing import assert_gradients_match, assert_invertible
from revfunc.testing import strategies as rst


@given(rst.stacks(kind="mlp"))
def test_mlp_stacks_are_invertible_and_their_gradients_match(stack):
    assert_invertible(stack.blocks, stack.params, stack.x1, stack.x2, kwargs=stack.kwargs)
    assert_gradients_match(stack.blocks, stack.params, stack.x1, stack.x2, kwargs=stack.kwargs)


@given(rst.stacks(kind="attention", max_depth=4))
def test_attention_stacks_are_invertible_and_their_gradients_match(stack):
    assert_invertible(stack.blocks, stack.params, stack.x1, stack.x2)
    assert_gradients_match(stack.blocks, stack.params, stack.x1, stack.x2)


def test_impure_block_fails_assert_invertible_naming_the_block():
    blocks, params = make_pure_stack(3)
    calls = itertools.count()

    def counting(p, x):  # output depends on how often it was called: not a pure function
        return torch.tanh(x @ p["w"] + p["b"]) * (1 + next(calls))

    blocks = [blocks[0], (blocks[1][0], counting), blocks[2]]
    x1, x2 = inputs((2, 5), requires_grad=False)
    with pytest.raises(
        AssertionError,
        match=r"block 1's input x2 rebuilt from its output differs from the forward's: "
        r"max abs error .*, max rel error .* > tolerance rtol=1e-07, atol=1e-09",
    ):
        assert_invertible(blocks, params, x1, x2)


class _WrongBackward(torch.autograd.Function):
    """tanh whose backward is off by a factor 1.5: sequential and reversible agree on it."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y**2) * 1.5


def test_wrong_custom_backward_fails_assert_gradients_match():
    blocks, params = make_pure_stack(2)

    def wrong(p, x):
        return _WrongBackward.apply(x @ p["w"] + p["b"])

    x1, x2 = inputs((2, 5), requires_grad=False)
    assert_invertible([(wrong, wrong)] * 2, params, x1, x2)  # the forward is fine
    with pytest.raises(
        AssertionError,
        match=r"block 0 branch f: its gradient w.r.t. \(input x, params\) along a random "
        r"direction .* differs from float64 finite differences.*tolerance 1e-05",
    ):
        assert_gradients_match([(wrong, wrong)] * 2, params, x1, x2)


def test_non_finite_output_is_reported():
    blocks, params = make_pure_stack(2)

    def blow_up(p, x):
        return x * float("inf")

    x1, x2 = inputs((2, 5), requires_grad=False)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_invertible([(blow_up, blow_up)] * 2, params, x1, x2)


def test_grad_mode_dependent_block_fails_the_finite_difference_check():
    """The memory-saving forward runs a branch in the caller's grad mode, as its
    recomputation and plain autograd do, so a block whose output depends on grad mode now
    gives plain autograd's gradients; the float64 finite differences (taken under no grad)
    still see another function, and the check names the branch."""
    blocks, params = make_pure_stack(2)

    def moody(p, x):  # computes something else when not recorded
        return torch.tanh(x @ p["w"] + p["b"]) * (2.0 if torch.is_grad_enabled() else 1.0)

    blocks = [(moody, blocks[0][1]), blocks[1]]
    x1, x2 = inputs((2, 5), requires_grad=False)
    with pytest.raises(
        AssertionError,
        match=r"assert_gradients_match: block 0 branch f: its gradient w.r.t. "
        r"\(input x, params\) along a random direction .* differs from float64 "
        r"finite differences .* > tolerance 1e-05",
    ):
        assert_gradients_match(blocks, params, x1, x2)


def test_a_wrong_custom_backward_is_named_by_block_branch_and_tensor():
    from revfunc.testing import assert_gradients_match

    gen = torch.Generator().manual_seed(0)
    d = 4

    def good(p, x):
        return torch.tanh(x @ p["w"])

    def bad(p, x):
        return _WrongBackward.apply(x @ p["w"])

    params = [
        (
            {"w": torch.randn(d, d, generator=gen, dtype=torch.float64) / 2},
            {"w": torch.randn(d, d, generator=gen, dtype=torch.float64) / 2},
        )
        for _ in range(3)
    ]
    blocks = [(good, good), (good, bad), (good, good)]
    x1, x2 = (torch.randn(2, d, generator=gen, dtype=torch.float64) for _ in range(2))
    with pytest.raises(
        AssertionError,
        match=r"assert_gradients_match: block 1 branch g: its gradient w.r.t. "
        r"\(input x, params\) .* differs from float64 finite differences.*"
        r"largest term from tensor '(x|w)'",
    ):
        assert_gradients_match(blocks, params, x1, x2)
