"""Gradients under every differentiation mode, tied tensors, and the higher-order guard.

Reference: ``revfunc.sequential_sequence`` (plain autograd on the same math), float64.
"""

import pytest
import torch
from helpers import assert_all_close

import revfunc

RTOL = 1e-10
D = 6


def _tied_case():
    """``w`` tied within f's branch (names a and b), across f and g of a block, and across
    blocks; ``v`` tied across blocks and branches."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(D, D, generator=gen, dtype=torch.float64) / 3
    v = torch.randn(D, D, generator=gen, dtype=torch.float64) / 3
    x1, x2 = (torch.randn(3, D, generator=gen, dtype=torch.float64) for _ in range(2))

    def f(p, x):
        return torch.tanh(x @ p["a"] + 2 * x @ p["b"])

    def g(p, x):
        return torch.tanh(x @ p["w"])

    def params_of(w, v):
        return [({"a": w, "b": w}, {"w": v}), ({"a": v, "b": w}, {"w": w})]

    return [(f, g)] * 2, params_of, w, v, x1, x2


def _loss(fn, blocks, params, x1, x2):
    y1, y2 = fn(blocks, params, x1, x2)
    return (y1**2).sum() + y2.sin().sum()


MODES = ["backward", "autograd_grad", "func_grad", "vjp", "vmap_grad", "create_graph", "grad_of_grad", "sweep"]


def _grads(mode, fn, blocks, params_of, w, v, x1, x2):
    """Gradient (first or second order) in ``w`` and ``v`` of the tied stack, by ``mode``."""
    if mode in ("backward", "autograd_grad", "create_graph"):
        wr, vr = w.clone().requires_grad_(), v.clone().requires_grad_()
        loss = _loss(fn, blocks, params_of(wr, vr), x1, x2)
        if mode == "backward":
            loss.backward()
            return wr.grad, vr.grad
        grads = torch.autograd.grad(loss, (wr, vr), create_graph=mode == "create_graph")
        if mode == "autograd_grad":
            return grads
        return torch.autograd.grad(sum((g**2).sum() for g in grads), (wr, vr))
    if mode == "func_grad":
        return torch.func.grad(lambda a, b: _loss(fn, blocks, params_of(a, b), x1, x2), argnums=(0, 1))(w, v)
    if mode == "vjp":
        out, vjp_fn = torch.func.vjp(lambda a, b: fn(blocks, params_of(a, b), x1, x2), w, v)
        return vjp_fn((out[0].cos(), out[1] * 2))
    if mode == "vmap_grad":

        def per_sample(a, b, s1, s2):
            return _loss(fn, blocks, params_of(a, b), s1[None], s2[None])

        return torch.func.vmap(torch.func.grad(per_sample, argnums=(0, 1)), in_dims=(None, None, 0, 0))(w, v, x1, x2)
    if mode == "grad_of_grad":

        def first(a, b):
            return torch.func.grad(lambda a, b: _loss(fn, blocks, params_of(a, b), x1, x2), argnums=(0, 1))(a, b)

        return torch.func.grad(lambda a, b: sum((g**2).sum() for g in first(a, b)), argnums=(0, 1))(w, v)
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", [m for m in MODES if m != "sweep"])
def test_tied_tensors_get_the_sum_of_their_terms_in_every_mode(mode):
    blocks, params_of, w, v, x1, x2 = _tied_case()
    got = _grads(mode, revfunc.reversible_sequence, blocks, params_of, w, v, x1, x2)
    want = _grads(mode, revfunc.sequential_sequence, blocks, params_of, w, v, x1, x2)
    assert_all_close(list(got), list(want), rtol=1e-9 if mode in ("create_graph", "grad_of_grad") else RTOL)


def test_reversible_vjp_gives_each_name_its_own_term_like_func_vjp():
    blocks, params_of, w, v, x1, x2 = _tied_case()
    params = params_of(w, v)
    (y1, y2), pullback = revfunc.reversible_vjp(blocks, params, x1, x2)
    cot = (y1.cos(), y2 * 2)
    dparams, dx1, dx2 = pullback(*cot)
    (r1, r2), ref_vjp = torch.func.vjp(lambda p, a, b: revfunc.sequential_sequence(blocks, p, a, b), params, x1, x2)
    ref_params, ref_x1, ref_x2 = ref_vjp(cot)
    assert_all_close([y1, y2], [r1, r2], rtol=RTOL)
    got, _ = torch.utils._pytree.tree_flatten((dparams, dx1, dx2))
    want, _ = torch.utils._pytree.tree_flatten((ref_params, ref_x1, ref_x2))
    assert_all_close(got, want, rtol=RTOL)
    assert not any(t.requires_grad for t in got)


def test_reversible_vjp_with_kwargs_dropout_and_checkpoint_every():
    from helpers import make_stack

    _, blocks, params = make_stack(5, dropout=0.3)
    params = [tuple({k: t.detach() for k, t in p.items()} for p in pair) for pair in params]
    gen = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(2))
    (y1, y2), pullback = revfunc.reversible_vjp(
        blocks, params, x1, x2, generator=torch.Generator().manual_seed(9), checkpoint_every=2
    )
    got = pullback(torch.ones_like(y1), y2)

    def ref(p, a, b):
        return revfunc.sequential_sequence(blocks, p, a, b, generator=torch.Generator().manual_seed(9))

    (r1, r2), ref_vjp = torch.func.vjp(ref, params, x1, x2)
    assert_all_close([y1, y2], [r1, r2], rtol=RTOL)
    assert_all_close(
        torch.utils._pytree.tree_leaves(got),
        torch.utils._pytree.tree_leaves(ref_vjp((torch.ones_like(r1), r2))),
        rtol=RTOL,
    )


def test_reversible_vjp_rejects_a_mismatched_cotangent():
    blocks, params_of, w, v, x1, x2 = _tied_case()
    (y1, y2), pullback = revfunc.reversible_vjp(blocks, params_of(w, v), x1, x2)
    with pytest.raises(
        ValueError, match=r"revfunc.reversible_vjp: dy1 expected the shape of y1 \(3, 6\), got \(3, 5\)"
    ):
        pullback(torch.ones(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64))


def _same_level_double_backward(higher_order):
    blocks, params_of, w, v, x1, x2 = _tied_case()

    def penalty(fn):
        def inner(a):
            loss = _loss(fn, blocks, params_of(a, v), x1, x2)
            (g,) = torch.autograd.grad(loss, a, create_graph=True)
            return (g**2).sum()

        return inner

    def rev(*args, **kw):
        return revfunc.reversible_sequence(*args, higher_order=higher_order, **kw)

    return torch.func.grad(penalty(rev))(w), torch.func.grad(penalty(revfunc.sequential_sequence))(w)


def test_same_level_double_backward_raises_without_higher_order():
    with pytest.raises(
        RuntimeError,
        match=r"revfunc.reversible_sequence: the gradient it returned is being "
        r"differentiated again at the same torch.func level.*higher_order=True",
    ):
        _same_level_double_backward(higher_order=False)


def test_same_level_double_backward_is_correct_with_higher_order():
    got, want = _same_level_double_backward(higher_order=True)
    assert_all_close([got], [want], rtol=1e-9)


def test_func_grad_of_live_parameters_is_not_silently_detached_at_base():
    """torch.func.grad over nn.Parameters, then base autograd of the result: an error,
    never a gradient that silently misses the reversible stack's terms."""
    blocks, params_of, w, v, x1, x2 = _tied_case()
    wp = torch.nn.Parameter(w.clone())
    g = torch.func.grad(lambda a: _loss(revfunc.reversible_sequence, blocks, params_of(a, v), x1, x2))(wp)
    want = torch.func.grad(lambda a: _loss(revfunc.sequential_sequence, blocks, params_of(a, v), x1, x2))(w)
    assert_all_close([g.detach()], [want], rtol=RTOL)
    with pytest.raises(RuntimeError, match="differentiated again at the same torch.func level"):
        g.pow(2).sum().backward()


def test_higher_order_must_be_a_bool():
    blocks, params_of, w, v, x1, x2 = _tied_case()
    with pytest.raises(TypeError, match="revfunc.reversible_sequence: higher_order expected a bool, got str 'yes'"):
        revfunc.reversible_sequence(blocks, params_of(w, v), x1, x2, higher_order="yes")
