"""Transformer blocks around any token mixer: NOVA's post-norm block (LINA), LlamaGen's pre-norm block."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lina_pl.nn import functional as LF


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


def swiglu_hidden(dim: int, multiple_of: int = 256) -> int:
    """LlamaGen's SwiGLU width: ``int(2·4d/3)`` rounded up to a multiple of 256."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) · w3 x)`` without biases, then dropout (LlamaGen's ``ffn_dropout_p``)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class PreNormBlock(nn.Module):
    """LlamaGen's block: ``h = x + drop(mixer(RMSNorm(x)))``, ``out = h + SwiGLU(RMSNorm(h))``.

    ``forward`` runs a whole sequence; ``step`` runs a causal mixer with its recurrent state or KV cache
    (``mixer.step(x, state, position, **layout)``). Keyword arguments go to the mixer.
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        *,
        ffn_dropout: float = 0.0,
        resid_dropout: float = 0.0,
        norm_eps=1e-5,
    ):
        super().__init__()
        self.attn = mixer
        self.attention_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.feed_forward = SwiGLU(dim, swiglu_hidden(dim), ffn_dropout)
        self.resid_dropout = nn.Dropout(resid_dropout)

    def _norm(self, norm: nn.RMSNorm, x: Tensor) -> Tensor:
        return LF.rms_norm(x, norm.weight, norm.eps)

    def _feed_forward(self, h: Tensor) -> Tensor:
        return h + self.feed_forward(self._norm(self.ffn_norm, h))

    def forward(self, x: Tensor, **layout) -> Tensor:
        h = x + self.resid_dropout(self.attn(self._norm(self.attention_norm, x), **layout))
        return self._feed_forward(h)

    def step(self, x: Tensor, state, position: int, **layout) -> tuple[Tensor, object]:
        y, state = self.attn.step(self._norm(self.attention_norm, x), state, position, **layout)
        return self._feed_forward(x + self.resid_dropout(y)), state
