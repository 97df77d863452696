"""Quadratic float64 reference of bidirectional linear attention: explicit ``[B, H, N_q, N_k]`` weights.

Reads like the papers' equations and is only meant for small sizes; computed and returned in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lina_pl.ops.common import float64


def linear_attention_weights(
    q: Tensor,
    k: Tensor,
    *,
    normalization: str = "division",
    key_gate: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """The implied attention matrix ``[B, H, N_q, N_k]`` of bidirectional linear attention.

    Division rows sum to ``1 − N·eps/(Σ_j w_ij + N·eps)`` (one, up to eps); subtraction rows sum to one.
    """
    q, k, key_gate = float64(q, k, key_gate)
    n = k.shape[1]
    if normalization == "division":
        fq, fk = q.relu() + eps, k.relu() + eps
    else:
        fq, fk = q.relu(), k.relu()
    gk = torch.ones_like(fk[..., :1]) if key_gate is None else key_gate.expand(*fk.shape[:3], 1)
    raw = torch.einsum("bihd,bjhd->bhij", fq, fk) * gk[..., 0].permute(0, 2, 1).unsqueeze(2)
    if normalization == "division":
        return raw / (raw.sum(-1, keepdim=True) + n * eps)
    scale = q.shape[-1] ** -0.5
    return 1.0 / n + (scale / n) * (raw - raw.mean(-1, keepdim=True))


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: str = "division",
    key_gate: Tensor | None = None,
    value_gate: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """``o_i = Σ_j a_ij g^v_j v_j`` with the explicit weights of :func:`linear_attention_weights`."""
    (v, value_gate) = float64(v, value_gate)
    a = linear_attention_weights(q, k, normalization=normalization, key_gate=key_gate, eps=eps)
    if value_gate is not None:
        v = v * value_gate
    return torch.einsum("bhij,bjhd->bihd", a, v)
