"""Normalised causal linear attention (the linear + RoPE baseline) as two zero-decay gated linear
attentions, so it inherits their chunked / recurrent / fla paths and their decoding state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.ops.common import accumulation_dtype
from lina_pl.ops.gated_linear_attention import gated_linear_attention


def elu_feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1`` (Katharopoulos et al.): positive features for plain linear attention."""
    return F.elu(x) + 1.0


def causal_linear_attention(
    q_features: Tensor,
    k_features: Tensor,
    v: Tensor,
    *,
    q_rotated: Tensor | None = None,
    k_rotated: Tensor | None = None,
    eps: float = 1e-6,
    state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Normalised causal linear attention; RoPE (if given) enters only the numerator.

    ``o_t = Σ_{j≤t} ⟨q̃_t, k̃_j⟩ v_j / (Σ_{j≤t} ⟨φq_t, φk_j⟩ + eps)`` with ``q̃, k̃`` the rotated features
    (or the features themselves). Both sums are gated linear attentions with zero decay; the
    ``(numerator_state, denominator_state)`` pair continues a sequence for decoding.
    """
    q_num = q_features if q_rotated is None else q_rotated
    k_num = k_features if k_rotated is None else k_rotated
    zero = torch.zeros_like(k_num, dtype=accumulation_dtype(k_num.dtype))
    num_state, den_state = (None, None) if state is None else state
    numerator, num_state = gated_linear_attention(
        q_num, k_num, v, zero, scale=1.0, initial_state=num_state, output_final_state=True
    )
    ones = torch.ones_like(v[..., :1])
    denominator, den_state = gated_linear_attention(
        q_features, k_features, ones, zero, scale=1.0, initial_state=den_state, output_final_state=True
    )
    acc = accumulation_dtype(v.dtype)
    out = numerator.to(acc) / (denominator.to(acc) + eps)
    return out.to(v.dtype), (num_state, den_state)
