"""Quadratic float64 reference of normalised causal linear attention: explicit causal weights."""

from __future__ import annotations

import torch
from torch import Tensor

from lina_pl.ops.common import float64


def causal_linear_attention(
    q_features: Tensor,
    k_features: Tensor,
    v: Tensor,
    *,
    q_rotated: Tensor | None = None,
    k_rotated: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Explicit ``Σ_{j≤t} ⟨q̃_t, k̃_j⟩ v_j / (Σ_{j≤t} ⟨φq_t, φk_j⟩ + eps)``."""
    fq, fk, v, qr, kr = float64(q_features, k_features, v, q_rotated, k_rotated)
    qr = fq if qr is None else qr
    kr = fk if kr is None else kr
    t = fq.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=fq.device).tril()
    num = torch.einsum("bihd,bjhd->bhij", qr, kr).masked_fill(~allowed, 0.0)
    den = torch.einsum("bihd,bjhd->bhij", fq, fk).masked_fill(~allowed, 0.0).sum(-1)
    return torch.einsum("bhij,bjhd->bihd", num, v) / (den.transpose(1, 2).unsqueeze(-1) + eps)
