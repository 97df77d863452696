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


def cfg_scale(cfg: float, step: int, steps: int, schedule: str = "linear") -> float:
    """Guidance at AR step k of T: ``linear`` ramps ``1 + (cfg − 1)(k + 1)/T``; ``constant`` is cfg."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * (step + 1) / steps
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")
