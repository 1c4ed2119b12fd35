"""Example branch modules: pre-norm attention and feed-forward, as in Reformer-style stacks.

Used by revfunc's tests, strategies, benchmark and notebooks, and handy for users'
own experiments. Dims: ``b`` batch, ``n`` tokens, ``d`` width, ``h`` heads.
"""

from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import nn

__all__ = ["Attention", "FeedForward", "transformer_layers", "mlp_layers"]


class Attention(nn.Module):
    """Pre-norm multi-head self-attention with an optional key mask.

    ``forward(x, mask=None)``: ``mask`` is a bool tensor ``(b, n)``, True where a token
    may be attended to.

    Shapes: (b, n, d) -> (b, n, d).
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"revfunc.testing.blocks.Attention: dim expected a multiple of heads={heads}, got {dim}.")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self.to_qkv(self.norm(x)).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b n (h e) -> b h n e", h=self.heads) for t in (q, k, v))
        sim = torch.einsum("bhie,bhje->bhij", q, k) * q.shape[-1] ** -0.5
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], torch.finfo(sim.dtype).min)
        attn = self.dropout(sim.softmax(dim=-1))
        out = torch.einsum("bhij,bhje->bhie", attn, v)
        return self.to_out(rearrange(out, "b h n e -> b n (h e)"))


class FeedForward(nn.Module):
    """Pre-norm two-layer GELU MLP. Shapes: (*, d) -> (*, d)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim * mult, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def transformer_layers(depth: int, dim: int, heads: int = 4, mult: int = 4, dropout: float = 0.0) -> nn.ModuleList:
    """``depth`` pairs ``(Attention, FeedForward)``, the classic container's input."""
    return nn.ModuleList(
        nn.ModuleList([Attention(dim, heads, dropout), FeedForward(dim, mult, dropout)]) for _ in range(depth)
    )


def mlp_layers(depth: int, dim: int, hidden: int = 16, dropout: float = 0.0) -> nn.ModuleList:
    """``depth`` pairs of small tanh MLPs ``Linear -> Tanh -> Dropout -> Linear``."""

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, dim))

    return nn.ModuleList(nn.ModuleList([mlp(), mlp()]) for _ in range(depth))
