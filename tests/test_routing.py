"""route_args and layer_drop: classic-compatible results, strict errors."""

import classic
import pytest
import torch

import revfunc

CLASSIC = classic.CLASSIC


def test_route_args_matches_the_classic_routes():
    router = {"mask": ((True, False), (False, True), (True, True)), "pos": ((False, False),) * 3}
    kwargs = {"mask": "M", "pos": "P"}
    assert revfunc.route_args(router, kwargs, 3) == [tuple(pair) for pair in CLASSIC.route_args(router, kwargs, 3)]


def test_unrouted_keyword_is_an_error_not_dropped():
    with pytest.raises(
        ValueError, match=r"kwargs expected only keywords the router routes \(\['mask'\]\), got unrouted \['context'\]"
    ):
        revfunc.route_args({"mask": ((True, False),) * 2}, {"mask": 1, "context": 2}, 2)


def test_route_of_wrong_length_is_an_error():
    with pytest.raises(
        ValueError, match=r"router\['mask'\] has 3 \(to_f, to_g\) pairs but depth=4; give one per block"
    ):
        revfunc.route_args({"mask": ((True, False),) * 3}, {"mask": 1}, 4)


@pytest.mark.parametrize("prob", [0.0, 0.3, 0.7, 1.0])
def test_layer_drop_keeps_the_classic_layers_for_the_same_seed(prob):
    for seed in range(20):
        torch.manual_seed(seed)
        want = CLASSIC.layer_drop(list(range(10)), prob)
        torch.manual_seed(seed)
        assert revfunc.layer_drop(10, prob) == want


def test_layer_drop_draws_from_the_generator_and_never_drops_everything():
    a = revfunc.layer_drop(12, 0.5, torch.Generator().manual_seed(4))
    assert a == revfunc.layer_drop(12, 0.5, torch.Generator().manual_seed(4))
    assert 0 < len(a) < 12 and a == sorted(a)
    assert revfunc.layer_drop(5, 1.0, torch.Generator()) == [0]
    with pytest.raises(ValueError, match=r"prob expected a probability in \[0, 1\], got 1.5"):
        revfunc.layer_drop(3, 1.5)
