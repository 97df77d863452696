"""Quadratic float64 reference of causal gated linear attention: explicit ``T×T`` weights per channel.

Reads like the recurrence unrolled (``reference/lasad.md`` §4.4) and is only meant for small sizes;
computed and returned in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lina_pl.ops.common import float64


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Quadratic form of ``S_t = exp(g_t) S_{t-1} + k_t v_tᵀ, o_t = scale q_tᵀ S_t`` (lasad.md §4.4).

    ``o_t = Σ_{j≤t} Σ_c s q_tc k_jc exp(b_tc − b_jc) v_j + (s q_t ⊙ exp(b_t))ᵀ h0`` with ``b`` the inclusive
    cumulative sum of ``g``; returns ``(o, final_state)``.
    """
    q, k, v, g, h0 = float64(q, k, v, log_decay, initial_state)
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b = g.cumsum(dim=1)  # [B, T, H, K]
    diff = b.unsqueeze(2) - b.unsqueeze(1)  # [B, T(t), T(j), H, K]
    allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    decay = diff.masked_fill(~allowed[:, :, None, None], float("-inf")).exp()
    weights = torch.einsum("bthc,bjhc,btjhc->bhtj", q * scale, k, decay)
    o = torch.einsum("bhtj,bjhv->bthv", weights, v)
    final = torch.einsum("bjhc,bjhv->bhcv", k * (b[:, -1:] - b).exp(), v)
    if h0 is not None:
        o = o + torch.einsum("bthc,bhcv->bthv", q * scale * b.exp(), h0)
        final = final + b[:, -1].unsqueeze(-1).exp() * h0
    return o, final
