"""coupling / coupling_inverse: one block of the additive coupling math."""

import torch
from helpers import assert_all_close, inputs, make_pure_stack, reference_loop

import revfunc

RTOL = 1e-10


def test_coupling_and_inverse_single_block():
    blocks, params = make_pure_stack(1)
    (f, g), (fp, gp) = blocks[0], params[0]
    x1, x2 = inputs((2, 5), requires_grad=False)
    y1, y2 = revfunc.coupling(f, g, fp, gp, x1, x2)
    assert_all_close([y1, y2], list(reference_loop(blocks, params, x1, x2)), rtol=RTOL)
    assert_all_close(list(revfunc.coupling_inverse(f, g, fp, gp, y1, y2)), [x1, x2], rtol=RTOL, atol=1e-12)


def test_coupling_gradients_match_the_written_out_math():
    blocks, params = make_pure_stack(1)
    (f, g), (fp, gp) = blocks[0], params[0]
    x1, x2 = inputs((3, 5))
    wrt = [x1, x2, *fp.values(), *gp.values()]
    got = torch.autograd.grad(sum(t.sum() for t in revfunc.coupling(f, g, fp, gp, x1, x2)), wrt)
    y1 = x1 + torch.tanh(x2 @ fp["w"] + fp["b"])
    y2 = x2 + torch.tanh(y1 @ gp["w"] + gp["b"])
    want = torch.autograd.grad(y1.sum() + y2.sum(), wrt)
    assert_all_close(got, want, rtol=RTOL)
