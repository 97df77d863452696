"""Quadratic float64 references: the ground truth the fast ops and the fla kernels are tested against.

Each function forms the explicit N×N (or T×T) weights, so it reads like the paper's equation and is only
meant for small sizes. Everything is computed in float64 and returned in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _f64(*xs: Tensor | None):
    return tuple(None if x is None else x.double() for x in xs)


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
    q, k, key_gate = _f64(q, k, key_gate)
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
    (v, value_gate) = _f64(v, value_gate)
    a = linear_attention_weights(q, k, normalization=normalization, key_gate=key_gate, eps=eps)
    if value_gate is not None:
        v = v * value_gate
    return torch.einsum("bhij,bjhd->bihd", a, v)


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale=None) -> Tensor:
    """Explicit softmax(QKᵀ·scale)V; causal queries are the last ``N_q`` positions of the keys."""
    q, k, v = _f64(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        nq, nk = q.shape[1], k.shape[1]
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v)


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
    q, k, v, g, h0 = _f64(q, k, v, log_decay, initial_state)
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
    fq, fk, v, qr, kr = _f64(q_features, k_features, v, q_rotated, k_rotated)
    qr = fq if qr is None else qr
    kr = fk if kr is None else kr
    t = fq.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=fq.device).tril()
    num = torch.einsum("bihd,bjhd->bhij", qr, kr).masked_fill(~allowed, 0.0)
    den = torch.einsum("bihd,bjhd->bhij", fq, fk).masked_fill(~allowed, 0.0).sum(-1)
    return torch.einsum("bhij,bjhd->bihd", num, v) / (den.transpose(1, 2).unsqueeze(-1) + eps)
