"""The public face of the tensor ops behind every token mixer (``lina_pl.nn.functional.<op>``).

The ops, their float64 references and their kernels live in :mod:`lina_pl.ops`, one package per op; this
module only re-exports them, so code and configs written against ``lina_pl.nn.functional`` keep working.
"""

from lina_pl.ops import (
    RESET_LOG_DECAY,
    Backend,
    Normalization,
    SadMode,
    SadPosition,
    accumulation_dtype,
    causal_linear_attention,
    chunk_gated_linear_attention,
    elu_feature_map,
    fla_available,
    gated_linear_attention,
    hgrn2_lower_bounds,
    linear_attention,
    lower_bounded_log_sigmoid,
    recurrent_gated_linear_attention,
    rms_norm,
    softmax_attention,
    spatial_aware_log_decay,
    spatial_aware_mask,
    tnl_log_decay,
)

__all__ = [
    "RESET_LOG_DECAY",
    "Backend",
    "Normalization",
    "SadMode",
    "SadPosition",
    "accumulation_dtype",
    "causal_linear_attention",
    "chunk_gated_linear_attention",
    "elu_feature_map",
    "fla_available",
    "gated_linear_attention",
    "hgrn2_lower_bounds",
    "linear_attention",
    "lower_bounded_log_sigmoid",
    "recurrent_gated_linear_attention",
    "rms_norm",
    "softmax_attention",
    "spatial_aware_log_decay",
    "spatial_aware_mask",
    "tnl_log_decay",
]
