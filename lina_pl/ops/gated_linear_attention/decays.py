"""Decay parameterisations that feed ``log_decay``: HGRN2's lower-bounded forget gate, TNL's fixed decays."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.ops.common import accumulation_dtype


def hgrn2_lower_bounds(logits: Tensor) -> Tensor:
    """HGRN2's per-layer forget-gate lower bounds from a ``[L, D]`` parameter.

    ``β = cumsum(softmax(logits, 0)) − softmax(logits, 0)[0]``: β_0 = 0 and the bound never decreases with
    depth (β_l = l/L at the zero init).
    """
    p = logits.float().softmax(dim=0)
    return p.cumsum(dim=0) - p[:1]


def lower_bounded_log_sigmoid(f: Tensor, lower_bound: Tensor | None) -> Tensor:
    """``log(β + (1 − β)·σ(f))`` computed stably in fp32 (fp64 for fp64 input); ``β = None`` gives
    ``logsigmoid(f)``."""
    acc = accumulation_dtype(f.dtype)
    g = F.logsigmoid(f.to(acc))
    if lower_bound is None:
        return g
    beta = lower_bound.to(acc)
    return torch.logaddexp(beta.log(), torch.log1p(-beta) + g)


def tnl_log_decay(num_heads: int, layer_idx: int, num_layers: int, form: str = "lightning") -> Tensor:
    """Fixed per-head log-decays of TNL / Lightning Attention, ``[H]``.

    ``lightning`` (fla's lightning ops): ``−(8/H)(1 − l/L)·h`` (head 0 never decays, decay weakens with
    depth). ``alibi`` (TNL/MiniMax code): ``−2^(−8(h+1)/H) · (1 − l/(L−1) + 1e−5)``.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    if form == "lightning":
        return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h
    if form == "alibi":
        depth = 1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5
        return -(2.0 ** (-8.0 * (h + 1) / num_heads)) * depth
    raise ValueError(f"form must be 'lightning' or 'alibi', got {form!r}")
