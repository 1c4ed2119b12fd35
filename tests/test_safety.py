"""No silent failures: live module edits, stateful and in-place branches, mode switches,
RNG use, and bad arguments each give plain autograd's result or a clear error."""

import copy

import pytest
import torch
from helpers import assert_all_close, inputs, make_pure_stack
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import revfunc
import revfunc.nn as rnn
from revfunc.testing.blocks import mlp_layers

RTOL = 1e-10


def plain_model_grads(layers, x, generator=None):
    """Output and parameter gradients of the same stack in plain autograd (float64)."""
    blocks, params = revfunc.pure_blocks(layers)
    y1, y2 = revfunc.sequential_sequence(blocks, params, x, x, generator=generator)
    y = y1 + y2
    live = list(layers.parameters())
    return y, torch.autograd.grad(y.pow(2).sum(), live)


def adapter_grads(model, x, generator=None):
    y = model(x, generator=generator)
    live = [p for b in model.blocks for p in (*b.f.net.parameters(), *b.g.net.parameters())]
    return y, torch.autograd.grad(y.pow(2).sum(), live)


def live_layers(model):
    return nn.ModuleList(nn.ModuleList([b.f.net, b.g.net]) for b in model.blocks)


def small_model(depth=2, dim=4, dropout=0.0):
    torch.manual_seed(0)
    return rnn.ReversibleSequence(mlp_layers(depth, dim, hidden=8, dropout=dropout).double())


X = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


# --- 1. modules changed after construction -------------------------------------------


class Scaled(nn.Module):
    """Uses a parameter ``scale`` if one is registered (after construction, in the test)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        out = torch.tanh(self.lin(x))
        return out * self.scale if hasattr(self, "scale") else out


@pytest.mark.parametrize("edit", ["replace_net", "replace_inner", "weight_norm", "register_parameter"])
def test_modules_edited_after_construction_are_followed(edit):
    model = small_model()
    if edit == "replace_net":
        new = nn.Linear(4, 4).double()
        nn.init.zeros_(new.weight)
        model.blocks[0].f.net = new
    elif edit == "replace_inner":
        model.blocks[1].g.net[0] = nn.Linear(4, 8).double()
    elif edit == "weight_norm":
        with pytest.warns(FutureWarning):  # torch deprecates the hook API in favour of parametrizations
            torch.nn.utils.weight_norm(model.blocks[0].g.net[0])
    else:
        model.blocks[0].f.net = Scaled().double()
        model(X)  # the old structure was seen once before the parameter appears
        model.blocks[0].f.net.register_parameter("scale", nn.Parameter(torch.tensor(0.5, dtype=torch.float64)))
    got_y, got = adapter_grads(model, X)
    want_y, want = plain_model_grads(live_layers(model), X)
    assert_all_close([got_y, *got], [want_y, *want], rtol=RTOL)


# --- 2. branches that update state in forward ----------------------------------------


def test_spectral_norm_hook_api_is_refused_naming_block_and_module():
    model = small_model()
    torch.nn.utils.spectral_norm(model.blocks[1].f.net[0])
    with pytest.raises(
        ValueError,
        match=r"block 1 branch f modified parameter/buffer '0.weight_u' \(module '0', "
        r"Linear\) in place",
    ):
        model(X)


def test_spectral_norm_parametrization_is_refused_naming_block_and_module():
    model = small_model()
    torch.nn.utils.parametrizations.spectral_norm(model.blocks[0].g.net[3])
    with pytest.raises(
        ValueError,
        match=r"block 0 branch g modified parameter/buffer "
        r"'3.parametrizations.weight.0._u' \(module '3.parametrizations.weight.0', "
        r"_SpectralNorm\) in place",
    ):
        model(X)


def batchnorm_stack():
    torch.manual_seed(0)
    layers = nn.ModuleList(
        nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 4)]) for _ in range(2)
    ).double()
    return layers, *revfunc.pure_blocks(layers)


@pytest.mark.parametrize("path", ["reversible_sequence", "reversible_vjp", "assert_invertible", "reconstruction_error"])
def test_batchnorm_on_the_functional_path_is_refused_and_updates_once(path):
    layers, blocks, params = batchnorm_stack()
    x1, x2 = inputs((5, 4))
    call = {
        "reversible_sequence": lambda: revfunc.reversible_sequence(blocks, params, x1, x2),
        "reversible_vjp": lambda: revfunc.reversible_vjp(blocks, params, x1, x2),
        "assert_invertible": lambda: revfunc.testing.assert_invertible(blocks, params, x1, x2),
        "reconstruction_error": lambda: revfunc.reconstruction_error(blocks, params, x1, x2),
    }[path]
    with pytest.raises(
        ValueError,
        match=r"block 0 branch f modified parameter/buffer '1.num_batches_tracked' "
        r"\(module '1', BatchNorm1d\) in place",
    ):
        call()
    assert int(layers[0][0][1].num_batches_tracked) == 1  # as one plain forward would leave it


def test_batchnorm_in_eval_mode_is_accepted_and_exact():
    layers, blocks, params = batchnorm_stack()
    layers.eval()
    x1, x2 = inputs((5, 4))
    wrt = [x1, x2, *layers.parameters()]
    got = torch.autograd.grad(sum(t.sum() for t in revfunc.reversible_sequence(blocks, params, x1, x2)), wrt)
    want = torch.autograd.grad(sum(t.sum() for t in revfunc.sequential_sequence(blocks, params, x1, x2)), wrt)
    assert_all_close(got, want, rtol=RTOL)


# --- 3. in-place ops on a branch's input ------------------------------------------------


def test_inplace_relu_in_the_adapter_is_refused_and_the_caller_x_is_untouched():
    torch.manual_seed(0)
    layers = nn.ModuleList(
        nn.ModuleList([nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 4)), nn.Linear(4, 4)]) for _ in range(2)
    ).double()
    model = rnn.ReversibleSequence(layers)
    x = X.clone()
    with pytest.raises(ValueError, match=r"block 0 branch f modified its input x in place"):
        model(x)
    assert torch.equal(x, X)


def test_inplace_pure_branch_is_refused_and_the_caller_x2_is_untouched():
    def doubling(p, x):
        return torch.tanh(x.mul_(2) @ p["w"])

    blocks, params = make_pure_stack(2)
    blocks = [(blocks[0][0], doubling), blocks[1]]
    x1, x2 = inputs((2, 5), requires_grad=False)
    before = (x1.clone(), x2.clone())
    with pytest.raises(ValueError, match=r"block 0 branch g modified its input x in place"):
        revfunc.reversible_sequence(blocks, params, x1, x2)
    with pytest.raises(ValueError, match=r"reversible_inverse: block 0 branch g modified its input x in place"):
        revfunc.reversible_inverse(blocks, params, x1, x2)
    assert torch.equal(x1, before[0]) and torch.equal(x2, before[1])


def test_inplace_update_of_a_parameter_inside_a_branch_names_the_block():
    def drifting(p, x):
        p["w"].mul_(1.0)  # an in-place op on a leaf parameter
        return torch.tanh(x @ p["w"])

    blocks, params = make_pure_stack(2)
    blocks = [blocks[0], (drifting, blocks[1][1])]
    x1, x2 = inputs((2, 5))
    # Under grad mode autograd itself refuses an in-place write to a leaf that requires
    # grad (as in plain autograd); revfunc names the block, the branch and the tensor.
    with pytest.raises(ValueError, match=r"block 1 branch f modified parameter/buffer 'w' in place"):
        revfunc.reversible_sequence(blocks, params, x1, x2)
    with torch.no_grad():  # no backward can follow: no grad mode, so the version check names it
        with pytest.raises(ValueError, match=r"block 1 branch f modified parameter/buffer 'w' in place"):
            revfunc.reversible_sequence(blocks, params, x1, x2, check_reconstruction=True)


# --- 4. model.eval() between forward and backward -------------------------------------


def test_eval_between_forward_and_backward_replays_the_forward_masks():
    model = small_model(dropout=0.4)
    y = model(X, generator=torch.Generator().manual_seed(3))
    model.eval()
    live = [p for b in model.blocks for p in (*b.f.net.parameters(), *b.g.net.parameters())]
    got = torch.autograd.grad(y.pow(2).sum(), live)
    model.train()
    want_y, want = plain_model_grads(live_layers(model), X, generator=torch.Generator().manual_seed(3))
    assert_all_close([y, *got], [want_y, *want], rtol=RTOL)
    model.eval()
    assert not any(m.training for m in model.modules())  # the switch is undone after backward


# --- 6. the global RNG is left alone when no replay can happen --------------------------


@pytest.mark.parametrize("context", ["no_grad", "eval"])
def test_no_seed_is_drawn_when_nothing_can_be_replayed(context):
    model = small_model()
    if context == "eval":
        model.eval()
    torch.manual_seed(11)
    state = torch.get_rng_state()
    if context == "no_grad":
        with torch.no_grad():
            model(X)
    else:
        model(X).sum().backward()  # eval-mode backward works, and needed no seed
    assert torch.equal(torch.get_rng_state(), state)


def test_a_random_branch_declared_deterministic_is_caught():
    def noisy(p, x):
        return torch.tanh(x @ p["w"]) + 0.1 * torch.rand_like(x)

    blocks, params = make_pure_stack(2)
    blocks = [blocks[0], (blocks[1][0], noisy)]
    x1, x2 = inputs((2, 5))
    with pytest.raises(
        RuntimeError,
        match=r"block 1 branch g drew random numbers from the global RNG, but the call "
        r"was declared deterministic",
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2, deterministic=True)


def test_deterministic_stack_declared_deterministic_is_exact_and_leaves_the_rng():
    blocks, params = make_pure_stack(3)
    x1, x2 = inputs((2, 5))
    state = torch.get_rng_state()
    wrt = [x1, x2, *(t for pair in params for p in pair for t in p.values())]
    got = torch.autograd.grad(
        sum(t.sum() for t in revfunc.reversible_sequence(blocks, params, x1, x2, deterministic=True)), wrt
    )
    assert torch.equal(torch.get_rng_state(), state)
    want = torch.autograd.grad(sum(t.sum() for t in revfunc.sequential_sequence(blocks, params, x1, x2)), wrt)
    assert_all_close(got, want, rtol=RTOL)


# --- 7. arguments accepted without complaint --------------------------------------------


def test_coupling_refuses_halves_of_different_shapes():
    f = g = lambda p, x: x
    with pytest.raises(ValueError, match=r"revfunc.coupling: x2 expected the shape of x1 \(2, 4\), got \(1, 4\)"):
        revfunc.coupling(f, g, {}, {}, torch.zeros(2, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"revfunc.coupling_inverse: y2 expected the shape of y1"):
        revfunc.coupling_inverse(f, g, {}, {}, torch.zeros(2, 4), torch.zeros(1, 4))


@pytest.mark.parametrize("cls", [rnn.ReversibleSequence, rnn.SequentialSequence])
@pytest.mark.parametrize(
    "value, error, pattern",
    [
        (-0.5, ValueError, r"layer_dropout expected a probability in \[0, 1\), got -0.5"),
        (float("nan"), ValueError, r"layer_dropout expected a probability in \[0, 1\), got nan"),
        ("0.1", TypeError, r"layer_dropout expected a float probability in \[0, 1\), got str '0.1'"),
    ],
)
def test_bad_layer_dropout_is_refused(cls, value, error, pattern):
    with pytest.raises(error, match=pattern):
        cls(mlp_layers(2, 4), layer_dropout=value)


@pytest.mark.parametrize(
    "value, error, pattern",
    [
        (0, ValueError, r"check_reconstruction expected a finite tolerance > 0 \(False turns it off\), got 0"),
        (-1, ValueError, r"check_reconstruction expected a finite tolerance > 0 \(False turns it off\), got -1"),
        ("1e-3", TypeError, r"check_reconstruction expected None, a bool or a float tolerance > 0, got str"),
    ],
)
def test_bad_check_reconstruction_is_refused(value, error, pattern):
    blocks, params = make_pure_stack(2)
    x1, x2 = inputs((2, 5))
    with pytest.raises(error, match=pattern):
        revfunc.reversible_sequence(blocks, params, x1, x2, check_reconstruction=value)


# --- unclear errors made clear ----------------------------------------------------------


def test_empty_containers_behave_like_the_classic_ones():
    assert torch.equal(rnn.ReversibleSequence(nn.ModuleList())(X), 2 * X)
    assert torch.equal(rnn.SequentialSequence(nn.ModuleList())(X), X)


@pytest.mark.parametrize("cls", [rnn.ReversibleSequence, rnn.SequentialSequence])
@pytest.mark.parametrize(
    "layers, got",
    [
        (lambda: nn.ModuleList([nn.Linear(4, 4)]), "Linear"),
        (lambda: [[nn.Linear(4, 4)] * 3], "list"),
        (lambda: [(torch.tanh, torch.tanh)], "list"),
    ],
)
def test_malformed_layers_are_named(cls, layers, got):
    with pytest.raises(TypeError, match=rf"layers\[0\] expected a pair \(f, g\) of nn.Modules, got {got}"):
        cls(layers())


def test_zero_size_batch_has_no_drift():
    blocks, params = make_pure_stack(3)
    x1, x2 = inputs((0, 5))
    assert revfunc.reconstruction_error(blocks, params, x1, x2) == [0.0, 0.0, 0.0]
    y1, _ = revfunc.reversible_sequence(blocks, params, x1, x2, check_reconstruction=True)
    assert y1.shape == (0, 5)


def test_a_routed_keyword_the_branch_does_not_take_names_the_block():
    model = rnn.ReversibleSequence(mlp_layers(2, 4), args_route={"mask": ((False, False), (True, False))})
    with pytest.raises(
        TypeError,
        match=r"block 1 branch f \(PureModule\(Sequential\)\) raised: .*unexpected "
        r"keyword argument 'mask'",
    ):
        model(torch.randn(3, 4), mask=torch.ones(3, dtype=torch.bool))


def test_a_backward_recomputation_error_names_the_block():
    calls = []

    def fragile(p, x):
        calls.append(1)
        if len(calls) > 2:  # fine in forward, broken in the recomputation
            raise RuntimeError("device lost")
        return torch.tanh(x @ p["w"])

    blocks, params = make_pure_stack(1)
    blocks = [(fragile, blocks[0][1])]
    x1, x2 = inputs((2, 5))
    y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2)
    calls.append(1)
    with pytest.raises(RuntimeError, match=r"block 0 branch f failed in the backward recomputation: device lost"):
        (y1.sum() + y2.sum()).backward()


# --- property: callers' tensors, the RNG and buffers are left as a plain forward would -----


@given(depth=st.integers(1, 6), seed=st.integers(0, 2**16), dropout=st.sampled_from([0.0, 0.3]))
def test_random_stacks_leave_inputs_rng_and_buffers_as_a_plain_forward(depth, seed, dropout):
    torch.manual_seed(seed)
    layers = mlp_layers(depth, 4, hidden=6, dropout=dropout).double()
    for pair in layers:  # a buffer that a well-behaved module only reads
        pair[0].register_buffer("offset", torch.full((4,), 0.1, dtype=torch.float64))
    reference = copy.deepcopy(layers)
    blocks, params = revfunc.pure_blocks(layers)
    x1, x2 = inputs((3, 4), seed=seed)
    before = (x1.detach().clone(), x2.detach().clone())
    state = torch.get_rng_state()
    y1, y2 = revfunc.reversible_sequence(blocks, params, x1, x2, generator=torch.Generator().manual_seed(seed))
    (y1.pow(2).sum() + y2.sum()).backward()
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(x1, before[0]) and torch.equal(x2, before[1])
    for (name, a), (_, b) in zip(layers.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name


# --- messages through the nn adapter; lazy modules; outputs that are not one tensor ----


class ReturnsAttentionTuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x)  # (output, weights)


def test_a_branch_returning_a_tuple_is_named_with_shapes_never_values():
    torch.manual_seed(0)
    model = rnn.ReversibleSequence(nn.ModuleList([nn.ModuleList([ReturnsAttentionTuple(), nn.Linear(4, 4)])]))
    x = torch.full((2, 3, 4), 0.123456)
    with pytest.raises(
        ValueError,
        match=r"^revfunc.nn.ReversibleSequence: block 0 branch f expected an output "
        r"shaped like its input \(2, 3, 4\), got tuple\(Tensor\(shape=\(2, 3, 4\), "
        r"dtype=torch.float32, device=cpu\), Tensor\(shape=\(2, 3, 3\).*"
        r"nn.MultiheadAttention returns \(output, weights\)",
    ) as error:
        model(x)
    assert "0.123" not in str(error.value) and "tensor(" not in str(error.value)


def test_errors_through_the_adapter_name_the_container_and_its_plain_twin():
    class Doubles(nn.Module):
        def forward(self, x):
            return x.mul_(2)

    torch.manual_seed(0)
    model = rnn.ReversibleSequence(nn.ModuleList([nn.ModuleList([nn.Linear(4, 4), Doubles()])]))
    with pytest.raises(
        ValueError,
        match=r"^revfunc.nn.ReversibleSequence: block 0 branch g modified its input x "
        r"in place.*or use revfunc.nn.SequentialSequence\.$",
    ):
        model(torch.randn(2, 4))
    block = model.blocks[0]
    with pytest.raises(ValueError, match=r"^revfunc.nn.ReversibleBlock: block 0 branch g modified its input x"):
        block(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"^revfunc.nn.ReversibleBlock.inverse: block 0 branch g modified"):
        block.inverse(torch.randn(2, 8))


def _lazy_layers(depth=2):
    torch.manual_seed(0)
    return nn.ModuleList(
        nn.ModuleList([nn.Sequential(nn.LazyLinear(4), nn.Tanh()), nn.LazyLinear(4)]) for _ in range(depth)
    ).double()


def test_lazy_modules_are_materialized_by_the_first_forward_then_train_as_plain_autograd():
    model = rnn.ReversibleSequence(_lazy_layers())
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    got, grads = adapter_grads(model, x)
    assert all(not isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    want, want_grads = plain_model_grads(live_layers(model), x)
    assert_all_close([got, *grads], [want, *want_grads], rtol=RTOL)


def test_lazy_modules_on_the_functional_path_are_refused_with_the_fix():
    blocks, params = revfunc.pure_blocks(_lazy_layers(1))
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(
        TypeError,
        match=r"^revfunc.reversible_sequence: block 0 branch f parameter '0.weight' "
        r"expected an initialized tensor, got an uninitialized parameter of a lazy "
        r"module .*call each branch module once on an example input",
    ):
        revfunc.reversible_sequence(blocks, params, x, x)
