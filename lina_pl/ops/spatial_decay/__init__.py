"""Spatial-aware decay (LASAD Eq. 12): a mask on the log-decay of gated linear attention."""

from lina_pl.ops.spatial_decay import torch_impl
from lina_pl.ops.spatial_decay.torch_impl import (
    RESET_LOG_DECAY,
    SadMode,
    SadPosition,
    spatial_aware_log_decay,
    spatial_aware_mask,
)

__all__ = [
    "RESET_LOG_DECAY",
    "SadMode",
    "SadPosition",
    "spatial_aware_log_decay",
    "spatial_aware_mask",
    "torch_impl",
]
