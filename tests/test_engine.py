"""One engine: every public path runs the same plan, walk and branch call, so each check
holds on every path, and the cases the old per-path loops got silently wrong are right."""

import functools
import warnings

import pytest
import torch
from helpers import assert_all_close, inputs
from torch import nn

import revfunc
import revfunc.nn as rnn
from revfunc.testing import assert_gradients_match, assert_invertible

RTOL = 1e-10
DIM = 4


# --- branches: block 1's f is broken, block 0 and every g are fine ----------------------


class Good(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)

    def forward(self, x):
        return torch.tanh(self.lin(x))


class WrongShape(Good):
    def forward(self, x):
        return super().forward(x)[..., :1]  # (*, 1): broadcasts in x + f(x)


class WritesInput(Good):
    def forward(self, x):
        x.mul_(1.0)
        return super().forward(x)


class UpdatesState(Good):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls.add_(1)
        return super().forward(x)


class DrawsRandom(Good):
    def forward(self, x):
        return super().forward(x) + 0.01 * torch.rand_like(x)


BROKEN = {
    "shape": WrongShape,
    "inplace_input": WritesInput,
    "state": UpdatesState,
    "keyword": Good,
    "random": DrawsRandom,
}
# (error type, message) each case raises on every path where it applies.
EXPECTED = {
    "shape": (ValueError, r"block 1 branch f expected an output shaped like its input \(3, 4\), got shape \(3, 1\)"),
    "inplace_input": (ValueError, r"block 1 branch f modified its input x in place"),
    "state": (ValueError, r"block 1 branch f modified parameter/buffer 'calls' \(module '<root>', UpdatesState\)"),
    "keyword": (TypeError, r"block 1 branch f \(.*\) raised: .*unexpected keyword argument 'scale'"),
    "random": (RuntimeError, r"block 1 branch f drew random numbers from the global RNG"),
}
# Plain-autograd paths keep plain semantics, as the classic code does: in-place writes and
# state updates are legal there. Random draws are replayed from seeds on every path but
# the two that take deterministic=True (and the nn adapter, which sets it).
PLAIN_PATHS = {"sequential_sequence", "coupling", "coupling_inverse", "nn.SequentialSequence"}
DETERMINISTIC_PATHS = {"reversible_sequence", "reversible_vjp", "nn.ReversibleSequence"}
PATHS = (
    "reversible_sequence",
    "sequential_sequence",
    "reversible_inverse",
    "reconstruction_error",
    "reversible_vjp",
    "coupling",
    "coupling_inverse",
    "assert_invertible",
    "assert_gradients_match",
    "nn.ReversibleSequence",
    "nn.SequentialSequence",
)


def broken_layers(case):
    torch.manual_seed(0)
    return nn.ModuleList([nn.ModuleList([Good(), Good()]), nn.ModuleList([BROKEN[case](), Good()])]).double()


def run_path(path, case):
    layers = broken_layers(case)
    blocks, params = revfunc.pure_blocks(layers)
    x1, x2 = inputs((3, DIM))
    kwargs = [({}, {}), ({"scale": 2.0}, {})] if case == "keyword" else None
    deterministic = {"deterministic": True} if case == "random" else {}
    if path == "reversible_sequence":
        y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2, kwargs=kwargs, **deterministic)
        (y1 + y2).sum().backward()
    elif path == "sequential_sequence":
        y1, y2 = revfunc.sequential_sequence(blocks, params, x1, x2, kwargs=kwargs)
        (y1 + y2).sum().backward()
    elif path == "reversible_inverse":
        revfunc.reversible_inverse(blocks, params, x1, x2, kwargs=kwargs)
    elif path == "reconstruction_error":
        revfunc.reconstruction_error(blocks, params, x1, x2, kwargs=kwargs)
    elif path == "reversible_vjp":
        (y1, y2), pullback = revfunc.reversible_vjp(blocks, params, x1, x2, kwargs=kwargs, **deterministic)
        pullback(torch.ones_like(y1), torch.ones_like(y2))
    elif path in ("coupling", "coupling_inverse"):  # the broken block alone: it is block 0 there
        fn = revfunc.coupling if path == "coupling" else revfunc.coupling_inverse
        (f, g), (fp, gp) = blocks[1], params[1]
        fn(f, g, fp, gp, x1 * 1, x2 * 1, f_kwargs=kwargs[1][0] if kwargs else None)  # not leaves: in-place legal
    elif path == "assert_invertible":
        assert_invertible(blocks, params, x1, x2, kwargs=kwargs)
    elif path == "assert_gradients_match":
        assert_gradients_match(blocks, params, x1, x2, kwargs=kwargs)
    else:
        route = {"scale": ((False, False), (True, False))} if case == "keyword" else {}
        model = (rnn.ReversibleSequence if path == "nn.ReversibleSequence" else rnn.SequentialSequence)(layers, route)
        call_kwargs = {"scale": 2.0} if case == "keyword" else {}
        model(x1, **call_kwargs).sum().backward()


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("path", PATHS)
def test_every_check_holds_on_every_path(path, case):
    legal = (case in ("inplace_input", "state") and path in PLAIN_PATHS) or (
        case == "random" and path not in DETERMINISTIC_PATHS
    )
    if legal:
        run_path(path, case)  # plain-autograd semantics (documented): no error
        return
    error, message = EXPECTED[case]
    if path in ("coupling", "coupling_inverse"):
        message = message.replace("block 1", "block 0")
    with pytest.raises(error, match=message):
        run_path(path, case)


# --- branches that return their input, or a parameter, itself ---------------------------


class ReturnsParameter(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(shape, dtype=torch.float64))

    def forward(self, x):
        return self.pos


def identity_like_branches():
    return {
        "nn.Identity": nn.Identity(),
        "nn.Dropout in eval": nn.Dropout(0.5).eval(),
        "x.contiguous()": _Lambda(lambda x: x.contiguous()),
        "x.to(x.dtype)": _Lambda(lambda x: x.to(x.dtype)),
        "returns a parameter": ReturnsParameter((3, DIM)),
    }


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def plain_reference(layers, x):
    """The same coupling written by hand in plain autograd: y1 + y2 and its gradients."""
    x1 = x2 = x
    for f, g in layers:
        x1 = x1 + f(x2)
        x2 = x2 + g(x1)
    return x1 + x2


@pytest.mark.parametrize("name", sorted(identity_like_branches()))
def test_a_branch_returning_its_input_itself_gets_plain_autograds_gradients(name):
    torch.manual_seed(0)
    g = identity_like_branches()[name]
    layers = nn.ModuleList([nn.ModuleList([Good().double(), g]), nn.ModuleList([Good().double(), Good().double()])])
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    live = [x, *layers.parameters()]
    got = torch.autograd.grad(rnn.ReversibleSequence(layers)(x).pow(2).sum(), live)
    want = torch.autograd.grad(plain_reference(layers, x).pow(2).sum(), live)
    assert_all_close(got, want, rtol=RTOL)


def test_an_identity_branch_passes_gradcheck():
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(nn.ModuleList([nn.ModuleList([Good(), nn.Identity()])])).double()
    x = torch.randn(2, DIM, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))


def test_a_pure_identity_branch_under_func_grad():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(DIM, DIM, dtype=torch.float64, generator=gen)

    def f(p, x):
        return torch.tanh(x @ p["w"])

    def identity(p, x):
        return x

    blocks, params = [(f, identity), (f, f)], [({"w": w}, {}), ({"w": w * 0.5}, {"w": w * 0.3})]
    x1, x2 = inputs((3, DIM), requires_grad=False)

    def loss(seq, params):
        y1, y2 = seq(blocks, params, x1, x2)
        return (y1 * y2).sum()

    got = torch.func.grad(functools.partial(loss, revfunc.reversible_sequence))(params)
    want = torch.func.grad(functools.partial(loss, revfunc.sequential_sequence))(params)
    assert_all_close(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), rtol=RTOL)


# --- a tensor the branch uses without it being passed: refused, naming the block --------


class UsesShared(nn.Module):
    """Uses a module held in a plain Python list: not registered, so not in params."""

    def __init__(self, shared):
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.shared = [shared]

    def forward(self, x):
        return torch.tanh(self.lin(x) + self.shared[0](x))


def test_an_unregistered_parameter_is_refused_on_backward_naming_the_block():
    torch.manual_seed(0)
    shared = nn.Linear(DIM, DIM).double()
    layers = nn.ModuleList([nn.ModuleList([Good(), Good()]), nn.ModuleList([UsesShared(shared), Good()])]).double()
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    # Plain autograd gives it a gradient; revfunc could not, so it refuses instead of None.
    plain_reference(layers, x).pow(2).sum().backward()
    assert shared.weight.grad is not None and shared.weight.grad.norm() > 0
    with pytest.raises(
        RuntimeError,
        match=r"block 1 branch f .* uses a tensor that requires grad but was not "
        r"passed to it \(shape \(4, 4\)",
    ):
        rnn.ReversibleSequence(layers)(x).pow(2).sum().backward()


def test_a_closure_captured_parameter_is_refused_functionally_and_a_constant_under_func_grad():
    w = nn.Parameter(torch.randn(DIM, DIM, dtype=torch.float64))

    def f(p, x):
        return torch.tanh(x @ p["w"] + x @ w)  # w: closed over

    blocks = [(f, f)] * 2
    params = [({"w": torch.eye(DIM, dtype=torch.float64, requires_grad=True)},) * 2] * 2
    x1, x2 = inputs((3, DIM))
    y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2)
    with pytest.raises(RuntimeError, match=r"block 1 branch g .* uses a tensor that requires grad"):
        (y1 + y2).sum().backward()
    with pytest.raises(RuntimeError, match=r"block 1 branch g .* uses a tensor that requires grad"):
        (z1, z2), pullback = revfunc.reversible_vjp(blocks, params, x1, x2)
        pullback(torch.ones_like(z1), torch.ones_like(z2))

    # Under torch.func, closed-over tensors are constants by design: same as plain autograd.
    def loss(seq, p):
        a, b = seq(blocks, p, x1.detach(), x2.detach())
        return (a * b).sum()

    detached = [tuple({k: v.detach() for k, v in d.items()} for d in pair) for pair in params]
    got = torch.func.grad(functools.partial(loss, revfunc.reversible_sequence))(detached)
    want = torch.func.grad(functools.partial(loss, revfunc.sequential_sequence))(detached)
    assert_all_close(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), rtol=RTOL)


# --- forward hooks: warned about once ---------------------------------------------------


def test_forward_hooks_on_a_branch_module_are_warned_about_once():
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.ModuleList([Good(), Good()]) for _ in range(2)]).double()
    captured = []
    layers[1][0].lin.register_forward_hook(lambda module, args, out: captured.append(out))
    model = rnn.ReversibleSequence(layers)
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    # The hook keeps its capture, a tensor computed from the block's input: warned too.
    with pytest.warns(
        UserWarning,
        match=r"block 1 branch f \(PureModule\(Good\)\) kept a tensor computed from its "
        r"input beyond its forward call",
    ):
        with pytest.warns(
            UserWarning,
            match=r"block 1 branch f has forward hooks on submodule 'lin' \(Linear\).*"
            r"fire twice",
        ):
            model(x).sum().backward()
    assert len(captured) == 2  # forward and the backward's recomputation, as the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # once per module


# --- inference mode, and double backward through torch.utils.checkpoint -----------------


def test_inference_mode_works_like_no_grad():
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.ModuleList([Good(), Good()]) for _ in range(3)]).double()
    model = rnn.ReversibleSequence(layers)
    blocks, params = revfunc.pure_blocks(layers)
    x1, x2 = inputs((3, DIM), requires_grad=False)
    with torch.no_grad():
        want = (
            model(x1),
            revfunc.reversible_sequence(blocks, params, x1, x2),
            revfunc.reversible_inverse(blocks, params, x1, x2),
        )
    with torch.inference_mode():
        got = (
            model(x1),
            revfunc.reversible_sequence(blocks, params, x1, x2),
            revfunc.reversible_inverse(blocks, params, x1, x2),
        )
    assert_all_close(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want), rtol=0, atol=0)


class Checkpointed(Good):
    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=False)


def test_double_backward_through_a_branch_using_torch_checkpoint():
    torch.manual_seed(0)
    layers = nn.ModuleList([nn.ModuleList([Checkpointed(), Good()]) for _ in range(2)]).double()
    x = torch.randn(3, DIM, dtype=torch.float64, requires_grad=True)
    live = [x, *layers.parameters()]

    def second_order(y):
        grads = torch.autograd.grad(y.pow(2).sum(), live, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), live)

    assert_all_close(
        second_order(rnn.ReversibleSequence(layers)(x)), second_order(plain_reference(layers, x)), rtol=1e-9
    )


def test_an_output_dtype_that_widens_the_stream_is_refused():
    def widens(p, x):
        return x.double().tanh()

    x1, x2 = inputs((3, DIM), dtype=torch.float32)
    for call in (revfunc.reversible_sequence, revfunc.sequential_sequence):
        with pytest.raises(
            TypeError,
            match=r"block 0 branch f expected a floating output no wider than its "
            r"input's dtype torch.float32, got dtype torch.float64",
        ):
            call([(widens, widens)], [({}, {})], x1, x2)
