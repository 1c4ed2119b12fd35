"""Explicit randomness: seeds, fork-and-seed, dropout replay in backward."""

import pytest
import torch
from helpers import assert_all_close, flat_params, inputs, loss_of, make_pure_stack, make_stack

import revfunc
from revfunc.random import accepts_generator, derive_seed, draw_base_seed, dropout, fork_and_seed


def grads_with(fn, blocks, params, x1, x2, seed, **kw):
    gen = torch.Generator().manual_seed(seed)
    return torch.autograd.grad(
        loss_of(*fn(blocks, params, x1, x2, generator=gen, **kw)), [x1, x2, *flat_params(params)]
    )


def pure_dropout_branch(p, x, generator=None):
    return dropout(torch.tanh(x @ p["w"] + p["b"]), 0.4, generator)


def test_derive_seed_is_deterministic_distinct_and_63_bit():
    seeds = {derive_seed(b, i, br) for b in (0, 1, 2**63 - 1) for i in range(50) for br in (0, 1)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(7, 3, 1) == derive_seed(7, 3, 1)


def test_draw_base_seed_advances_its_generator_by_one_draw():
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    first = draw_base_seed(a)
    assert first == draw_base_seed(b)
    assert draw_base_seed(a) != first


def test_fork_and_seed_restores_the_global_state_even_on_error():
    before = torch.get_rng_state()
    with pytest.raises(KeyError):
        with fork_and_seed(3):
            torch.rand(4)
            raise KeyError
    assert torch.equal(before, torch.get_rng_state())


def test_accepts_generator_needs_an_explicit_keyword():
    assert accepts_generator(pure_dropout_branch)
    assert not accepts_generator(lambda p, x, **kwargs: x)
    assert not accepts_generator(torch.nn.Dropout(0.1).forward)


def test_dropout_matches_its_definition_and_is_identity_in_eval():
    x = torch.randn(1000, dtype=torch.float64)
    out = dropout(x, 0.25, torch.Generator().manual_seed(0))
    mask = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) < 0.75
    assert_all_close([out], [x * mask / 0.75])
    assert dropout(x, 0.25, None, training=False) is x
    with pytest.raises(ValueError, match=r"p expected a probability in \[0, 1\), got 1.0"):
        dropout(x, 1.0, None)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_stock_dropout_gradients_match_sequential_and_leave_global_rng_alone(mode):
    layers, blocks, params = make_stack(3, dropout=0.3)
    getattr(layers, mode)()
    x1, x2 = inputs((4, 6))
    before = torch.get_rng_state()
    got = grads_with(revfunc.reversible_sequence, blocks, params, x1, x2, seed=5)
    assert torch.equal(before, torch.get_rng_state())
    want = grads_with(revfunc.sequential_sequence, blocks, params, x1, x2, seed=5)
    assert_all_close(got, want, rtol=1e-10)


def test_pure_dropout_branch_gets_its_own_generator():
    blocks, params = make_pure_stack(3)
    blocks = [(pure_dropout_branch, pure_dropout_branch)] * 3
    x1, x2 = inputs((4, 5))
    before = torch.get_rng_state()
    got = grads_with(revfunc.reversible_sequence, blocks, params, x1, x2, seed=2)
    assert torch.equal(before, torch.get_rng_state())
    assert_all_close(got, grads_with(revfunc.sequential_sequence, blocks, params, x1, x2, seed=2), rtol=1e-10)


def test_same_generator_state_reproduces_and_different_states_differ():
    _, blocks, params = make_stack(2, dropout=0.5)
    x1, x2 = inputs((8, 6), requires_grad=False)

    def run(seed):
        return revfunc.reversible_sequence(blocks, params, x1, x2, generator=torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_no_generator_draws_one_seed_from_the_global_rng():
    _, blocks, params = make_stack(2, dropout=0.5)
    x1, x2 = inputs((8, 6), requires_grad=False)
    torch.manual_seed(11)
    a = revfunc.reversible_sequence(blocks, params, x1, x2)[0]
    after_one_call = torch.get_rng_state()
    torch.manual_seed(11)
    torch.randint(0, 2**63 - 1, ())  # exactly one draw
    assert torch.equal(after_one_call, torch.get_rng_state())
    torch.manual_seed(11)
    assert torch.equal(a, revfunc.reversible_sequence(blocks, params, x1, x2)[0])


def test_inverse_with_the_same_generator_state_replays_dropout():
    _, blocks, params = make_stack(4, dropout=0.5)
    x1, x2 = inputs((3, 6), requires_grad=False)
    with torch.no_grad():
        y = revfunc.reversible_sequence(blocks, params, x1, x2, generator=torch.Generator().manual_seed(9))
        z = revfunc.reversible_inverse(blocks, params, *y, generator=torch.Generator().manual_seed(9))
    assert_all_close(list(z), [x1, x2], rtol=1e-10, atol=1e-12)


def test_the_generator_check_keeps_no_branch_function_alive():
    """A closure re-created each step (capturing a tensor) must be freed after the step."""
    import gc
    import weakref

    import revfunc

    captured = []

    def one_step():
        scale = torch.randn(4, dtype=torch.float64)
        captured.append(weakref.ref(scale))

        def branch(p, x):
            return torch.tanh(x * scale)

        x1, x2 = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        # generator= makes every branch call go through the generator check.
        revfunc.reversible_sequence([(branch, branch)], [({}, {})], x1, x2, generator=torch.Generator().manual_seed(0))

    for _ in range(20):
        one_step()
    gc.collect()
    assert sum(ref() is not None for ref in captured) == 0


@pytest.mark.parametrize(
    "call, error, pattern",
    [
        (lambda: derive_seed(1.5, 0, 0), TypeError, r"revfunc.random.derive_seed: base expected an int, got float 1.5"),
        (lambda: derive_seed(1, "0", 0), TypeError, r"derive_seed: index expected an int, got str '0'"),
        (
            lambda: fork_and_seed(2**70).__enter__(),
            ValueError,
            r"revfunc.random.fork_and_seed: seed expected an int in \[0, 2\*\*64\), got 1180591620717411303424",
        ),
        (
            lambda: fork_and_seed(0.5).__enter__(),
            TypeError,
            r"fork_and_seed: seed expected an int in \[0, 2\*\*64\), got float",
        ),
        (
            lambda: fork_and_seed(1, "nonsense").__enter__(),
            ValueError,
            r"fork_and_seed: device expected a torch.device",
        ),
        (
            lambda: dropout(torch.ones(2), "0.1", None),
            TypeError,
            r"revfunc.random.dropout: p expected a float probability",
        ),
        (
            lambda: dropout([1.0], 0.1, None),
            TypeError,
            r"revfunc.random.dropout: x expected a floating-point torch.Tensor",
        ),
        (
            lambda: dropout(torch.ones(2), 0.1, 3),
            TypeError,
            (
                r"revfunc.random.dropout: generator expected None or a "
                r"torch.Generator, got int 3"
            ),
        ),
        (
            lambda: draw_base_seed(3),
            TypeError,
            r"revfunc.random.draw_base_seed: generator expected None or a torch.Generator",
        ),
    ],
)
def test_bad_input_to_the_random_helpers_names_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a build or machine without CUDA")
def test_fork_and_seed_on_an_unavailable_device_says_so():
    with pytest.raises(
        ValueError,
        match=r"fork_and_seed: device expected a device this torch build can use, got cuda "
        r"\(torch.cuda is not available here\)",
    ):
        fork_and_seed(1, "cuda").__enter__()
