"""revfunc.nn: a drop-in for the classic container (checkpoints, outputs, gradients, DDP)."""

import copy
import os
import tempfile

import classic
import pytest
import torch
from helpers import assert_all_close, spawn_and_wait
from torch import nn

import revfunc
import revfunc.nn as rnn
from revfunc.bench.sharded import finish_gloo, init_gloo
from revfunc.testing.blocks import transformer_layers

CLASSIC = classic.CLASSIC
DEPTH, DIM = 3, 16


def transformer_pair(dropout=0.0):
    torch.manual_seed(0)
    layers = transformer_layers(DEPTH, DIM, heads=4, dropout=dropout).double()
    route = {"mask": ((True, False),) * DEPTH}
    old = CLASSIC.ReversibleSequence(layers, args_route=route) if classic.available() else None
    new = rnn.ReversibleSequence(copy.deepcopy(layers), args_route=route)
    return old, new


def batch():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, DIM, generator=gen, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    return x, mask


def named_grads(module, loss):
    """Gradients of ``loss`` by parameter name (zeros for parameters it does not use)."""
    names, params = zip(*module.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)))


def classic_grads(module, loss):
    """The classic container writes .grad inside backward (autograd.grad cannot see it)."""
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad for n, p in module.named_parameters()}


def test_classic_checkpoint_loads_strictly_and_gives_the_same_outputs_and_gradients():
    classic.load()  # skips without the classic file
    old, new = transformer_pair()
    new.load_state_dict(old.state_dict(), strict=True)
    assert list(new.state_dict()) == list(old.state_dict())
    x, mask = batch()
    x_old, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_old, y_new = old(x_old, mask=mask), new(x_new, mask=mask)
    assert_all_close([y_new], [y_old], rtol=1e-10)
    g_old = classic_grads(old, (y_old**2).sum())
    g_new = named_grads(new, (y_new**2).sum())
    assert list(g_new) == list(g_old)
    assert_all_close(list(g_new.values()), list(g_old.values()), rtol=1e-10)


def sequential_reference(module, x, mask, generator=None):
    """The same stack through revfunc.sequential_sequence (plain autograd) on the module's weights."""
    layers = nn.ModuleList(nn.ModuleList([b.f.net, b.g.net]) for b in module.blocks)
    blocks, params = revfunc.pure_blocks(layers)
    kwargs = revfunc.route_args(module.args_route, {"mask": mask}, len(layers))
    y1, y2 = revfunc.sequential_sequence(blocks, params, x, x, kwargs=kwargs, generator=generator)
    return y1 + y2


def test_backward_in_eval_mode_fills_grad_like_a_normal_module():
    _, new = transformer_pair(dropout=0.2)
    new.eval()  # the classic container crashes on backward in eval mode
    x, mask = batch()
    new(x, mask=mask).pow(2).sum().backward()
    got = [p.grad.clone() for p in new.parameters()]
    want = torch.autograd.grad(sequential_reference(new, x, mask).pow(2).sum(), list(new.parameters()))
    assert_all_close(got, list(want), rtol=1e-10)


def test_dropout_gradients_match_a_sequential_reference_with_the_same_generator():
    _, new = transformer_pair(dropout=0.3)
    x, mask = batch()
    got = named_grads(new, new(x, mask=mask, generator=torch.Generator().manual_seed(3)).pow(2).sum())
    want = named_grads(new, sequential_reference(new, x, mask, torch.Generator().manual_seed(3)).pow(2).sum())
    assert_all_close(list(got.values()), list(want.values()), rtol=1e-10)


def test_layer_dropout_is_reproducible_and_recomputation_uses_the_kept_layers():
    _, new = transformer_pair(dropout=0.2)
    new.layer_dropout = 0.5
    x, mask = batch()
    out = [new(x, mask=mask, generator=torch.Generator().manual_seed(s)) for s in (7, 7)]
    assert torch.equal(out[0], out[1])
    got = named_grads(new, out[0].pow(2).sum())

    gen = torch.Generator().manual_seed(7)
    keep = revfunc.layer_drop(DEPTH, 0.5, gen)
    assert 0 < len(keep)
    layers = nn.ModuleList(nn.ModuleList([new.blocks[i].f.net, new.blocks[i].g.net]) for i in keep)
    blocks, params = revfunc.pure_blocks(layers)
    kwargs = [revfunc.route_args(new.args_route, {"mask": mask}, DEPTH)[i] for i in keep]
    y1, y2 = revfunc.sequential_sequence(blocks, params, x, x, kwargs=kwargs, generator=gen)
    want = named_grads(new, (y1 + y2).pow(2).sum())
    assert_all_close(list(got.values()), list(want.values()), rtol=1e-10)


def test_sequential_sequence_matches_the_classic_one():
    torch.manual_seed(0)
    layers = transformer_layers(DEPTH, DIM).double()
    route = {"mask": ((True, False),) * DEPTH}
    old = CLASSIC.SequentialSequence(layers, args_route=route)
    new = rnn.SequentialSequence(copy.deepcopy(layers), args_route=route)
    new.load_state_dict(old.state_dict(), strict=True)
    x, mask = batch()
    y_old, y_new = old(x, mask=mask), new(x, mask=mask)
    assert_all_close([y_new], [y_old], rtol=1e-10)
    assert_all_close(
        list(named_grads(new, y_new.sum()).values()), list(named_grads(old, y_old.sum()).values()), rtol=1e-10
    )


def test_reversible_block_round_trip_and_odd_width_error():
    torch.manual_seed(0)
    block = rnn.ReversibleBlock(nn.Linear(4, 4), nn.Linear(4, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    assert_all_close([block.inverse(block(x))], [x], rtol=1e-10, atol=1e-12)
    with pytest.raises(
        ValueError, match=r"x needs an even last dim to split into \(x1, x2\); got x.shape=\(4, 128, 7\)"
    ):
        block(torch.zeros(4, 128, 7, dtype=torch.float64))


def test_batchnorm_is_rejected_at_construction_naming_the_submodule():
    layers = nn.ModuleList([nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Linear(4, 4)])])
    with pytest.raises(
        ValueError, match=r"submodule 'blocks.0.f.net.1' \(BatchNorm1d\) updates its running statistics"
    ):
        rnn.ReversibleSequence(layers)


def test_container_errors_name_the_argument():
    layers = transformer_layers(2, 8)
    with pytest.raises(ValueError, match=r"router\['mask'\] has 3 \(to_f, to_g\) pairs but depth=2"):
        rnn.ReversibleSequence(layers, args_route={"mask": ((True, False),) * 3})
    seq = rnn.ReversibleSequence(layers)
    with pytest.raises(ValueError, match=r"unrouted \['mask'\]"):
        seq(torch.zeros(1, 3, 8), mask=torch.ones(1, 3, dtype=torch.bool))


DDP_SETUPS = [(True, False), (False, False), (False, True)]  # (find_unused_parameters, gradient_as_bucket_view)


def _ddp_worker(rank, world, init_file, out_dir):
    """Every DDP setup in turn (one spawn): each rank's gradients and their ready order."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_gloo(rank, world, init_file)
    saved = {}
    for find_unused, bucket_view in DDP_SETUPS:
        model = _ddp_model()
        ddp = DDP(model, find_unused_parameters=find_unused, gradient_as_bucket_view=bucket_view)
        x, mask = _ddp_batch()
        half = x.shape[0] // world
        sl = slice(rank * half, (rank + 1) * half)
        names = {p: n for n, p in model.named_parameters()}
        ready = []  # parameter names in the order their gradients reached .grad
        for p in names:
            p.register_post_accumulate_grad_hook(lambda p, ready=ready, names=names: ready.append(names[p]))
        ddp(x[sl], mask=mask[sl], generator=torch.Generator().manual_seed(rank)).pow(2).mean().backward()
        saved[find_unused, bucket_view] = {
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "ready": ready,
        }
    if rank == 0:
        torch.save(saved, os.path.join(out_dir, "grads.pt"))
    finish_gloo(rank, init_file)


def _ddp_model():
    torch.manual_seed(0)
    return rnn.ReversibleSequence(transformer_layers(2, 8, heads=2).double(), args_route={"mask": ((True, False),) * 2})


def _ddp_batch():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(4, 5, generator=gen) > 0.2
    mask[:, 0] = True
    return x, mask


@pytest.fixture(scope="module")
def ddp_runs():
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        spawn_and_wait(_ddp_worker, (2, init, tmp), 2, 90, "DDP workers", init)
        return torch.load(os.path.join(tmp, "grads.pt"))


@pytest.mark.parametrize("find_unused, bucket_view", DDP_SETUPS)
def test_ddp_gradients_equal_a_single_process_run_over_the_whole_batch(ddp_runs, find_unused, bucket_view):
    got, ready = ddp_runs[find_unused, bucket_view]["grads"], ddp_runs[find_unused, bucket_view]["ready"]
    # Each gradient reached .grad once, block 1's (backward runs it first) before block 0's:
    # DDP's buckets fill while the backward walks on.
    assert sorted(ready) == sorted(got)
    last_of_block_1 = max(k for k, n in enumerate(ready) if n.startswith("blocks.1."))
    first_of_block_0 = min(k for k, n in enumerate(ready) if n.startswith("blocks.0."))
    assert last_of_block_1 < first_of_block_0, ready
    model = _ddp_model()
    x, mask = _ddp_batch()
    loss = (
        sum(
            model(x[r * 2 : (r + 1) * 2], mask=mask[r * 2 : (r + 1) * 2], generator=torch.Generator().manual_seed(r))
            .pow(2)
            .mean()
            for r in range(2)
        )
        / 2
    )
    want = named_grads(model, loss)
    assert list(got) == list(want)
    assert_all_close(list(got.values()), list(want.values()), rtol=1e-10)


def test_parameter_hooks_run_once_and_see_the_true_gradient():
    _, new = transformer_pair()
    x, mask = batch()
    weight = new.blocks[1].g.net.net[1].weight
    seen = []
    weight.register_hook(lambda grad: seen.append(grad.clone()) or grad * 2)
    new(x, mask=mask).pow(2).sum().backward()
    got = weight.grad.clone()
    assert len(seen) == 1
    want = torch.autograd.grad(sequential_reference(new, x, mask).pow(2).sum(), weight)[0]
    assert len(seen) == 2  # the reference ran the hook once too
    assert_all_close([seen[0], got], [want / 2, want], rtol=1e-10)


def test_sequential_sequence_generator_reproduces_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    seq = rnn.SequentialSequence(transformer_layers(2, 8, heads=2, dropout=0.5).double())
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    before = torch.get_rng_state()
    a = seq(x, generator=torch.Generator().manual_seed(1))
    b = seq(x, generator=torch.Generator().manual_seed(1))
    c = seq(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(before, torch.get_rng_state())
    assert torch.equal(a, b) and not torch.equal(a, c)
