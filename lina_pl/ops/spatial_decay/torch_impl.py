"""LASAD's spatial-aware decay (Eq. 12) in PyTorch: which raster positions keep (or wipe) the state."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SadMode = Literal["keep", "reset"]
SadPosition = Literal["row_last", "row_second_last", "row_first"]

#: Log-decay used by the "reset" reading of spatial-aware decay. Finite on purpose: a chunked cumulative
#: sum of ``-inf`` turns into ``-inf - (-inf) = nan``; exp(-60) ~ 1e-26 already erases the state.
RESET_LOG_DECAY = -60.0


def spatial_aware_mask(positions: Tensor, width: int, position: SadPosition = "row_last") -> Tensor:
    """True at the absolute sequence positions whose decay LASAD overrides (class token at 0).

    ``row_last``: ``p % w == 0`` (Eq. 12 with t = image-token index; default), ``row_second_last``:
    ``p % w == w − 1`` (Algorithm 1 read on the layer input), ``row_first``: ``p % w == 1``
    (the actual row crossing). See ``reference/lasad.md`` §2.3.
    """
    if width < 1:
        raise ValueError(f"width must be ≥ 1, got {width}")
    residue = {"row_last": 0, "row_second_last": width - 1, "row_first": 1 % width}
    if position not in residue:
        raise ValueError(f"position must be one of {sorted(residue)}, got {position!r}")
    return positions.remainder(width) == residue[position]


def spatial_aware_log_decay(
    log_decay: Tensor,
    width: int,
    *,
    start: int = 0,
    mode: SadMode = "keep",
    position: SadPosition = "row_last",
) -> Tensor:
    """LASAD's spatial-aware decay on ``log_decay`` ``[B, T, H, …]`` at absolute positions ``start + t``.

    ``keep`` (Eq. 12, default): log-decay 0 (λ = 1, no forgetting) at the masked positions. ``reset``
    (the paper's prose): :data:`RESET_LOG_DECAY`, a large finite negative value, so the state is wiped.
    """
    if mode not in ("keep", "reset"):
        raise ValueError(f"mode must be 'keep' or 'reset', got {mode!r}")
    t = log_decay.shape[1]
    positions = torch.arange(start, start + t, device=log_decay.device)
    mask = spatial_aware_mask(positions, width, position).view(1, t, *([1] * (log_decay.dim() - 2)))
    fill = 0.0 if mode == "keep" else RESET_LOG_DECAY
    return log_decay.masked_fill(mask, fill)
