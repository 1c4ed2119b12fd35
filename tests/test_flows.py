"""Invertible layers between couplings (normalizing flows): a user's own layer and the
built-ins against the same math written by hand in plain autograd (float64, rtol 1e-10),
on every path (memory flat in depth: ``tests/test_memory.py``, paths ``*_flow``); the LU
map's log-det against ``slogdet``; a FrEIA ``SequenceINN`` rebuilt
with the same weights; refusals naming the block."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import assert_all_close

import revfunc
from revfunc.couplings import affine
from revfunc.invertible import Invertible, lu_linear, lu_linear_params, permute

RTOL, ATOL = 1e-10, 1e-12
D, B = 4, 3


def branch(p, x):  # a GLOW subnet: (s_raw, t) as one tensor of twice the width
    return torch.tanh(x @ p["w1"]) @ p["w2"]


def _shear_forward(p, x1, x2):  # a user's layer: scale x1, shear x2 by sin(y1)
    y1 = x1 * torch.exp(p["a"])
    return y1, x2 + torch.sin(y1) * p["b"], p["a"].sum()


def _shear_inverse(p, y1, y2):
    return y1 * torch.exp(-p["a"]), y2 - torch.sin(y1) * p["b"]


shear = Invertible(_shear_forward, _shear_inverse, name="shear")


def _shear_vjp(p, x1, x2, dy1, dy2, dlogdet):  # shear's pullback, written out
    y1 = x1 * torch.exp(p["a"])
    dy1 = dy1 + dy2 * torch.cos(y1) * p["b"]
    da = (dy1 * y1).sum_to_size(p["a"].shape)
    if dlogdet is not None:
        da = da + dlogdet.sum()
    return dy1 * torch.exp(p["a"]), dy2, {"a": da, "b": (dy2 * torch.sin(y1)).sum_to_size(p["b"].shape)}


SHEAR_VJP = Invertible(_shear_forward, _shear_inverse, name="shear_vjp", vjp=_shear_vjp)


PERMS: dict = {}  # permute layer -> the permutation it was built from


def flow(depth=3, seed=0):
    """Coupling, shear, coupling, permute, coupling, lu_linear, ...: every kind of block."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape, scale=0.4):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    blocks, params = [], []
    for i in range(depth):
        blocks.append((branch, branch))
        params.append(tuple({"w1": t(D, 6), "w2": t(6, 2 * D)} for _ in range(2)))
        kind = i % 3
        if kind == 0:
            blocks.append(shear)
            params.append({"a": t(D), "b": t(D)})
        elif kind == 1:
            perm = torch.randperm(2 * D, generator=g)
            blocks.append(permute(perm))
            PERMS[blocks[-1]] = perm  # what the hand-written flow indexes with
            params.append({})
        else:
            blocks.append(lu_linear())
            lp = lu_linear_params(2 * D, generator=g, dtype=torch.float64)
            params.append({k: v.requires_grad_() if k in ("lower", "upper", "log_scale") else v for k, v in lp.items()})
    blocks.append((branch, branch))
    params.append(tuple({"w1": t(D, 6), "w2": t(6, 2 * D)} for _ in range(2)))
    x1, x2 = t(B, D, scale=1.0), t(B, D, scale=1.0)
    return blocks, params, x1, x2


def hand_flow(blocks, params, x1, x2):
    """The same flow written out by hand: GLOW affine updates and the layers' own math."""
    logdet = torch.zeros(x1.shape[0], dtype=x1.dtype)
    for block, p in zip(blocks, params):
        if block is shear:
            y1 = x1 * torch.exp(p["a"])
            x1, x2 = y1, x2 + torch.sin(y1) * p["b"]
            logdet = logdet + p["a"].sum()
        elif isinstance(block, Invertible) and block.name.startswith("permute"):
            x = torch.cat([x1, x2], -1)[:, PERMS[block]]
            x1, x2 = x[:, :D], x[:, D:]
        elif isinstance(block, Invertible):
            eye = torch.eye(2 * D, dtype=x1.dtype)
            L = torch.tril(p["lower"], -1) + eye
            U = torch.triu(p["upper"], 1) + torch.diag(p["sign"] * torch.exp(p["log_scale"]))
            x = torch.cat([x1, x2], -1) @ (p["permutation"] @ L @ U).T
            x1, x2 = x[:, :D], x[:, D:]
            logdet = logdet + p["log_scale"].sum()
        else:
            for half in (0, 1):
                s_raw, t = branch(p[half], x2 if half == 0 else x1).chunk(2, -1)
                s = 2.0 * 0.636 * torch.atan(s_raw)
                if half == 0:
                    x1 = x1 * torch.exp(s) + t
                else:
                    x2 = x2 * torch.exp(s) + t
                logdet = logdet + s.sum(-1)
    return x1, x2, logdet


def nll(y1, y2, logdet):
    return 0.5 * ((y1**2).sum() + (y2**2).sum()) - logdet.sum() + 0.1 * torch.sin(y2).sum()


def leaves(params):
    out = []
    for entry in params:
        for d in entry if isinstance(entry, tuple) else (entry,):
            out += [v for v in d.values() if v.requires_grad]
    return out


def detached(params):
    def det(d):
        return {k: v.detach() for k, v in d.items()}

    return [det(e) if isinstance(e, dict) else tuple(det(d) for d in e) for e in params]


C = affine(clamp=2.0)


def test_outputs_and_logdet_equal_the_hand_written_flow():
    blocks, params, x1, x2 = flow()
    want = hand_flow(blocks, params, x1, x2)
    for fn in (revfunc.reversible_sequence, revfunc.sequential_sequence):
        got = fn(blocks, params, x1, x2, coupling=C, return_logdet=True)
        assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("closed_form", [False, True], ids=["recomputed", "closed_form_vjp"])
def test_create_graph_gradients_and_their_gradients(closed_form):
    # The recorded backward through couplings and layers: first-order gradients, then the
    # gradient of their squared norm; the shear layer by recomputation or by its own vjp.
    blocks, params, x1, x2 = flow()
    wrt = [x1, x2, *leaves(params)]

    def first_and_second(out):
        grads = torch.autograd.grad(nll(*out), wrt, create_graph=True)
        return [*grads, *torch.autograd.grad(sum((g**2).sum() for g in grads), wrt)]

    want = first_and_second(hand_flow(blocks, params, x1, x2))
    if closed_form:
        blocks = [SHEAR_VJP if block is shear else block for block in blocks]
    got = first_and_second(revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True))
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("context", ["save_on_cpu", "checkpoint_around", "saved_tensors_hooks"], ids=lambda c: c)
def test_gradients_inside_the_contexts_users_wrap_around_models(context):
    blocks, params, x1, x2 = flow()
    inputs = [x1, x2, *leaves(params)]
    want = torch.autograd.grad(nll(*hand_flow(blocks, params, x1, x2)), inputs)

    def model(a, b):
        return revfunc.reversible_sequence(blocks, params, a, b, coupling=C, return_logdet=True)

    if context == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu():
            out = model(x1, x2)
    elif context == "checkpoint_around":
        out = torch.utils.checkpoint.checkpoint(model, x1, x2, use_reentrant=False)
    else:  # hooks that hand back new tensor objects: nothing may depend on identity
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            out = model(x1, x2)
    got = torch.autograd.grad(nll(*out), inputs)
    assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)


def test_a_layer_with_its_own_closed_form_vjp_and_a_wrong_one():
    blocks, params, x1, x2 = flow()
    inputs = [x1, x2, *leaves(params)]
    want = torch.autograd.grad(nll(*hand_flow(blocks, params, x1, x2)), inputs)
    i = blocks.index(shear)
    blocks[i] = SHEAR_VJP
    got = torch.autograd.grad(
        nll(*revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)), inputs
    )
    assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)
    p, a, b = detached(params), x1.detach(), x2.detach()
    per_sample = torch.func.vmap(
        torch.func.grad(
            lambda p, a, b: nll(
                *revfunc.reversible_sequence(blocks, p, a[None], b[None], coupling=C, return_logdet=True)
            )
        ),
        in_dims=(None, 0, 0),
    )
    leaves_of = torch.utils._pytree.tree_leaves
    loop = [
        torch.func.grad(lambda p, a, b: nll(*hand_flow(blocks[:i] + [shear] + blocks[i + 1 :], p, a, b)))(
            p, a[k : k + 1], b[k : k + 1]
        )
        for k in range(B)
    ]
    assert_all_close(
        leaves_of(per_sample(p, a, b)),
        [torch.stack(ts) for ts in zip(*(leaves_of(g) for g in loop))],
        rtol=RTOL,
        atol=ATOL,
    )
    revfunc.testing.assert_gradients_match(blocks, params, x1, x2, coupling=C)

    def wrong(p, x1, x2, dy1, dy2, dlogdet):
        dx1, dx2, dp = _shear_vjp(p, x1, x2, dy1, dy2, dlogdet)
        return dx1, dx2, {"a": dp["a"]}  # b's gradient left out

    blocks[i] = Invertible(_shear_forward, _shear_inverse, name="shear_wrong", vjp=wrong)
    with pytest.raises(AssertionError, match="gradient of params"):
        revfunc.testing.assert_gradients_match(blocks, params, x1, x2, coupling=C)

    # Misshapen results are refused, naming the block and the layer.
    misshapen = {
        "summed_param": (lambda dx1, dx2, dp: (dx1, dx2, {**dp, "b": dp["b"].sum()}), r"params\['b'\]"),
        "flat_half": (lambda dx1, dx2, dp: (dx1.reshape(-1), dx2, dp), "shaped like the halves"),
        "pair": (lambda dx1, dx2, dp: (dx1, dx2), "a triple"),
    }
    for name, (mangle, match) in misshapen.items():
        blocks[i] = Invertible(
            _shear_forward, _shear_inverse, name=name, vjp=lambda *a, mangle=mangle: mangle(*_shear_vjp(*a))
        )
        out = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)
        named = rf"block {i} invertible layer Invertible\({name}\)'s vjp.*{match}"
        with pytest.raises((TypeError, ValueError), match=named):
            torch.autograd.grad(nll(*out), inputs)
    # An error inside it is re-raised naming the block and the layer, as forward's are.
    blocks[i] = Invertible(_shear_forward, _shear_inverse, name="three_args", vjp=lambda p, x1, x2: None)
    out = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)
    with pytest.raises(TypeError, match=rf"block {i} invertible layer's vjp \(Invertible\(three_args\)\) raised"):
        torch.autograd.grad(nll(*out), inputs)


def _shear_reentrant(p, x1, x2):  # shear's math, its shear under a reentrant checkpoint
    y1 = x1 * torch.exp(p["a"])
    sheared = torch.utils.checkpoint.checkpoint(lambda u, b: torch.sin(u) * b, y1, p["b"], use_reentrant=True)
    return y1, x2 + sheared, p["a"].sum()


def test_a_layer_with_a_reentrant_checkpoint_inside():
    # The engine call with inputs= is refused inside it: the vjp goes into aliases.
    blocks, params, x1, x2 = flow()
    inputs = [x1, x2, *leaves(params)]
    want = torch.autograd.grad(nll(*hand_flow(blocks, params, x1, x2)), inputs)
    i = blocks.index(shear)
    blocks[i] = Invertible(_shear_reentrant, _shear_inverse, name="shear_reentrant")
    nll(*revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)).backward()
    assert_all_close([t.grad for t in inputs], list(want), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_gradients_under_backward_and_autograd_grad(checkpoint_every):
    blocks, params, x1, x2 = flow()
    inputs = [x1, x2, *leaves(params)]
    want = torch.autograd.grad(nll(*hand_flow(blocks, params, x1, x2)), inputs)
    out = revfunc.reversible_sequence(
        blocks, params, x1, x2, coupling=C, return_logdet=True, checkpoint_every=checkpoint_every
    )
    got = torch.autograd.grad(nll(*out), inputs)
    assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)
    nll(*revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)).backward()
    assert_all_close([t.grad for t in inputs], list(want), rtol=RTOL, atol=ATOL)


def test_gradients_under_func_grad_and_per_sample_vmap_grad():
    blocks, params, x1, x2 = flow()
    p, a, b = detached(params), x1.detach(), x2.detach()

    def rev(p, a, b):
        return nll(*revfunc.reversible_sequence(blocks, p, a, b, coupling=C, return_logdet=True))

    def ref(p, a, b):
        return nll(*hand_flow(blocks, p, a, b))

    leaves_of = torch.utils._pytree.tree_leaves
    got = torch.func.grad(rev, argnums=(0, 1, 2))(p, a, b)
    want = torch.func.grad(ref, argnums=(0, 1, 2))(p, a, b)
    assert_all_close(leaves_of(got), leaves_of(want), rtol=RTOL, atol=ATOL)

    per_sample = torch.func.vmap(torch.func.grad(lambda p, a, b: rev(p, a[None], b[None])), in_dims=(None, 0, 0))
    got = per_sample(p, a, b)
    loop = [torch.func.grad(ref)(p, a[i : i + 1], b[i : i + 1]) for i in range(B)]
    want = [torch.stack(ts) for ts in zip(*(leaves_of(g) for g in loop))]
    assert_all_close(leaves_of(got), want, rtol=RTOL, atol=ATOL)


def test_the_compiled_reversible_vjp_step():
    blocks, params, x1, x2 = flow(depth=2)
    p, a, b = detached(params), x1.detach(), x2.detach()

    def step(p, a, b):
        (y1, y2, ld), pullback = revfunc.reversible_vjp(blocks, p, a, b, coupling=C, return_logdet=True)
        (dy1, dy2, dld), value = torch.func.grad_and_value(nll, argnums=(0, 1, 2))(y1, y2, ld)
        dparams, dx1, dx2 = pullback(dy1, dy2, dld)
        return dparams, dx1, dx2, value

    want = torch.func.grad(lambda p, a, b: nll(*hand_flow(blocks, p, a, b)), argnums=(0, 1, 2))(p, a, b)
    leaves_of = torch.utils._pytree.tree_leaves
    for fn in (step, torch.compile(step, fullgraph=True)):
        dparams, dx1, dx2, _ = fn(p, a, b)
        got = [*leaves_of(dparams), dx1, dx2]
        assert_all_close(got, [*leaves_of(want[0]), want[1], want[2]], rtol=RTOL, atol=ATOL)


def test_sampling_with_the_inverse_and_the_property_tests():
    blocks, params, x1, x2 = flow()
    with torch.no_grad():
        y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C)
        z1, z2 = revfunc.reversible_inverse(blocks, params, y1, y2, coupling=C)
    assert_all_close([z1, z2], [x1, x2], rtol=1e-9, atol=1e-12)
    errors = revfunc.reconstruction_error(blocks, params, x1, x2, coupling=C)
    assert len(errors) == len(blocks) and max(errors) < 1e-12
    revfunc.testing.assert_invertible(blocks, params, x1, x2, coupling=C)
    revfunc.testing.assert_gradients_match(blocks, params, x1, x2, coupling=C)
    revfunc.testing.assert_logdet_matches(blocks, detached(params), x1, x2, coupling=C)


def test_the_property_tests_take_a_layer_params_mapping_that_is_not_a_dict():
    # A layer's entry in params is any Mapping, not only a dict.
    blocks, params, x1, x2 = flow()
    i = next(k for k, b in enumerate(blocks) if b is shear)
    params[i] = types.MappingProxyType(params[i])
    revfunc.testing.assert_gradients_match(blocks, params, x1, x2, coupling=C)
    revfunc.testing.assert_logdet_matches(blocks, params, x1, x2, coupling=C)


def test_a_wrong_layer_inverse_fails_the_property_test_naming_the_block():
    bad = Invertible(_shear_forward, lambda p, y1, y2: (y1, y2), name="bad")
    blocks, params, x1, x2 = flow()
    blocks[1] = bad
    with pytest.raises(AssertionError, match="block 1's input"):
        revfunc.testing.assert_invertible(blocks, params, x1, x2, coupling=C)


def test_the_lu_map_logdet_inverse_and_gradients():
    g = torch.Generator().manual_seed(3)
    p = lu_linear_params(6, generator=g, dtype=torch.float64)
    p["upper"] = p["upper"] + 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    p["log_scale"] = p["log_scale"] + 0.2 * torch.randn(6, generator=g, dtype=torch.float64)
    for k in ("lower", "upper", "log_scale"):
        p[k].requires_grad_()
    # images (B, C, H, W): the map acts on channels at each of H * W positions
    layer = lu_linear(dim=-3, event_dim=3)
    x1, x2 = torch.randn(2, 3, 2, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 2, 5, dtype=torch.float64)
    y1, y2, logdet = layer.forward(p, x1, x2)

    def whole(z):  # one sample's map, for its Jacobian
        a, b = z.reshape(6, 2, 5).chunk(2, 0)
        u1, u2, _ = layer.forward({k: v.detach() for k, v in p.items()}, a[None], b[None])
        return torch.cat([u1, u2], 1).reshape(-1)

    jac = torch.func.jacrev(whole)(torch.cat([x1, x2], 1)[0].reshape(-1))
    torch.testing.assert_close(logdet.detach(), torch.linalg.slogdet(jac)[1], rtol=RTOL, atol=ATOL)
    # the explicit matrix W = P L U, written out by hand
    w_ref = p["permutation"] @ (torch.tril(p["lower"], -1) + torch.eye(6, dtype=torch.float64))
    w_ref = w_ref @ (torch.triu(p["upper"], 1) + torch.diag(p["sign"] * torch.exp(p["log_scale"])))
    torch.testing.assert_close(p["log_scale"].sum(), torch.linalg.slogdet(w_ref)[1], rtol=RTOL, atol=ATOL)
    back = layer.inverse(p, y1, y2)
    assert_all_close(list(back), [x1, x2], rtol=1e-10, atol=1e-12)
    # gradients through it, against the explicit matrix in plain autograd
    ref = torch.einsum("oc,bchw->bohw", w_ref, torch.cat([x1, x2], 1))
    keys = ("lower", "upper", "log_scale")
    want = torch.autograd.grad((ref**3).sum() + 0.5 * 20 * p["log_scale"].sum(), [p[k] for k in keys])
    per_sample = torch.broadcast_to(logdet, (2,))  # a scalar: the same map for every sample
    got = torch.autograd.grad((torch.cat([y1, y2], 1) ** 3).sum() + 0.5 * per_sample.sum(), [p[k] for k in keys])
    assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)


def test_refusals_name_the_block_and_the_layer():
    blocks, params, x1, x2 = flow()
    params[1] = ({}, {})
    with pytest.raises(TypeError, match=r"params\[1\] expected a dict, the parameters of block 1's invertible layer"):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C)
    blocks, params, x1, x2 = flow()
    blocks[1] = Invertible(lambda p, a, b: (a, b[:, :1], 0.0), _shear_inverse, name="narrow")
    with pytest.raises(ValueError, match=r"block 1 invertible layer Invertible\(narrow\) forward expected a second"):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C)
    blocks[1] = Invertible(lambda p, a, b: (a, b, torch.zeros(7)), _shear_inverse, name="ld")
    with pytest.raises(ValueError, match=r"block 1 invertible layer Invertible\(ld\) forward expected a log-det"):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling=C, return_logdet=True)
    with pytest.raises(ValueError, match="a permutation of range"):
        permute(torch.tensor([0, 0, 1, 2]))


def _freia_flow(depth, dims=8):
    Ff = pytest.importorskip("FrEIA.framework", reason="FrEIA is not installed (pip install FrEIA==0.2)")
    Fm = pytest.importorskip("FrEIA.modules")
    from torch import nn

    def subnet(c_in, c_out):
        return nn.Sequential(nn.Linear(c_in, 16), nn.Tanh(), nn.Linear(16, c_out))

    torch.manual_seed(0)
    inn = Ff.SequenceINN(dims)
    for k in range(depth):
        inn.append(Fm.GLOWCouplingBlock, subnet_constructor=subnet, clamp=2.0)
        inn.append(Fm.PermuteRandom, seed=k)
    return inn.double()


def test_a_freia_glow_flow_rebuilt_in_revfunc_gives_the_same_numbers():
    inn = _freia_flow(depth=3)
    blocks, params = revfunc.invertible.from_freia(inn)  # GLOW's subnet2 is f, subnet1 is g
    assert [type(b) is tuple for b in blocks] == [True, False] * 3
    x = torch.randn(5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, jac = inn(x)
    y1, y2, logdet = revfunc.reversible_sequence(blocks, params, x[:, :4], x[:, 4:], coupling=C, return_logdet=True)
    assert_all_close([torch.cat([y1, y2], -1), logdet], [z, jac], rtol=RTOL, atol=ATOL)
    # NLL gradients
    weights = list(inn.parameters())
    weights = [w for w in weights if w.requires_grad]

    def nll_of(z, jac):
        return (0.5 * (z**2).sum(-1) - jac).mean()

    want = torch.autograd.grad(nll_of(*inn(x)), weights)
    y1, y2, logdet = revfunc.reversible_sequence(blocks, params, x[:, :4], x[:, 4:], coupling=C, return_logdet=True)
    got = torch.autograd.grad(nll_of(torch.cat([y1, y2], -1), logdet), weights)
    assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)
    # sampling: the inverse of z gives back x, and equals FrEIA's reverse pass
    with torch.no_grad():
        b1, b2 = revfunc.reversible_inverse(blocks, params, z[:, :4].contiguous(), z[:, 4:].contiguous(), coupling=C)
        back, _ = inn(z, rev=True)
    assert_all_close([torch.cat([b1, b2], -1), torch.cat([b1, b2], -1)], [x, back], rtol=1e-9, atol=1e-12)
