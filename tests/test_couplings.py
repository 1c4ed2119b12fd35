"""Couplings: each built-in and a user's own, against the same math written by hand in
plain autograd (float64, rtol 1e-10), on every path that runs blocks; log-dets against
``slogdet(jacrev(...))``; per-branch and per-block couplings; the nn adapter on
``(B, C, H, W)`` split on channels; refusals."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import assert_all_close
from torch import nn

import revfunc
import revfunc.nn as rnn
from revfunc.couplings import Coupling, additive, affine, momentum, scaled

RTOL, ATOL = 1e-10, 1e-12
D, B, DEPTH = 4, 3, 3


def _cubic(x, h):  # a user's coupling: y = x + x^3 / 3 + h is monotone, inverted by Newton steps
    return x + x**3 / 3 + h


def _cubic_inverse(y, h):
    x = y - h
    for _ in range(60):
        x = x - (x + x**3 / 3 + h - y) / (1 + x**2)
    return x


CUSTOM = Coupling(_cubic, _cubic_inverse, lambda x, h: torch.log1p(x**2), name="cubic()", output="tensor")


def _scale_shift(h):  # a user's prepare: h (twice x's width) -> (a > 0, t), once per update
    return torch.nn.functional.softplus(h[..., :D]) + 0.5, h[..., D:]


PREPARED = Coupling(
    lambda x, at: x * at[0] + at[1],
    lambda y, at: (y - at[1]) / at[0],
    lambda x, at: torch.log(at[0]),
    name="scale_shift()",
    output="pair",
    prepare=_scale_shift,
)


def hand_update(name, x, h):
    """``(y, elementwise log|dy/dx|)`` for each coupling, written out independently."""
    if name == "additive":
        return x + h, torch.zeros_like(x)
    if name == "scaled":
        return 0.7 * x + h, torch.full_like(x, math.log(0.7))
    if name == "momentum":
        return 0.9 * x + 0.1 * h, torch.full_like(x, math.log(0.9))
    if name == "affine":
        s_raw, t = h[..., :D], h[..., D:]
        s = 2.0 * 0.636 * torch.atan(s_raw)
        return x * torch.exp(s) + t, s
    if name == "affine_pair":
        s = 1.5 * 0.636 * torch.atan(h[0])
        return x * torch.exp(s) + h[1], s
    if name == "custom":
        return x + x**3 / 3 + h, torch.log1p(x**2)
    if name == "prepared":
        a = torch.log1p(torch.exp(h[..., :D])) + 0.5
        return x * a + h[..., D:], torch.log(a)
    raise ValueError(name)


COUPLINGS = {
    "additive": additive(),
    "scaled": scaled(0.7),
    "momentum": momentum(0.9),
    "affine": affine(),
    "affine_pair": affine(clamp=1.5),
    "custom": CUSTOM,
    "prepared": PREPARED,
}


def branch(p, x):
    return torch.tanh(x @ p["w"] + p["b"]) * 0.5


def pair_branch(p, x):  # affine's (s_raw, t) as a pair
    out = torch.tanh(x @ p["w"] + p["b"]) * 0.5
    return out[..., :D], out[..., D:]


def make(name, depth=DEPTH, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * D if name.startswith("affine") or name == "prepared" else D

    def p():
        return {
            "w": (torch.randn(D, width, generator=gen, dtype=torch.float64) / D**0.5).requires_grad_(),
            "b": (torch.randn(width, generator=gen, dtype=torch.float64) * 0.1).requires_grad_(),
        }

    fn = pair_branch if name == "affine_pair" else branch
    blocks = [(fn, fn)] * depth
    params = [(p(), p()) for _ in range(depth)]
    x1 = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    x2 = torch.randn(B, D, generator=gen, dtype=torch.float64).requires_grad_()
    return blocks, params, x1, x2


def hand_stack(name, blocks, params, x1, x2):
    logdet = torch.zeros(x1.shape[:-1], dtype=x1.dtype)
    for (f, g), (fp, gp) in zip(blocks, params):
        x1, term = hand_update(name, x1, f(fp, x2))
        logdet = logdet + term.sum(-1)
        x2, term = hand_update(name, x2, g(gp, x1))
        logdet = logdet + term.sum(-1)
    return x1, x2, logdet


def loss(y1, y2, logdet):
    return (y1**2).sum() + torch.sin(y2).sum() * 0.5 - 0.3 * logdet.sum()


def leaves(params):
    return [t for pair in params for d in pair for t in d.values()]


def detached(params):
    return [tuple({k: v.detach() for k, v in d.items()} for d in pair) for pair in params]


@pytest.mark.parametrize("name", COUPLINGS)
def test_outputs_and_logdet_equal_the_hand_written_math(name):
    blocks, params, x1, x2 = make(name)
    want = hand_stack(name, blocks, params, x1, x2)
    for fn in (revfunc.reversible_sequence, revfunc.sequential_sequence):
        got = fn(blocks, params, x1, x2, coupling=COUPLINGS[name], return_logdet=True)
        assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("checkpoint_every", [None, 2])
@pytest.mark.parametrize("name", COUPLINGS)
def test_gradients_of_a_loss_with_the_logdet_under_backward(name, checkpoint_every):
    blocks, params, x1, x2 = make(name)
    want = torch.autograd.grad(loss(*hand_stack(name, blocks, params, x1, x2)), [x1, x2, *leaves(params)])
    out = revfunc.reversible_sequence(
        blocks, params, x1, x2, coupling=COUPLINGS[name], return_logdet=True, checkpoint_every=checkpoint_every
    )
    loss(*out).backward()
    got = [x1.grad, x2.grad, *(t.grad for t in leaves(params))]
    assert_all_close(got, list(want), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", COUPLINGS)
def test_create_graph_gradients_and_their_gradients(name):
    # The recorded backward: first-order gradients, then the gradient of their squared
    # norm (a gradient penalty). A coupling's vjp in h is the partial one, with the
    # rebuilt half held fixed: going through the rebuilt half would add a wrong term.
    blocks, params, x1, x2 = make(name)
    wrt = [x1, x2, *leaves(params)]

    def first_and_second(out):
        grads = torch.autograd.grad(loss(*out), wrt, create_graph=True)
        penalty = sum((g**2).sum() for g in grads)
        return [*grads, *torch.autograd.grad(penalty, wrt)]

    want = first_and_second(hand_stack(name, blocks, params, x1, x2))
    c = COUPLINGS[name]
    got = first_and_second(revfunc.reversible_sequence(blocks, params, x1, x2, coupling=c, return_logdet=True))
    assert_all_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", COUPLINGS)
def test_gradients_under_func_grad_and_vmap_grad(name):
    blocks, params, x1, x2 = make(name)
    p, a, b = detached(params), x1.detach(), x2.detach()
    c = COUPLINGS[name]

    def rev(p, a, b):
        return loss(*revfunc.reversible_sequence(blocks, p, a, b, coupling=c, return_logdet=True))

    def ref(p, a, b):
        return loss(*hand_stack(name, blocks, p, a, b))

    got = torch.func.grad(rev, argnums=(0, 1, 2))(p, a, b)
    want = torch.func.grad(ref, argnums=(0, 1, 2))(p, a, b)
    leaves_of = torch.utils._pytree.tree_leaves
    assert_all_close(leaves_of(got), leaves_of(want), rtol=RTOL, atol=ATOL)

    def per_sample(fn):
        return torch.func.vmap(torch.func.grad(lambda p, a, b: fn(p, a[None], b[None])), in_dims=(None, 0, 0))

    got = per_sample(rev)(p, a, b)
    loop = [torch.func.grad(ref)(p, a[i : i + 1], b[i : i + 1]) for i in range(B)]
    want = [torch.stack(ts) for ts in zip(*(leaves_of(g) for g in loop))]
    assert_all_close(leaves_of(got), want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", COUPLINGS)
def test_the_inverse_round_trip_and_reconstruction_error(name):
    blocks, params, x1, x2 = make(name)
    c = COUPLINGS[name]
    with torch.no_grad():
        y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=c)
        z1, z2 = revfunc.reversible_inverse(blocks, params, y1, y2, coupling=c)
    assert_all_close([z1, z2], [x1, x2], rtol=1e-9, atol=1e-12)
    errors = revfunc.reconstruction_error(blocks, params, x1, x2, coupling=c)
    assert len(errors) == DEPTH and max(errors) < 1e-12


@pytest.mark.parametrize("name", COUPLINGS)
def test_the_logdet_equals_slogdet_of_the_jacobian_per_sample(name):
    blocks, params, x1, x2 = make(name)
    p, c = detached(params), COUPLINGS[name]
    _, _, logdet = revfunc.reversible_sequence(blocks, p, x1.detach(), x2.detach(), coupling=c, return_logdet=True)

    def stack(z):
        y1, y2 = revfunc.sequential_sequence(blocks, p, z[None, :D], z[None, D:], coupling=c)
        return torch.cat([y1[0], y2[0]])

    for i in range(B):
        jac = torch.func.jacrev(stack)(torch.cat([x1[i], x2[i]]).detach())
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac)[1], rtol=RTOL, atol=ATOL)
    revfunc.testing.assert_logdet_matches(blocks, p, x1, x2, coupling=c)


def test_meft_pairs_and_per_block_lists_equal_the_hand_written_math():
    blocks, params, x1, x2 = make("scaled")
    # (update, elementwise log-det) by letter: scaled(0.1), additive, momentum(0.9)
    by_hand = {
        "s": (lambda x, h: 0.1 * x + h, math.log(0.1)),
        "a": (lambda x, h: x + h, 0.0),
        "m": (lambda x, h: 0.9 * x + 0.1 * h, math.log(0.9)),
    }

    def hand(letters):
        a, b, logdet = x1, x2, torch.zeros(B, dtype=torch.float64)
        for (f, g), (fp, gp), (cf, cg) in zip(blocks, params, letters):
            a = by_hand[cf][0](a, f(fp, b))
            b = by_hand[cg][0](b, g(gp, a))
            logdet = logdet + D * (by_hand[cf][1] + by_hand[cg][1])
        return a, b, logdet

    meft = (scaled(0.1), additive())  # MEFT: lambda on f's update, g additive
    cases = [
        (meft, [("s", "a")] * DEPTH),
        ([meft, (additive(), momentum(0.9)), (momentum(0.9), scaled(0.1))], [("s", "a"), ("a", "m"), ("m", "s")]),
    ]
    for spec, letters in cases:
        want = hand(letters)
        got = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=spec, return_logdet=True)
        assert_all_close(list(got), list(want), rtol=RTOL, atol=ATOL)
        g_want = torch.autograd.grad(loss(*want), [x1, x2, *leaves(params)])
        g_got = torch.autograd.grad(loss(*got), [x1, x2, *leaves(params)])
        assert_all_close(list(g_got), list(g_want), rtol=RTOL, atol=ATOL)


def test_the_additive_coupling_is_bitwise_the_default():
    blocks, params, x1, x2 = make("scaled")
    a = revfunc.reversible_sequence(blocks, params, x1, x2)
    b = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=additive())
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    ga = torch.autograd.grad(loss(*a, torch.zeros(B)), leaves(params))
    gb = torch.autograd.grad(loss(*b, torch.zeros(B)), leaves(params))
    assert all(torch.equal(u, v) for u, v in zip(ga, gb))


@pytest.mark.parametrize("name", ["scaled", "momentum", "affine", "affine_pair"])
def test_each_built_in_closed_form_vjp_equals_autograd_on_its_forward_and_logdet(name):
    c = COUPLINGS[name]
    g = torch.Generator().manual_seed(3)
    x, dy, dld = (torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(3))
    h = torch.randn(B, 2 * D if name.startswith("affine") else D, generator=g, dtype=torch.float64)
    p = c.prepared(h)

    def forward_and_logdet(x, p):
        return c.forward(x, p), torch.broadcast_to(c.logdet(x, p), x.shape)

    want = torch.func.vjp(forward_and_logdet, x, p)[1]((dy, dld))
    got = c.vjp(x, p, dy, dld)
    leaves = torch.utils._pytree.tree_leaves
    assert_all_close(leaves(got), leaves(want), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", ["affine", "affine_pair"])
def test_affine_called_directly_on_a_branch_output_prepares_it_itself(name):
    # The engine passes prepare(h); a direct call with h itself must give the same
    # (clamped) numbers, never silently skip the clamp.
    c = COUPLINGS[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    h = torch.randn(B, 2 * D, generator=g, dtype=torch.float64) * 3
    if name == "affine_pair":
        h = (h[:, :D], h[:, D:])
    y, term = hand_update(name, x, h)
    for given in (h, c.prepared(h)):
        assert_all_close([c.forward(x, given), c.logdet(x, given)], [y, term], rtol=RTOL, atol=ATOL)
        assert_all_close([c.inverse(y, given)], [x], rtol=1e-12, atol=1e-12)


def test_a_wrong_closed_form_vjp_is_caught_by_assert_gradients_match():
    # The backward trusts a coupling's vjp; the property test compares it with plain
    # autograd on its forward, so a wrong one fails there.
    blocks, params, x1, x2 = make("scaled")
    wrong = Coupling(
        lambda x, h: 0.7 * x + h,
        lambda y, h: (y - h) / 0.7,
        name="wrong_vjp()",
        output="tensor",
        vjp=lambda x, h, dy, dterm: (dy, dy),  # dx should be 0.7 dy
    )
    p = detached(params)
    with pytest.raises(AssertionError, match="gradient"):
        revfunc.testing.assert_gradients_match(blocks, p, x1.detach(), x2.detach(), coupling=wrong)
    right = dataclasses.replace(wrong, vjp=lambda x, h, dy, dterm: (0.7 * dy, dy))
    revfunc.testing.assert_gradients_match(blocks, p, x1.detach(), x2.detach(), coupling=right)
    # Misshapen results are refused, naming the block, the branch and the coupling.
    for vjp, match in (
        (lambda x, h, dy, dterm: 0.7 * dy, "a pair"),
        (lambda x, h, dy, dterm: ((0.7 * dy).reshape(-1), dy), "dx shaped like the half"),
        (lambda x, h, dy, dterm: (0.7 * dy, (dy, dy)), "prepared output's structure"),
    ):
        out = revfunc.reversible_sequence(blocks, params, x1, x2, coupling=dataclasses.replace(wrong, vjp=vjp))
        named = rf"block \d branch [fg]'s coupling wrong_vjp\(\): its vjp.*{match}"
        with pytest.raises((TypeError, ValueError), match=named):
            sum(t.sum() for t in out).backward()


def test_an_error_inside_a_coupling_names_the_block_the_branch_and_the_coupling():
    # On the forward (forward, logdet), the inverse walk (inverse) and the backward (vjp),
    # on the eager and the torch.func paths: one wrapper for every coupling call.
    blocks, params, x1, x2 = make("scaled")
    good = Coupling(lambda x, h: 0.7 * x + h, lambda y, h: (y - h) / 0.7, name="good()", output="tensor")

    def fails(x, *rest):
        raise TypeError("an unsupported operand")

    def run(c, path):
        if path == "inverse":
            return revfunc.reversible_inverse(blocks, detached(params), x1.detach(), x2.detach(), coupling=c)
        kw = {"coupling": c, "return_logdet": c.logdet is not None}
        if path == "func_grad":
            return torch.func.grad(
                lambda p: sum(t.sum() for t in revfunc.reversible_sequence(blocks, p, x1.detach(), x2.detach(), **kw))
            )(detached(params))
        out = revfunc.reversible_sequence(blocks, params, x1, x2, **kw)
        return torch.autograd.grad(sum(t.sum() for t in out), x1)

    cases = (
        (dataclasses.replace(good, forward=fails), "backward"),
        (dataclasses.replace(good, logdet=fails), "backward"),
        (dataclasses.replace(good, inverse=fails), "inverse"),
        (dataclasses.replace(good, inverse=fails), "backward"),
        (dataclasses.replace(good, vjp=fails), "backward"),
        (dataclasses.replace(good, vjp=fails), "func_grad"),
    )
    for c, path in cases:
        container = "reversible_inverse" if path == "inverse" else "reversible_sequence"
        named = rf"revfunc\.{container}: block \d branch [fg]'s coupling good\(\) raised: an unsupported operand"
        with pytest.raises(TypeError, match=named):
            run(c, path)


def test_the_compiled_reversible_vjp_step_takes_dlogdet():
    blocks, params, x1, x2 = make("affine", depth=2)
    p, a, b = detached(params), x1.detach(), x2.detach()

    def step(p, a, b):
        (y1, y2, logdet), pullback = revfunc.reversible_vjp(blocks, p, a, b, coupling=affine(), return_logdet=True)
        (dy1, dy2, dld), value = torch.func.grad_and_value(loss, argnums=(0, 1, 2))(y1, y2, logdet)
        dparams, dx1, dx2 = pullback(dy1, dy2, dld)
        return dparams, dx1, dx2, value

    want = torch.func.grad(lambda p, a, b: loss(*hand_stack("affine", blocks, p, a, b)), argnums=(0, 1, 2))(p, a, b)
    for fn in (step, torch.compile(step, fullgraph=True)):
        dparams, dx1, dx2, _ = fn(p, a, b)
        got = [*torch.utils._pytree.tree_leaves(dparams), dx1, dx2]
        assert_all_close(got, [*torch.utils._pytree.tree_leaves(want[0]), want[1], want[2]], rtol=RTOL, atol=ATOL)


def test_a_branch_output_the_coupling_cannot_use_is_refused_naming_block_and_branch():
    blocks, params, x1, x2 = make("scaled")  # branches output the half's width, not twice it
    with pytest.raises(
        ValueError,
        match=r"^revfunc.reversible_sequence: block 0 branch f expected for "
        r"affine\(clamp=2.0, dim=-1\) an output \(s, t\) of two tensors shaped like "
        r"its input \(3, 4\), or one tensor of shape \(3, 8\).*got shape \(3, 4\)",
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling=affine())
    with pytest.raises(ValueError, match=r"coupling expected one \(c_f, c_g\) pair per block \(3\), got 2 entries"):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling=[(additive(), additive())] * 2)
    with pytest.raises(TypeError, match=r"coupling expected None, a revfunc.couplings.Coupling"):
        revfunc.reversible_sequence(blocks, params, x1, x2, coupling="affine")
    with pytest.raises(ValueError, match=r"scaled: a expected a finite nonzero float, got 0"):
        scaled(0)
    with pytest.raises(ValueError, match=r"momentum: gamma expected a float in \(0.0, 1.0\], got 1.5"):
        momentum(1.5)


# --- the nn adapter: a CNN RevNet split on channels ------------------------------------


class ConvBranch(nn.Module):
    def __init__(self, channels, out):
        super().__init__()
        self.conv = nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x)) * 0.5


def _cnn_layers(depth=3, channels=4):
    torch.manual_seed(0)
    half = channels // 2
    return nn.ModuleList(
        nn.ModuleList([ConvBranch(half, channels), ConvBranch(half, channels)]) for _ in range(depth)
    ).double()


@pytest.mark.parametrize("checkpoint_every", [None, 2])
def test_a_cnn_revnet_split_on_channels_with_affine_couplings(checkpoint_every):
    layers = _cnn_layers()
    model = rnn.ReversibleSequence(layers, coupling=affine(dim=1), split_dim=1, checkpoint_every=checkpoint_every)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    y, logdet = model(x, return_logdet=True)
    # The same math by hand: halves on channels, (s_raw, t) on the branch output's channels.
    a, b = x[:, :2], x[:, 2:]
    want_logdet = torch.zeros(2, dtype=torch.float64)
    for f, g in layers:
        h = f(b)
        s = 2.0 * 0.636 * torch.atan(h[:, :2])
        a = a * torch.exp(s) + h[:, 2:]
        want_logdet = want_logdet + s.sum((1, 2, 3))
        h = g(a)
        s = 2.0 * 0.636 * torch.atan(h[:, :2])
        b = b * torch.exp(s) + h[:, 2:]
        want_logdet = want_logdet + s.sum((1, 2, 3))
    want = torch.cat([a, b], 1)
    assert logdet.shape == (2,)
    assert_all_close([y, logdet], [want, want_logdet], rtol=RTOL, atol=ATOL)
    params = list(layers.parameters())
    got = torch.autograd.grad((y**2).sum() - logdet.sum(), [x, *params])
    ref = torch.autograd.grad((want**2).sum() - want_logdet.sum(), [x, *params])
    assert_all_close(list(got), list(ref), rtol=RTOL, atol=ATOL)
    assert_all_close([model.inverse(y.detach())], [x.detach()], rtol=1e-9, atol=1e-12)
    plain = rnn.SequentialSequence(layers, coupling=affine(dim=1), split_dim=1)
    assert_all_close(list(plain(x, return_logdet=True)), [want, want_logdet], rtol=RTOL, atol=ATOL)
    jac = torch.func.jacrev(lambda v: plain(v[None])[0].flatten())(x[0].detach())
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac.reshape(100, 100))[1], rtol=RTOL, atol=ATOL)


def test_the_adapter_keeps_classic_keys_and_refuses_what_needs_a_split():
    layers = _cnn_layers(2)
    model = rnn.ReversibleSequence(layers, coupling=affine(dim=1), split_dim=1)
    assert all(k.startswith("blocks.") and (".f.net." in k or ".g.net." in k) for k in model.state_dict())
    fresh = rnn.ReversibleSequence(_cnn_layers(2), coupling=affine(dim=1), split_dim=1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    classic = rnn.ReversibleSequence(layers)
    with pytest.raises(ValueError, match=r"^revfunc.nn.ReversibleSequence.inverse: inverse needs split_dim"):
        classic.inverse(x)
    with pytest.raises(ValueError, match=r"^revfunc.nn.ReversibleSequence: return_logdet=True needs split_dim"):
        classic(x, return_logdet=True)
    with pytest.raises(
        ValueError,
        match=r"x needs an even last dim to split into \(x1, x2\); got "
        r"x.shape=\(2, 4, 5, 5\). For \(B, C, H, W\) images split the channels: "
        r"split_dim=1.",
    ):
        rnn.ReversibleSequence(layers, split_dim=-1)(torch.randn(2, 4, 5, 5, dtype=torch.float64))


def test_checkpoint_every_bounds_the_drift_of_a_coupling_that_divides():
    """``scaled(0.5)`` amplifies rounding by up to 4 per block in its inverse: in float32 at depth
    32 the rebuilt inputs drift past 1e-2; exact states every 2 blocks keep it near
    float32 rounding (docs/numerics.md gives the rule for k)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    dim, depth = 8, 32
    params = [
        tuple({"w": torch.randn(dim, dim, generator=gen) / dim**0.5, "b": torch.zeros(dim)} for _ in "fg")
        for _ in range(depth)
    ]
    blocks = [(branch, branch)] * depth
    x1, x2 = torch.randn(4, dim, generator=gen), torch.randn(4, dim, generator=gen)
    free = max(revfunc.reconstruction_error(blocks, params, x1, x2, coupling=scaled(0.5)))
    bounded = max(revfunc.reconstruction_error(blocks, params, x1, x2, coupling=scaled(0.5), checkpoint_every=2))
    assert free > 1e-2 and bounded < 1e-5, (free, bounded)
