"""FSDP2 (``fully_shard``) on both containers: per block and root only, against
unsharded full-batch training in plain autograd (float64, 3 AdamW steps).

Two processes on gloo run every sharded case once (one spawn, module fixture); the
test process trains the same models unsharded over the whole batch and compares.
Gradients are compared before any optimizer step as well as parameters after: AdamW is
nearly invariant to the gradient's scale, so only the gradients show whether FSDP2
averaged them over ranks (PyTorch #162338: summed on gloo).
"""

import os
import tempfile

import pytest
import torch
from classic import CLASSIC
from helpers import assert_all_close, spawn_and_wait
from torch import nn

import revfunc.nn as rnn
from revfunc.bench.sharded import finish_gloo, init_gloo, state_bytes
from revfunc.testing.blocks import transformer_layers

WORLD, STEPS, DEPTH, DIM = 2, 3, 3, 8
MICRO = 2  # microbatches per step in the accumulation case
LR = 1e-2


def _rev_model(dtype=torch.float64):
    torch.manual_seed(0)
    return rnn.ReversibleSequence(transformer_layers(DEPTH, DIM, heads=2, dropout=0.1).to(dtype))


def _seq_model():
    torch.manual_seed(0)
    return rnn.SequentialSequence(transformer_layers(DEPTH, DIM, heads=2, dropout=0.1).double())


MODELS = {"reversible": _rev_model, "sequential": _seq_model}


def _data():
    """``x[step, micro, rank]``: one (2, 5, DIM) slice of the global batch each."""
    gen = torch.Generator().manual_seed(2)
    return torch.randn(STEPS, MICRO, WORLD, 2, 5, DIM, generator=gen, dtype=torch.float64)


def _layer_drop_model():
    torch.manual_seed(0)
    return rnn.ReversibleSequence(transformer_layers(4, DIM, heads=2, dropout=0.1).double(), layer_dropout=0.5)


def _slice_loss(model, x, step, micro, rank, same_on_every_rank=False):
    """One rank's loss on its slice; dropout masks come from an explicit generator (with
    layer dropout, one seed on every rank: FSDP2's collectives need the same blocks)."""
    gen = torch.Generator().manual_seed(100 * step + 10 * micro + (0 if same_on_every_rank else rank))
    return model(x[step, micro, rank].to(next(model.parameters()).dtype), generator=gen).pow(2).mean()


def _flow_model():
    """Affine couplings of MLP subnets on the last dim, split in halves (a flow's stack)."""
    from revfunc.couplings import affine
    from revfunc.testing.blocks import subnet_layers

    torch.manual_seed(0)
    return rnn.ReversibleSequence(subnet_layers(DEPTH, DIM // 2, hidden=8).double(), coupling=affine(), split_dim=-1)


def _flow_loss(model, x, rank):
    """A loss with the log-det in it, on one rank's slice of step 0."""
    y, logdet = model(x[0, 0, rank], return_logdet=True)
    return y.pow(2).mean() - logdet.mean()


def _layer_drop_reference():
    model = _layer_drop_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x = _data()
    for step in range(STEPS):
        (sum(_slice_loss(model, x, step, 0, r, same_on_every_rank=True) for r in range(WORLD)) / WORLD).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _reference(kind, micro=1, state=None):
    """Unsharded full-batch training: ``(gradients of step 0, parameters after STEPS)``;
    ``state``: a list to append the bytes of parameters, gradients and AdamW moments to."""
    model = MODELS[kind]()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x = _data()
    grads0 = None
    for step in range(STEPS):
        loss = sum(_slice_loss(model, x, step, m, r) for m in range(micro) for r in range(WORLD)) / WORLD
        loss.backward()
        if grads0 is None:
            grads0 = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        if state is not None and step == STEPS - 1:
            state.append(state_bytes(model, opt))
        opt.zero_grad()
    return grads0, {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------- the two workers


def _shard(model, per_block, **kw):
    from torch.distributed.fsdp import fully_shard

    if per_block:
        if hasattr(model, "blocks"):  # ReversibleSequence, _PlainCoupling
            for block in model.blocks:
                fully_shard(block, **kw)
        else:  # a layer (f, g) is a ModuleList, which FSDP2 refuses: group its two modules
            for layer in model.layers:
                fully_shard(list(layer), **kw)
    fully_shard(model, **kw)
    return model


def _full(tensors):
    return {n: t.full_tensor().detach().clone() for n, t in tensors.items()}


def _train_sharded(model, rank, micro=1, events=None):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    x = _data()
    grads0 = None
    for step in range(STEPS):
        for m in range(micro):
            model.set_requires_gradient_sync(m == micro - 1)  # no reduce-scatter before the last
            _slice_loss(model, x, step, m, rank).backward()
            if events is not None and step == 0:
                events.append(("end", None, None, None))
        if grads0 is None:
            grads0 = _full({n: p.grad for n, p in model.named_parameters()})
        opt.step()
        if step < STEPS - 1:
            opt.zero_grad()
    return grads0, opt  # with the last step's gradients, as the reference's state count


def _record_gathering(model, events):
    """At every branch call (forward, rebuild and recomputation): which blocks hold
    their parameters unsharded, and which have their sharded gradients already."""
    from torch.distributed.tensor import DTensor

    blocks = list(model.blocks)

    def hook(index, branch):
        def record(module, args):
            firsts = [next(b.parameters()) for b in blocks]
            unsharded = {j for j, p in enumerate(firsts) if not isinstance(p, DTensor)}
            reduced = {j for j, p in enumerate(firsts) if isinstance(p, DTensor) and p.grad is not None}
            events.append((torch.is_grad_enabled(), index, unsharded, reduced))

        return record

    for i, block in enumerate(blocks):
        block.f.net.register_forward_pre_hook(hook(i, "f"))
        block.g.net.register_forward_pre_hook(hook(i, "g"))


class _PlainCoupling(nn.Module):
    """The coupling in plain autograd, with ReversibleSequence's state_dict keys."""

    def __init__(self, layers):
        super().__init__()
        self.blocks = nn.ModuleList(_PlainBlock(f, g) for f, g in layers)

    def forward(self, x):
        x1, x2 = x, x
        for block in self.blocks:
            x1, x2 = block(x1, x2)
        return x1 + x2


class _PlainBlock(nn.Module):
    def __init__(self, f, g):
        super().__init__()
        self.f, self.g = nn.Module(), nn.Module()
        self.f.net, self.g.net = f, g

    def forward(self, x1, x2):
        y1 = x1 + self.f.net(x2)
        return y1, x2 + self.g.net(y1)


def _mixed_precision_grads(rank):
    """Gradients of one bf16 step (float32 reduction), revfunc and plain coupling."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    x = _data()[0, 0, rank].float()
    out = {}
    for name in ("revfunc", "plain"):
        model = _rev_model(torch.float32).eval()  # dropout off: the two runs draw differently
        if name == "plain":
            state = model.state_dict()
            model = _PlainCoupling(transformer_layers(DEPTH, DIM, heads=2))
            model.load_state_dict(state)
        _shard(model, per_block=True, mp_policy=policy)
        model(x).float().pow(2).mean().backward()
        out[name] = _full({n: p.grad for n, p in model.named_parameters()})
    return out


def _checkpoints(model, opt, rank, tmp):
    """DCP round trip into a fresh sharded model, then one more step on both; and the
    full state_dict gathered on rank 0."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    path = os.path.join(tmp, "dcp")
    opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    torch.manual_seed(123)  # different initial weights: the load must overwrite them all
    fresh = _shard(rnn.ReversibleSequence(transformer_layers(DEPTH, DIM, heads=2, dropout=0.1).double()), True)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
    fresh_model_sd, fresh_optim_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": fresh_model_sd, "optim": fresh_optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    x = _data()
    for m, o in ((model, opt), (fresh, fresh_opt)):
        _slice_loss(m, x, 0, 1, rank).backward()
        o.step()
        o.zero_grad()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {
        "after": _full(dict(model.named_parameters())),
        "restored": _full(dict(fresh.named_parameters())),
        "full_state_dict": full,
    }


def _errors(rank):
    """The messages of what per-block sharding refuses."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    x = _data()[0, 0, rank]
    model = _rev_model()
    fully_shard(model.blocks[1].f.net)  # a branch, not the block
    fully_shard(model)
    try:
        model(x)
    except RuntimeError as error:
        out["branch"] = str(error)
    model = _shard(_rev_model(), True)
    try:
        torch.func.vjp(model, x)
    except RuntimeError as error:
        out["transform"] = str(error)
    return out


def _worker(rank, out_dir, init_file):

    init_gloo(rank, WORLD, init_file, hang_s=120)
    results = {}
    for kind, per_block in (("reversible", True), ("reversible", False), ("sequential", True), ("sequential", False)):
        model = _shard(MODELS[kind](), per_block)
        events = [] if kind == "reversible" and per_block else None
        if events is not None:
            _record_gathering(model, events)
        grads0, opt = _train_sharded(model, rank, events=events)
        results[kind, per_block] = {
            "grads0": grads0,
            "params": _full(dict(model.named_parameters())),
            "state_bytes": state_bytes(model, opt),
        }
        if events is not None:
            results["events"] = events
            results["checkpoints"] = _checkpoints(model, opt, rank, out_dir)
    model = _shard(_rev_model(), True)
    grads0, _ = _train_sharded(model, rank, micro=MICRO)
    results["accumulation"] = {"grads0": grads0, "params": _full(dict(model.named_parameters()))}
    model = _shard(_layer_drop_model(), True)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(STEPS):
        _slice_loss(model, _data(), step, 0, rank, same_on_every_rank=True).backward()
        opt.step()
        opt.zero_grad()
    results["layer_drop"] = _full(dict(model.named_parameters()))
    model = _shard(_rev_model(), True)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)  # sum over ranks
    _slice_loss(model, _data(), 0, 0, rank).backward()
    results["summed"] = _full({n: p.grad for n, p in model.named_parameters()})
    model = _shard(_flow_model(), True)
    _flow_loss(model, _data(), rank).backward()
    results["flow"] = _full({n: p.grad for n, p in model.named_parameters()})
    results["mixed"] = _mixed_precision_grads(rank)
    results["errors"] = _errors(rank)
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    finish_gloo(rank, init_file)


@pytest.fixture(scope="module")
def sharded():
    with tempfile.TemporaryDirectory() as tmp:
        init = os.path.join(tmp, "init")
        spawn_and_wait(_worker, (tmp, init), WORLD, 150, "FSDP2 workers", init)
        return torch.load(os.path.join(tmp, "results.pt"), weights_only=False)


def _assert_named_close(got, want, rtol):
    assert list(got) == list(want)
    assert_all_close(list(got.values()), list(want.values()), rtol=rtol, atol=1e-14)


@pytest.mark.parametrize("kind", ["reversible", "sequential"])
@pytest.mark.parametrize("per_block", [True, False], ids=["per_block", "root_only"])
def test_sharded_training_equals_unsharded_full_batch_training(sharded, kind, per_block):
    state = []
    grads0, params = _reference(kind, state=state)
    got = sharded[kind, per_block]
    _assert_named_close(got["grads0"], grads0, rtol=1e-9)  # averaged over ranks, not summed
    _assert_named_close(got["params"], params, rtol=1e-9)
    # Each rank keeps half of the parameters, gradients and AdamW moments (even shards).
    assert got["state_bytes"] * WORLD == state[0]


def test_gradient_accumulation_without_sync_equals_full_batch(sharded):
    grads0, params = _reference("reversible", micro=MICRO)
    _assert_named_close(sharded["accumulation"]["grads0"], grads0, rtol=1e-9)
    _assert_named_close(sharded["accumulation"]["params"], params, rtol=1e-9)


def test_layer_dropout_per_block_equals_full_batch_training(sharded):
    _assert_named_close(sharded["layer_drop"], _layer_drop_reference(), rtol=1e-9)


def test_gradient_divide_factor_goes_through_fsdp_reduction(sharded):
    model = _rev_model()
    x = _data()
    sum(_slice_loss(model, x, 0, 0, r) for r in range(WORLD)).backward()  # summed, not averaged
    _assert_named_close(sharded["summed"], {n: p.grad for n, p in model.named_parameters()}, rtol=1e-9)


def test_per_block_sharding_gathers_one_block_at_a_time_and_reduces_each_before_the_next(sharded):
    events = sharded["events"]
    # Step 0: the forward (grad enabled, recorded) then the backward (its rebuilds and
    # recomputations run with grad enabled too, but after the forward's last block).
    end = events.index(("end", None, None, None))
    calls = events[:end]
    forward, backward = calls[: 2 * DEPTH], calls[2 * DEPTH :]
    assert [i for _, i, _, _ in forward] == [i for i in range(DEPTH) for _ in "fg"]
    for _, i, unsharded, reduced in forward:
        assert i in unsharded and unsharded <= {i, i + 1}, (i, unsharded)  # this block, the next prefetched
        assert not reduced
    # Backward: last block first; block 0's input is not rebuilt (g rebuilds, both recompute).
    assert [i for _, i, _, _ in backward] == sorted((i for _, i, _, _ in backward), reverse=True)
    assert {i for _, i, _, _ in backward} == set(range(DEPTH))
    for _, i, unsharded, reduced in backward:
        assert i in unsharded and unsharded <= {i, i - 1}, (i, unsharded)  # this block, the one below prefetched
        assert reduced == set(range(i + 1, DEPTH)), (i, reduced)  # every block above reduce-scattered already


def test_distributed_checkpoint_round_trip_and_full_state_dict(sharded):
    ckpt = sharded["checkpoints"]
    _assert_named_close(ckpt["restored"], ckpt["after"], rtol=0)
    full = ckpt["full_state_dict"]
    want = ckpt["after"]
    for make in (_rev_model, lambda: CLASSIC.ReversibleSequence(transformer_layers(DEPTH, DIM, heads=2).double())):
        model = make()  # the classic one last: without ../shared it skips here
        model.load_state_dict(full, strict=True)
        for name, tensor in want.items():
            assert torch.equal(model.state_dict()[name], tensor), name


def test_mixed_precision_matches_plain_autograd_fsdp(sharded):
    got, want = sharded["mixed"]["revfunc"], sharded["mixed"]["plain"]
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.float32  # reduced in float32 into the float32 shards
        err = (got[name] - want[name]).norm() / want[name].norm()
        assert err < 2e-2, (name, float(err))


def test_what_per_block_sharding_refuses_is_named(sharded):
    errors = sharded["errors"]
    assert "block 1's parameters are sharded (DTensor), but block 1 is not an FSDP2 unit" in errors["branch"]
    assert "fully_shard on model.blocks[1] itself" in errors["branch"]
    assert (
        "blocks sharded with FSDP2 (fully_shard on each block) cannot run under a torch.func transform"
        in errors["transform"]
    )


def test_a_flow_with_the_logdet_in_the_loss_trains_sharded_per_block(sharded):
    """Affine couplings, per-block FSDP2 units, the log-det in the loss: the averaged
    gradients equal unsharded full-batch plain training's (float64, rtol 1e-9)."""
    from revfunc.couplings import affine

    layers = nn.ModuleList(nn.ModuleList([b.f.net, b.g.net]) for b in _flow_model().blocks)
    plain = rnn.SequentialSequence(layers, coupling=affine(), split_dim=-1)  # the same blocks, plain autograd
    x = _data()
    (sum(_flow_loss(plain, x, r) for r in range(WORLD)) / WORLD).backward()
    got = sharded["flow"]
    assert len(got) == len(list(layers.parameters()))
    assert_all_close(list(got.values()), [p.grad for p in layers.parameters()], rtol=1e-9, atol=1e-14)
