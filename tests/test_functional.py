"""pure / pure_blocks: functional_call semantics over parameter dicts."""

import pytest
import torch
from helpers import assert_all_close
from torch import nn

import revfunc


def test_pure_matches_functional_call_with_live_and_other_params():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).double()
    fn, params = revfunc.pure(module)
    assert set(params) == set(dict(module.named_parameters())) | set(dict(module.named_buffers()))
    assert all(params[k] is v for k, v in module.named_parameters())
    x = torch.randn(5, 3, dtype=torch.float64)
    assert_all_close([fn(params, x)], [module(x)], rtol=1e-12)
    other = {k: v * 2 for k, v in params.items()}
    assert_all_close([fn(other, x)], [torch.func.functional_call(module, other, (x,))], rtol=1e-12)
    assert not torch.allclose(fn(other, x), module(x))


def test_pure_module_gradients_reach_the_given_params():
    torch.manual_seed(0)
    fn, params = revfunc.pure(nn.Linear(3, 3))
    x = torch.randn(2, 3)
    copy = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    grads = torch.autograd.grad(fn(copy, x).sum(), list(copy.values()))
    want = torch.autograd.grad(torch.func.functional_call(fn.module, copy, (x,)).sum(), list(copy.values()))
    assert_all_close(grads, want, rtol=1e-6)


def test_pure_blocks_pairs_and_generator_detection():
    class Noisy(nn.Module):
        def forward(self, x, generator=None):
            return x

    layers = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2), Noisy()])])
    blocks, params = revfunc.pure_blocks(layers)
    (f, g), (fp, gp) = blocks[0], params[0]
    assert not f.accepts_generator and g.accepts_generator
    assert set(fp) == {"weight", "bias"} and gp == {}


def test_bad_layers_are_named():
    with pytest.raises(TypeError, match=r"revfunc.pure: module expected an nn.Module, got function"):
        revfunc.pure(lambda x: x)
    with pytest.raises(TypeError, match=r"layers\[0\] expected a pair \(f_module, g_module\) of nn.Modules"):
        revfunc.pure_blocks([nn.Linear(2, 2)])
