"""Hypothesis strategies for reversible stacks: shapes, dtypes, tensors, blocks, kwargs.

Strategies draw small integers (dims, depth, seeds); tensors come from a seeded
``torch.Generator``, so examples shrink well and are never flaky. Compose them with
``@given``::

    from hypothesis import given
    from revfunc.testing import assert_invertible, strategies as rst

    @rst.torch_settings
    @given(rst.stacks())
    def test_my_blocks(stack):
        assert_invertible(stack.blocks, stack.params, stack.x1, stack.x2, kwargs=stack.kwargs)

:data:`torch_settings` turns off hypothesis's per-example deadline (200 ms by default):
the first call of a torch op in a process, a finite-difference check over a deep stack
or a busy CI machine take single examples past any fixed deadline (measured: most
examples of ``stacks(max_depth=4)`` take about 40 ms, the first up to 1.2 s), which
hypothesis would report as a flaky failure.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
except ImportError as error:  # pragma: no cover - exercised only without hypothesis
    raise ImportError(
        "revfunc.testing.strategies needs hypothesis: pip install 'revfunc[dev]' or pip install hypothesis"
    ) from error

import torch

import revfunc
from revfunc.testing.blocks import Attention, FeedForward

__all__ = [
    "Stack",
    "shapes",
    "float_dtypes",
    "tensors",
    "depths",
    "mlp_blocks",
    "attention_blocks",
    "routed_kwargs",
    "couplings",
    "stacks",
    "torch_settings",
]


class Stack(NamedTuple):
    """One drawn example: everything :func:`revfunc.reversible_sequence` takes."""

    blocks: list
    params: list
    x1: torch.Tensor
    x2: torch.Tensor
    kwargs: Optional[list]
    #: the ``coupling=`` argument (``None``: additive)
    coupling: Optional[list] = None


#: Settings for property tests of torch code (apply as a decorator above ``@given``): no
#: deadline and no ``too_slow``/``data_too_large`` health checks; every other setting
#: (``max_examples``, ...) comes from the active profile.
torch_settings = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def shapes(min_dims: int = 1, max_dims: int = 3, max_side: int = 5) -> st.SearchStrategy[Tuple[int, ...]]:
    """Leading (batch) shapes, e.g. ``()``, ``(3,)``, ``(2, 4)``."""
    return st.lists(st.integers(1, max_side), min_size=min_dims - 1, max_size=max_dims - 1).map(tuple)


def float_dtypes(dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64)) -> st.SearchStrategy[torch.dtype]:
    """Floating dtypes (float32 and float64 by default)."""
    return st.sampled_from(list(dtypes))


def depths(min_depth: int = 1, max_depth: int = 16) -> st.SearchStrategy[int]:
    return st.integers(min_depth, max_depth)


@st.composite
def tensors(
    draw: Callable, shape: Tuple[int, ...], dtype: torch.dtype = torch.float64, scale: float = 1.0
) -> torch.Tensor:
    """A finite normal tensor of ``shape`` from a seeded generator (the seed is drawn)."""
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _mlp_branch(params, x, scale=None):
    """``tanh(x W1 + b1) W2``, times an optional routed ``scale``. Shapes: (*, d) -> (*, d)."""
    out = torch.tanh(x @ params["w1"] + params["b1"]) @ params["w2"]
    return out if scale is None else out * scale


@st.composite
def mlp_blocks(
    draw: Callable,
    depth: int,
    dim: int,
    dtype: torch.dtype = torch.float64,
    hidden: Optional[int] = None,
    out_mult: int = 1,
) -> Tuple[list, list]:
    """``(blocks, params)``: ``depth`` pairs of pure tanh-MLP branches with random weights.

    Weights are scaled by ``1/sqrt(fan_in)`` so deep stacks stay well conditioned.
    ``out_mult=2``: each branch outputs twice the width (``affine``'s ``(s_raw, t)``).
    """
    hidden = hidden or draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def branch_params():
        return {
            "w1": (torch.randn(dim, hidden, generator=gen, dtype=torch.float64) / dim**0.5).to(dtype),
            "b1": (torch.randn(hidden, generator=gen, dtype=torch.float64) * 0.1).to(dtype),
            "w2": (torch.randn(hidden, out_mult * dim, generator=gen, dtype=torch.float64) / hidden**0.5 * 0.5).to(
                dtype
            ),
        }

    blocks = [(_mlp_branch, _mlp_branch)] * depth
    params = [(branch_params(), branch_params()) for _ in range(depth)]
    return blocks, params


@st.composite
def attention_blocks(draw: Callable, depth: int, dim: int, dtype: torch.dtype = torch.float64) -> Tuple[list, list]:
    """``(blocks, params)``: pre-norm attention (f, takes ``mask=``) and feed-forward (g)."""
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if dim % h == 0]))
    torch_seed = draw(st.integers(0, 2**31 - 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(torch_seed)
        layers = torch.nn.ModuleList(
            torch.nn.ModuleList([Attention(dim, heads), FeedForward(dim, mult=2)]) for _ in range(depth)
        ).to(dtype)
    return revfunc.pure_blocks(layers)


@st.composite
def routed_kwargs(
    draw: Callable, depth: int, batch_shape: Tuple[int, ...], dim: int, dtype: torch.dtype = torch.float64
) -> list:
    """A differentiable ``scale`` tensor of shape ``(dim,)`` routed to a random subset of
    branches with :func:`revfunc.route_args` (for :func:`mlp_blocks`)."""
    route = tuple(draw(st.tuples(st.booleans(), st.booleans())) for _ in range(depth))
    scale = draw(tensors((dim,), dtype, scale=0.3)) + 1.0
    return revfunc.route_args({"scale": route}, {"scale": scale}, depth)


def couplings(kinds: Sequence[str] = ("additive", "scaled", "momentum", "affine")) -> st.SearchStrategy:
    """A :class:`revfunc.couplings.Coupling` of one of ``kinds``, with a well-conditioned
    factor (``scaled``: 0.5 to 2; ``momentum``: 0.5 to 1; ``affine``: clamp 1 to 3)."""
    from revfunc import couplings as c

    factor = st.integers(0, 8)  # small ints: shrink well
    made = {
        "additive": st.just(c.additive()),
        "scaled": factor.map(lambda k: c.scaled(0.5 + 1.5 * k / 8)),
        "momentum": factor.map(lambda k: c.momentum(0.5 + 0.5 * k / 8)),
        "affine": factor.map(lambda k: c.affine(clamp=1.0 + 2.0 * k / 8)),
    }
    return st.one_of(*(made[k] for k in kinds))


@st.composite
def stacks(
    draw: Callable,
    max_depth: int = 16,
    max_dim: int = 6,
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
    kind: Optional[str] = None,
    coupled: bool = False,
) -> Stack:
    """A whole example: blocks (MLP with routed kwargs, or attention), params and inputs.

    Args:
        max_depth: largest depth drawn (from 1).
        max_dim: largest half-width drawn (attention stacks: 4 to 8, at least 4).
        dtypes: floating dtypes to draw from.
        kind: ``"mlp"``, ``"attention"`` or ``None`` (either).
        coupled: also draw one coupling pair per block (:func:`couplings`; MLP blocks,
            twice the width where a block is ``affine``), in ``Stack.coupling``.
    """
    dtype = draw(float_dtypes(dtypes))
    depth = draw(depths(1, max_depth))
    if coupled:
        return draw(_coupled_stack(depth, max_dim, dtype))
    kind = kind or draw(st.sampled_from(["mlp", "attention"]))
    if kind == "attention":
        # Not 2: LayerNorm over two features maps to +-1 and its Jacobian blows up where
        # the two are close, so float32 gradient checks fail there for any implementation
        # (15 of 110 width-2 draws measured; 5 of 81 with the einsum attention before SDPA).
        dim = draw(st.sampled_from([d for d in (4, 6, 8) if d <= max(max_dim, 4)]))
        batch = (draw(st.integers(1, 3)), draw(st.integers(1, 5)))
        blocks, params = draw(attention_blocks(depth, dim, dtype))
        kwargs = None
    else:
        dim = draw(st.integers(1, max_dim))
        batch = draw(shapes())
        blocks, params = draw(mlp_blocks(depth, dim, dtype))
        kwargs = draw(st.none() | routed_kwargs(depth, batch, dim, dtype))
    x1 = draw(tensors((*batch, dim), dtype))
    x2 = draw(tensors((*batch, dim), dtype))
    return Stack(blocks, params, x1, x2, kwargs)


@st.composite
def _coupled_stack(draw: Callable, depth: int, max_dim: int, dtype: torch.dtype) -> Stack:
    """MLP blocks with one drawn coupling pair per block (see :func:`stacks`)."""
    dim = draw(st.integers(1, max_dim))
    batch = draw(shapes())
    pairs = [(draw(couplings()), draw(couplings())) for _ in range(depth)]
    blocks, params = [], []
    for pair in pairs:  # each branch sized for its coupling
        fg, pp = [], []
        for c in pair:
            b, p = draw(mlp_blocks(1, dim, dtype, out_mult=2 if c.output == "pair" else 1))
            fg.append(b[0][0])
            pp.append(p[0][0])
        blocks.append(tuple(fg))
        params.append(tuple(pp))
    x1 = draw(tensors((*batch, dim), dtype))
    x2 = draw(tensors((*batch, dim), dtype))
    return Stack(blocks, params, x1, x2, None, pairs)
