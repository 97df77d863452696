"""Token mixers, their functional ops, position encodings and locality modules."""

from lina_pl.nn.attention import (
    MIXER_NAMES,
    GlaAttention,
    KVCache,
    LasadAttention,
    LinaAttention,
    LinearRopeAttention,
    SoftmaxAttention,
    TnlAttention,
    create_mixer,
)
from lina_pl.nn.locality import DepthwiseConvGrid, KVGate
from lina_pl.nn.optim import parameter_groups

__all__ = [
    "MIXER_NAMES",
    "DepthwiseConvGrid",
    "GlaAttention",
    "KVCache",
    "KVGate",
    "LasadAttention",
    "LinaAttention",
    "LinearRopeAttention",
    "SoftmaxAttention",
    "TnlAttention",
    "create_mixer",
    "parameter_groups",
]
