"""Schedules shared by training and generation: mask ratios, unmasking counts, guidance scales."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def truncated_normal_mask_ratio(shape, low: float, high: float, std: float, device=None) -> Tensor:
    """MAR's mask ratio: a normal centred on ``high`` with ``std``, truncated to ``[low, high]``.

    Drawn by inverting the normal CDF on the truncated interval (exact, no rejection loop).
    """
    if std <= 0:
        return torch.full(shape, high, device=device)
    a = torch.special.ndtr(torch.tensor((low - high) / std, dtype=torch.float64))
    u = a + (0.5 - a) * torch.rand(shape, dtype=torch.float64, device=device)  # Φ(0) = 0.5 at the mean
    return (high + std * torch.special.ndtri(u)).clamp(low, high).float()


def cosine_mask_counts(num_tokens: int, steps: int) -> list[int]:
    """Tokens still masked after each of ``steps`` steps: ``m_k = round(cos(π/2 · k/T) · L)``, k = 0..T.

    ``m_0 = L`` and ``m_T = 0``, so over the whole schedule every token is predicted exactly once; step k
    predicts ``m_k − m_{k+1}`` tokens (few early, many late).
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    counts = [round(math.cos(math.pi / 2 * k / steps) * num_tokens) for k in range(steps + 1)]
    counts[0], counts[-1] = num_tokens, 0
    return counts


#: guidance schedules over the AR steps (see :func:`cfg_scale`)
CFG_SCHEDULES = ("linear", "constant")


def cfg_scale(cfg: float, step: int, steps: int, schedule: str = "linear") -> float:
    """Guidance at AR step k of T: ``linear`` ramps ``1 + (cfg − 1)(k + 1)/T``; ``constant`` is cfg."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (step + 1) / steps
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def sample_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One code per row of ``logits [B, V]``: divide by ``max(temperature, 1e-5)``, keep the ``top_k``
    largest (0 = all) and the smallest set whose probability reaches ``top_p`` (the top token always
    stays), then sample."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already ≥ p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
