"""revfunc composed with autograd usage patterns and torch.func transforms."""

import contextlib

import classic
import pytest
import torch
from helpers import assert_all_close, flat_params, inputs, loss_of, make_stack

import revfunc
import revfunc.nn as rnn
from revfunc.random import dropout
from revfunc.testing.blocks import transformer_layers

CLASSIC = classic.CLASSIC


def test_interleaved_calls_each_get_their_own_gradients():
    """forward A, forward B, backward A, backward B == each alone (gradient accumulation)."""
    _, blocks, params = make_stack(4, dropout=0.4)
    (a1, a2), (b1, b2) = inputs((5, 6), seed=1), inputs((5, 6), seed=2)
    wrt = flat_params(params)

    def alone(x1, x2, seed):
        out = revfunc.sequential_sequence(blocks, params, x1, x2, generator=torch.Generator().manual_seed(seed))
        return torch.autograd.grad(loss_of(*out), wrt)

    ya = revfunc.reversible_sequence(blocks, params, a1, a2, generator=torch.Generator().manual_seed(10))
    yb = revfunc.reversible_sequence(blocks, params, b1, b2, generator=torch.Generator().manual_seed(20))
    ga = torch.autograd.grad(loss_of(*ya), wrt)
    gb = torch.autograd.grad(loss_of(*yb), wrt)
    assert_all_close(ga, alone(a1, a2, 10), rtol=1e-10)
    assert_all_close(gb, alone(b1, b2, 20), rtol=1e-10)


def test_module_applied_twice_with_global_seed_accumulates_correct_gradients():
    """The classic container keeps only the latest RNG state and gets this wrong."""
    torch.manual_seed(0)
    layers = transformer_layers(3, 8, heads=2, dropout=0.3).double()
    # requires_grad: the classic Function gives no gradients at all otherwise.
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)

    def accumulated(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        ya, yb = model(x), model(x * 2)
        ya.pow(2).sum().backward()
        yb.pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    def one_by_one(model):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(123)
        model(x).pow(2).sum().backward()
        model(x * 2).pow(2).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    new = rnn.ReversibleSequence(layers)
    assert_all_close(accumulated(new), one_by_one(new), rtol=1e-10)
    old = CLASSIC.ReversibleSequence(layers)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(accumulated(old), one_by_one(old))]
    assert max(errors) > 1e-3  # the classic code's silent error, which revfunc fixes


def pure_dropout_branch(p, x, generator=None):
    return dropout(torch.tanh(x @ p["w"] + p["b"]), 0.3, generator)


@pytest.mark.parametrize("randomness", ["same", "different"])
def test_vmap_grad_with_dropout_matches_the_sequential_reference(randomness):
    _, blocks, params = make_stack(3, dropout=0.3)
    x1, x2 = inputs((4, 6), requires_grad=False)

    def per_sample(fn):
        def loss(p, a, b):
            gen = torch.Generator().manual_seed(5)
            return loss_of(*fn(blocks, p, a[None], b[None], generator=gen))

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0), randomness=randomness)

    got = flat_params(per_sample(revfunc.reversible_sequence)(params, x1, x2))
    want = flat_params(per_sample(revfunc.sequential_sequence)(params, x1, x2))
    assert_all_close(got, want, rtol=1e-10)


def test_func_grad_of_a_functional_call_on_the_nn_module_with_dropout():
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2, dropout=0.3).double())
    params = dict(model.named_parameters())
    x = torch.randn(2, 5, 8, dtype=torch.float64)

    def loss(p):
        out = torch.func.functional_call(model, p, (x,), {"generator": torch.Generator().manual_seed(4)})
        return out.pow(2).sum()

    got = torch.func.grad(loss)(params)
    want = torch.autograd.grad(loss(params), list(params.values()))
    assert_all_close(list(got.values()), list(want), rtol=1e-10)


def _pure_mlp_stack(depth=3, dim=8):
    torch.manual_seed(0)
    from revfunc.testing.blocks import mlp_layers

    blocks, params = revfunc.pure_blocks(mlp_layers(depth, dim))
    return blocks, [(dict(fp), dict(gp)) for fp, gp in params]


def _assert_tree_close(got, want, rtol=1e-5, atol=1e-6):
    flat_got, _ = torch.utils._pytree.tree_flatten(got)
    flat_want, _ = torch.utils._pytree.tree_flatten(want)
    assert len(flat_got) == len(flat_want)
    for a, b in zip(flat_got, flat_want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def test_compile_fullgraph_grad_step_matches_eager_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    blocks, params = _pure_mlp_stack()

    def loss(p, x1, x2):
        return loss_of(*revfunc.reversible_sequence(blocks, p, x1, x2))

    def step(p, x1, x2):
        return torch.func.grad_and_value(loss)(p, x1, x2)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for seed in range(3):
        x1, x2 = inputs((4, 8), seed=seed, dtype=torch.float32, requires_grad=False)
        # Correct, but Dynamo drops the custom backward here: warned once, at trace time.
        with (
            pytest.warns(UserWarning, match=r"stores every block's activations.*revfunc.reversible_vjp")
            if seed == 0
            else contextlib.nullcontext()
        ):
            got = compiled(params, x1, x2)
        _assert_tree_close(got, step(params, x1, x2))
    assert counter.frame_count == 1


def test_compile_fullgraph_of_a_functional_call_on_the_nn_module():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(
        transformer_layers(2, 8, heads=2).double(), args_route={"mask": ((True, False),) * 2}
    )
    # Detached: with parameters that require grad, AOTAutograd would also trace the
    # gradient step's own backward, and SDPA's CPU flash backward has no derivative.
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.rand(2, 5) > 0.3
    mask[:, 0] = True

    def step(p, x, mask):
        return torch.func.grad_and_value(
            lambda p: torch.func.functional_call(model, p, (x,), {"mask": mask}).pow(2).sum()
        )(p)

    with pytest.warns(UserWarning, match=r"stores every block's activations"):  # correct, but not memory-saving
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(params, x, mask)
    _assert_tree_close(got, step(params, x, mask), rtol=1e-10, atol=1e-12)


def test_compiled_module_forward_with_eager_loss_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2))
    x = torch.randn(2, 5, 8)
    torch.compile(model)(x).pow(2).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    for a, p in zip(got, model.parameters()):  # inductor fuses float32 ops: a few ulps apart
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


# Graph breaks at the seed draw and the RNG fork make Dynamo warn from its own internals.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_compile_with_generator_randomness_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2, dropout=0.3))
    x = torch.randn(2, 5, 8)

    def step(x, generator):
        return model(x, generator=generator).pow(2).sum()

    compiled = torch.compile(step, backend="aot_eager")  # graph breaks at the seed draw and RNG fork
    compiled(x, torch.Generator().manual_seed(1)).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    step(x, torch.Generator().manual_seed(1)).backward()
    for a, p in zip(got, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_compiled_dropout_without_generator_is_refused_not_silently_wrong():
    torch._dynamo.reset()
    model = rnn.ReversibleSequence(transformer_layers(1, 8, heads=2, dropout=0.1))
    with pytest.raises(
        Exception,
        match=r"submodule 'blocks.0.f.net' \(Attention, p=0.1\) is active inside "
        r"torch.compile without a generator",
    ):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(1, 3, 8))


def test_compile_fullgraph_of_a_reversible_vjp_training_step_matches_eager():
    """The compiled path that keeps the memory saving (tests/test_memory.py measures it)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    blocks, params = _pure_mlp_stack()
    params = [tuple({k: t.detach().double() for k, t in p.items()} for p in pair) for pair in params]

    def head(y1, y2):
        return loss_of(y1, y2)

    def step(p, x1, x2):
        (y1, y2), pullback = revfunc.reversible_vjp(blocks, p, x1, x2)
        (dy1, dy2), value = torch.func.grad_and_value(head, argnums=(0, 1))(y1, y2)
        dparams, dx1, dx2 = pullback(dy1, dy2)
        return dparams, dx1, value

    def reference(p, x1, x2):
        (dparams, dx1), value = torch.func.grad_and_value(
            lambda p, a: head(*revfunc.sequential_sequence(blocks, p, a, x2)), argnums=(0, 1)
        )(p, x1)
        return dparams, dx1, value

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for seed in range(2):
        x1, x2 = inputs((4, 8), seed=seed, requires_grad=False)
        _assert_tree_close(compiled(params, x1, x2), reference(params, x1, x2), rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 1


def test_compile_fullgraph_of_the_sequential_sequence_module():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = rnn.SequentialSequence(transformer_layers(2, 8, heads=2), args_route={"mask": ((True, False),) * 2})
    x = torch.randn(2, 5, 8)
    mask = torch.rand(2, 5) > 0.3
    mask[:, 0] = True
    torch.testing.assert_close(
        torch.compile(model, fullgraph=True, backend="aot_eager")(x, mask=mask),
        model(x, mask=mask),
        rtol=1e-6,
        atol=1e-6,
    )


def test_compiled_module_compiles_once_over_repeated_calls():
    """The adapter's pure-view cache must not be written inside the compiled region
    (a write to a guarded attribute recompiles on the next call)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    torch.manual_seed(0)
    torch.nn.Linear(2, 2)  # a registration anywhere after construction: the adapter must not care
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(2, 5, 8)
    for _ in range(3):
        compiled(x).pow(2).sum().backward()
    assert counter.frame_count == 1


def test_a_branch_replaced_then_compiled_without_an_eager_call_is_a_clear_error():
    torch._dynamo.reset()
    model = rnn.ReversibleSequence(transformer_layers(2, 8, heads=2))
    model.blocks[0].f.net = torch.nn.Linear(8, 8)
    with pytest.raises(Exception, match=r"a branch module was replaced since the last eager call"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(2, 5, 8))
    model(torch.randn(2, 5, 8))  # one eager call rebuilds; then compiling works
    torch.compile(model, backend="eager", fullgraph=True)(torch.randn(2, 5, 8))
