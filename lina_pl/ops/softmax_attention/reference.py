"""Quadratic float64 reference of softmax attention: explicit ``softmax(QKᵀ·scale)`` weights."""

from __future__ import annotations

import torch
from torch import Tensor

from lina_pl.ops.common import float64


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale=None) -> Tensor:
    """Explicit softmax(QKᵀ·scale)V; causal queries are the last ``N_q`` positions of the keys."""
    q, k, v = float64(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v)
