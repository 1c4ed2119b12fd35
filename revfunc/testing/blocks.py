"""Example branch modules: pre-norm attention and feed-forward, as in Reformer-style stacks.

Used by revfunc's tests, strategies, benchmark and notebooks, and handy for users'
own experiments. Dims: ``b`` batch, ``n`` tokens, ``d`` width, ``h`` heads.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F

__all__ = ["Attention", "FeedForward", "transformer_layers", "mlp_layers"]


class Attention(nn.Module):
    """Pre-norm multi-head self-attention on ``F.scaled_dot_product_attention``.

    ``forward(x, mask=None)``: ``mask`` is a bool key mask ``(b, n)``, True where a
    token may be attended to; it becomes SDPA's ``attn_mask`` (broadcast over heads and
    queries). ``causal=True`` also keeps each query from attending to later tokens
    (combined with ``mask`` when both are given). ``dropout`` is SDPA's ``dropout_p`` in
    training mode and 0 in eval mode; it draws from the global RNG, which revfunc forks
    per branch call and replays exactly in backward. The n x n attention matrix is never
    materialized when SDPA can pick a fused kernel (no mask, no dropout on CPU), so
    activations are O(n) per block: the long-context regime reversible stacks are for.
    A query whose keys are all masked gets NaN (as SDPA defines it): keep at least one
    key per example.

    Shapes: (b, n, d) -> (b, n, d).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"revfunc.testing.blocks.Attention: dim expected a multiple of heads={heads}, got {dim}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"revfunc.testing.blocks.Attention: dropout expected in [0, 1), got {dropout!r}.")
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = rearrange(self.to_qkv(self.norm(x)), "b n (t h e) -> t b h n e", t=3, h=self.heads)
        attn_mask, is_causal = None, self.causal
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape != x.shape[:2]:
                raise ValueError(
                    "revfunc.testing.blocks.Attention: mask expected a bool tensor of shape "
                    f"{tuple(x.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}."
                )
            attn_mask = mask[:, None, None, :]
            if self.causal:  # SDPA takes is_causal or attn_mask, not both
                n = x.shape[1]
                attn_mask = attn_mask & torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                is_causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dropout={self.dropout}, causal={self.causal}"


class FeedForward(nn.Module):
    """Pre-norm two-layer GELU MLP. Shapes: (*, d) -> (*, d)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def transformer_layers(
    depth: int, dim: int, heads: int = 4, mult: int = 4, dropout: float = 0.0, causal: bool = False
) -> nn.ModuleList:
    """``depth`` pairs ``(Attention, FeedForward)``, the classic container's input."""
    return nn.ModuleList(
        nn.ModuleList([Attention(dim, heads, dropout, causal), FeedForward(dim, mult, dropout)]) for _ in range(depth)
    )


def mlp_layers(depth: int, dim: int, hidden: int = 16, dropout: float = 0.0) -> nn.ModuleList:
    """``depth`` pairs of small tanh MLPs ``Linear -> Tanh -> Dropout -> Linear``."""

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    return nn.ModuleList(nn.ModuleList([mlp(), mlp()]) for _ in range(depth))


def subnet_layers(depth: int, dim: int, hidden: int = 64, out_mult: int = 2) -> nn.ModuleList:
    """``depth`` pairs of flow subnets ``Linear -> ReLU -> Linear -> ReLU -> Linear`` from
    ``dim`` to ``out_mult * dim`` features (``affine``'s ``(s_raw, t)``, FrEIA's subnet
    convention); the last layer starts at a tenth of its default scale, so a deep flow
    starts near the identity. Shapes: (*, dim) -> (*, out_mult * dim)."""

    def subnet() -> nn.Module:
        net = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out_mult * dim)
        )
        last: Any = net[-1]
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.mul_(0.1)
        return net

    return nn.ModuleList(nn.ModuleList([subnet(), subnet()]) for _ in range(depth))
