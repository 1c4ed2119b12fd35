"""Mixed precision replay, reconstruction drift, its check and checkpoint_every."""

import classic
import pytest
import torch
from helpers import flat_params, inputs, loss_of, make_stack, saved_bytes

import revfunc
import revfunc.nn as rnn
from revfunc.testing.blocks import transformer_layers

CLASSIC = classic.CLASSIC


class _Stack(torch.nn.Module):
    """A container's blocks run through a chosen revfunc sequence function."""

    def __init__(self, model, fn, **options):
        super().__init__()
        self.model, self.fn, self.options = model, fn, options

    def forward(self, x):
        fns, params = zip(*(block.pure() for block in self.model.blocks))
        y1, y2 = self.fn(list(fns), list(params), x, x, **self.options)
        return y1 + y2


def autocast_grads(model, x, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype):
        y = model(x)
    y.float().pow(2).mean().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def amp_errors(dim, tokens, batch, dtype=torch.bfloat16, checkpoint_every=None):
    torch.manual_seed(0)
    layers = transformer_layers(8, dim)
    x = torch.randn(batch, tokens, dim)
    model = rnn.ReversibleSequence(layers)
    ref = autocast_grads(_Stack(model, revfunc.sequential_sequence), x, dtype)
    new = autocast_grads(_Stack(model, revfunc.reversible_sequence, checkpoint_every=checkpoint_every), x, dtype)
    old = autocast_grads(CLASSIC.ReversibleSequence(layers), x.clone().requires_grad_(), dtype)
    return relative_error(new, ref), relative_error(old, ref)


@pytest.mark.parametrize("size, checkpoint_every", [((16, 4, 2), None), ((64, 16, 8), 1)])
def test_bf16_autocast_is_replayed_exactly_where_reconstruction_is_exact(size, checkpoint_every):
    new, old = amp_errors(*size, checkpoint_every=checkpoint_every)
    assert new <= 1e-6
    assert old > 1e-3  # the classic code recomputes outside autocast


def test_bf16_autocast_on_a_realistic_size_beats_the_classic_error_by_far():
    new, old = amp_errors(64, 16, 8)
    assert new * 5 <= old


def test_fp16_autocast_replay_on_cpu():
    new, _ = amp_errors(16, 4, 2, dtype=torch.float16, checkpoint_every=1)
    assert new <= 1e-6


def gain_stack(depth, gain, dtype):
    def scale(p, x):
        return p["gain"] * torch.tanh(x)

    params = [({"gain": torch.tensor(gain, dtype=dtype)}, {"gain": torch.tensor(0.5, dtype=dtype)})] * depth
    return [(scale, scale)] * depth, params


def test_reconstruction_error_is_tiny_in_float64_and_reports_every_block():
    _, blocks, params = make_stack(8)
    x1, x2 = inputs((4, 6), requires_grad=False)
    errors = revfunc.reconstruction_error(blocks, params, x1, x2)
    assert len(errors) == 8 and all(0 <= e < 1e-12 for e in errors)


def test_check_reconstruction_names_the_ill_conditioned_block():
    blocks, params = gain_stack(4, 1.0, torch.float16)
    params[2] = ({"gain": torch.tensor(3000.0, dtype=torch.float16)}, params[2][1])
    x1, x2 = (t.half() for t in inputs((4, 6), requires_grad=False))
    errors = revfunc.reconstruction_error(blocks, params, x1, x2)
    assert errors[3] < 1e-2 < errors[2]
    with pytest.raises(
        revfunc.ReconstructionError, match=r"block 2's input rebuilt .* relative error .* > tolerance 0.01"
    ):
        revfunc.reversible_sequence(blocks, params, x1, x2, check_reconstruction=1e-2)
    y = revfunc.reversible_sequence(blocks, params[:2] + params[3:] + params[:1], x1, x2, check_reconstruction=1e-2)
    assert y[0].dtype == torch.float16


def test_checkpoint_every_bounds_drift_and_keeps_memory_o_of_l_over_k():
    blocks, params = gain_stack(32, 4.0, torch.float32)
    x1, x2 = inputs((8, 16), dtype=torch.float32, requires_grad=False)
    drift = revfunc.reconstruction_error(blocks, params, x1, x2)
    bounded = revfunc.reconstruction_error(blocks, params, x1, x2, checkpoint_every=4)
    assert max(bounded) < max(drift) / 10

    def activation_bytes(k):
        x1r, x2r = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        n, _ = saved_bytes(
            lambda: revfunc.reversible_sequence(blocks, params, x1r, x2r, checkpoint_every=k),
            exclude=flat_params(params),
        )
        return n

    one_pair = 2 * x1.numel() * x1.element_size()
    assert activation_bytes(None) == one_pair  # the final (y1, y2) only
    assert activation_bytes(8) == one_pair * 4  # + states at blocks 8, 16, 24
    assert activation_bytes(4) == one_pair * 8


@pytest.mark.parametrize("k", [1, 3])
def test_checkpoint_every_gradients_match_plain_autograd(k):
    _, blocks, params = make_stack(7)
    x1, x2 = inputs((3, 6))
    wrt = [x1, x2, *flat_params(params)]
    got = torch.autograd.grad(loss_of(*revfunc.reversible_sequence(blocks, params, x1, x2, checkpoint_every=k)), wrt)
    want = torch.autograd.grad(loss_of(*revfunc.sequential_sequence(blocks, params, x1, x2)), wrt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
