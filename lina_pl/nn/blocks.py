"""Transformer blocks: NOVA's post-norm block (LINA) around any token mixer."""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Sequential):
    """``Linear(D, r·D) → GELU (exact) → Linear(r·D, D)`` with biases."""

    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class PostNormBlock(nn.Module):
    """NOVA's "res-post-norm" block: ``x += LN₁(mixer(x)); x += LN₂(MLP(x))`` (LN eps 1e-5, affine).

    The mixer sees the raw residual stream (LINA's depthwise conv is applied to it); keyword arguments
    (``n_cond``, ``grid_hw``) go to the mixer.
    """

    def __init__(self, dim: int, mixer: nn.Module, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = mixer
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, **layout) -> Tensor:
        x = x + self.norm1(self.attn(x, **layout))
        return x + self.norm2(self.mlp(x))
