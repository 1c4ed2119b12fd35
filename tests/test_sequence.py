"""reversible_sequence against plain autograd on the same math (float64, rtol 1e-10)."""

import pytest
import torch
from helpers import (
    assert_all_close,
    flat_params,
    inputs,
    loss_of,
    make_pure_stack,
    make_stack,
    reference_loop,
    saved_bytes,
)

import revfunc

RTOL = 1e-10


def routed_scale(depth, dtype=torch.float64):
    scale = torch.linspace(0.5, 1.5, 5, dtype=dtype).requires_grad_()
    return scale, revfunc.route_args({"scale": ((True, False),) * depth}, {"scale": scale}, depth)


@pytest.mark.parametrize("depth", [1, 3])
def test_backward_matches_plain_autograd_for_inputs_params_and_kwarg(depth):
    blocks, params = make_pure_stack(depth)
    scale, kwargs = routed_scale(depth)
    x1, x2 = inputs((4, 5))
    wrt = [x1, x2, scale, *flat_params(params)]

    y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2, kwargs=kwargs)
    r1, r2 = reference_loop(blocks, params, x1, x2, kwargs)
    assert_all_close([y1, y2], [r1, r2], rtol=RTOL)

    loss_of(y1, y2).backward()
    got = [t.grad.clone() for t in wrt]
    for t in wrt:
        t.grad = None
    loss_of(r1, r2).backward()
    assert_all_close(got, [t.grad for t in wrt], rtol=RTOL)


def test_autograd_grad_matches_and_writes_no_grad_attribute():
    _, blocks, params = make_stack(4)
    x1, x2 = inputs((3, 6))
    wrt = [x1, x2, *flat_params(params)]
    got = torch.autograd.grad(loss_of(*revfunc.reversible_sequence(blocks, params, x1, x2)), wrt)
    want = torch.autograd.grad(loss_of(*revfunc.sequential_sequence(blocks, params, x1, x2)), wrt)
    assert_all_close(got, want, rtol=RTOL)
    assert all(t.grad is None for t in wrt)


def test_input_without_grad_still_gives_param_grads():
    _, blocks, params = make_stack(3)
    x1, x2 = inputs((3, 6), requires_grad=False)
    got = torch.autograd.grad(loss_of(*revfunc.reversible_sequence(blocks, params, x1, x2)), flat_params(params))
    want = torch.autograd.grad(loss_of(*reference_loop(blocks, params, x1, x2)), flat_params(params))
    assert_all_close(got, want, rtol=RTOL)


@pytest.mark.parametrize("half", [0, 1])
def test_loss_on_one_output_half(half):
    _, blocks, params = make_stack(3)
    x1, x2 = inputs((2, 6))
    wrt = [x1, x2, *flat_params(params)]
    got = torch.autograd.grad(revfunc.reversible_sequence(blocks, params, x1, x2)[half].pow(3).sum(), wrt)
    # With the loss on y1 alone the last g is unused: plain autograd gives it zeros too.
    want = torch.autograd.grad(
        reference_loop(blocks, params, x1, x2)[half].pow(3).sum(), wrt, allow_unused=True, materialize_grads=True
    )
    assert_all_close(got, want, rtol=RTOL)


def test_tied_parameters_accumulate_over_blocks():
    blocks, params = make_pure_stack(1)
    shared = params[0]
    params = [shared] * 4  # the same tensors in every block
    blocks = blocks * 4
    x1, x2 = inputs((3, 5))
    wrt = [*flat_params([shared])]
    got = torch.autograd.grad(loss_of(*revfunc.reversible_sequence(blocks, params, x1, x2)), wrt)
    want = torch.autograd.grad(loss_of(*reference_loop(blocks, params, x1, x2)), wrt)
    assert_all_close(got, want, rtol=RTOL)


def test_func_grad_and_vjp_match():
    blocks, params = make_pure_stack(3)
    scale, _ = routed_scale(3)
    scale = scale.detach()
    x1, x2 = inputs((4, 5), requires_grad=False)

    def loss(fn, params, scale, x1, x2):
        kwargs = [({"scale": scale}, {})] * 3
        return loss_of(*fn(blocks, params, x1, x2, kwargs=kwargs))

    def ref(params, scale, x1, x2):
        return loss_of(*reference_loop(blocks, params, x1, x2, [({"scale": scale}, {})] * 3))

    got = torch.func.grad(lambda *a: loss(revfunc.reversible_sequence, *a), argnums=(0, 1, 2, 3))(params, scale, x1, x2)
    want = torch.func.grad(ref, argnums=(0, 1, 2, 3))(params, scale, x1, x2)
    flat_got, _ = torch.utils._pytree.tree_flatten(got)
    flat_want, _ = torch.utils._pytree.tree_flatten(want)
    assert_all_close(flat_got, flat_want, rtol=RTOL)

    def outputs(fn):
        return lambda p, a, b: fn(blocks, p, a, b)

    (y, vjp_fn) = torch.func.vjp(outputs(revfunc.reversible_sequence), params, x1, x2)
    (r, ref_vjp) = torch.func.vjp(outputs(revfunc.sequential_sequence), params, x1, x2)
    cot = (torch.cos(y[0]), y[1] * 2)
    flat_got, _ = torch.utils._pytree.tree_flatten(vjp_fn(cot))
    flat_want, _ = torch.utils._pytree.tree_flatten(ref_vjp(cot))
    assert_all_close(flat_got, flat_want, rtol=RTOL)


def test_vmap_of_grad_gives_per_sample_gradients():
    blocks, params = make_pure_stack(4)
    x1, x2 = inputs((6, 5), requires_grad=False)

    def per_sample_loss(params, a, b):
        return loss_of(*revfunc.reversible_sequence(blocks, params, a[None], b[None]))

    got = torch.func.vmap(torch.func.grad(per_sample_loss), in_dims=(None, 0, 0))(params, x1, x2)
    for n in range(x1.shape[0]):
        want = torch.autograd.grad(
            loss_of(*reference_loop(blocks, params, x1[n : n + 1], x2[n : n + 1])), flat_params(params)
        )
        got_n = [t[n] for t in flat_params(got)]
        assert_all_close(got_n, list(want), rtol=RTOL)


def test_vmap_forward_over_stacked_params_is_an_ensemble():
    members = [make_pure_stack(2, seed=s)[1] for s in range(3)]
    blocks = make_pure_stack(2)[0]
    stacked = torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *members)
    x1, x2 = inputs((4, 5), requires_grad=False)
    y1, y2 = torch.func.vmap(lambda p: revfunc.reversible_sequence(blocks, p, x1, x2))(stacked)
    for m, p in enumerate(members):
        r1, r2 = reference_loop(blocks, p, x1, x2)
        assert_all_close([y1[m], y2[m]], [r1, r2], rtol=RTOL)


@pytest.mark.parametrize("depth", [1, 8, 64])
def test_round_trip(depth):
    _, blocks, params = make_stack(depth, seed=depth)
    x1, x2 = inputs((3, 6), requires_grad=False)
    with torch.no_grad():
        z1, z2 = revfunc.reversible_inverse(blocks, params, *revfunc.reversible_sequence(blocks, params, x1, x2))
    assert_all_close([z1, z2], [x1, x2], rtol=1e-10, atol=1e-10)


def activation_bytes(fn, depth):
    _, blocks, params = make_stack(depth, dim=16, hidden=32)
    x1, x2 = inputs((8, 16))
    n, _ = saved_bytes(lambda: fn(blocks, params, x1, x2), exclude=flat_params(params))
    return n


def test_activation_memory_is_constant_in_depth():
    small, large = activation_bytes(revfunc.reversible_sequence, 4), activation_bytes(revfunc.reversible_sequence, 32)
    assert 0 < large <= 1.1 * small
    # The same count grows with depth for plain autograd, so the check above can fail.
    assert activation_bytes(revfunc.sequential_sequence, 32) > 4 * activation_bytes(revfunc.sequential_sequence, 4)


def test_double_backward_matches_plain_autograd():
    blocks, params = make_pure_stack(3)
    x1, x2 = inputs((3, 5))
    wrt = [x1, x2, *flat_params(params)]

    def second_order(fn):
        grads = torch.autograd.grad(loss_of(*fn(blocks, params, x1, x2)), wrt, create_graph=True)
        return torch.autograd.grad(sum((g**2).sum() for g in grads), wrt)

    assert_all_close(second_order(revfunc.reversible_sequence), second_order(reference_loop), rtol=1e-9)


def test_jacrev_of_jacrev_hessian_matches():
    blocks, params = make_pure_stack(2, dim=3)
    x1, x2 = inputs((1, 3), requires_grad=False)

    def loss(fn):
        return lambda a: loss_of(*fn(blocks, params, a, x2))

    got = torch.func.jacrev(torch.func.jacrev(loss(revfunc.reversible_sequence)))(x1)
    want = torch.func.jacrev(torch.func.jacrev(loss(reference_loop)))(x1)
    assert_all_close([got], [want], rtol=1e-9)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "hessian", "forward_ad"])
def test_forward_mode_raises_a_clear_error(transform):
    blocks, params = make_pure_stack(2)
    x1, x2 = inputs((2, 5), requires_grad=False)

    def y1_of(a):
        return revfunc.reversible_sequence(blocks, params, a, x2)[0].sum()

    with pytest.raises(RuntimeError, match="forward-mode AD .* unsupported.*jacrev.*sequential_sequence"):
        if transform == "jvp":
            torch.func.jvp(y1_of, (x1,), (torch.ones_like(x1),))
        elif transform == "jacfwd":
            torch.func.jacfwd(y1_of)(x1)
        elif transform == "hessian":
            torch.func.hessian(y1_of)(x1)
        else:
            import torch.autograd.forward_ad as fwAD

            with fwAD.dual_level():
                y1_of(fwAD.make_dual(x1, torch.ones_like(x1)))


def _bad_call(**overrides):
    blocks, params = make_pure_stack(2)
    x1, x2 = inputs((2, 5), requires_grad=False)
    args = dict(blocks=blocks, params=params, x1=x1, x2=x2)
    args.update(overrides)
    kwargs = {k: args.pop(k) for k in ("kwargs", "generator", "checkpoint_every") if k in args}
    return revfunc.reversible_sequence(args["blocks"], args["params"], args["x1"], args["x2"], **kwargs)


@pytest.mark.parametrize(
    "overrides, error, pattern",
    [
        (
            dict(params=make_pure_stack(3)[1]),
            ValueError,
            r"params expected one \(f_params, g_params\) pair per block \(2\), got 3",
        ),
        (dict(blocks=[]), ValueError, "blocks expected at least one"),
        (dict(blocks=[(1, 2)] * 2), TypeError, r"blocks\[0\] expected a pair \(f, g\) of callables"),
        (
            dict(x2=torch.zeros(2, 5, dtype=torch.float32)),
            TypeError,
            "x2 expected the dtype of x1 .*float64.*got torch.float32",
        ),
        (
            dict(x2=torch.zeros(2, 4, dtype=torch.float64)),
            ValueError,
            r"x2 expected the shape of x1 \(2, 5\), got \(2, 4\)",
        ),
        (
            dict(x1=torch.zeros(2, 5, dtype=torch.int64)),
            TypeError,
            "x1 expected a floating-point tensor, got dtype=torch.int64",
        ),
        (dict(x1=[1.0]), TypeError, "x1 expected a torch.Tensor, got list"),
        (dict(x2=torch.zeros(2, 5, dtype=torch.float64, device="meta")), ValueError, "x2 expected the device of x1"),
        (
            dict(kwargs=[({}, {})]),
            ValueError,
            r"kwargs expected one \(f_kwargs, g_kwargs\) pair per block \(2\), got 1",
        ),
        (dict(generator=3), TypeError, "generator expected None or a torch.Generator, got int"),
        (dict(checkpoint_every=0), ValueError, "checkpoint_every expected None or a positive int, got int 0"),
    ],
)
def test_bad_input_raises_naming_the_argument(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _bad_call(**overrides)


def test_params_on_another_device_is_an_error():
    blocks, params = make_pure_stack(1)
    params = [({**params[0][0], "w": params[0][0]["w"].to("meta")}, params[0][1])]
    x1, x2 = inputs((2, 5), requires_grad=False)
    with pytest.raises(
        ValueError, match=r"params\[0\] \(f\) 'w' expected a tensor on the input's device \(cpu\), got meta"
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2)


@pytest.mark.parametrize("branch", ["f", "g"])
def test_shape_changing_branch_is_named(branch):
    blocks, params = make_pure_stack(2)

    def widen(p, x):
        return torch.cat([x, x], -1)

    f, g = blocks[1]
    blocks = [blocks[0], (widen, g) if branch == "f" else (f, widen)]
    x1, x2 = inputs((2, 5), requires_grad=False)
    with pytest.raises(
        ValueError,
        match=rf"block 1 branch {branch} expected an output shaped like its input \(2, 5\), got shape \(2, 10\)",
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2)


def test_generator_on_another_device_is_an_error():
    blocks, params = make_pure_stack(1)
    params = [tuple({k: v.detach().to("meta") for k, v in p.items()} for p in params[0])]
    x1, x2 = (torch.zeros(2, 5, dtype=torch.float64, device="meta") for _ in range(2))
    with pytest.raises(
        ValueError, match=r"generator expected a torch.Generator on the input's device \(meta\), got a generator on cpu"
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2, generator=torch.Generator())
