"""Tensor ops behind every token mixer, one package per op in the fla style.

Layout everywhere: ``[batch, seq, heads, head_dim]``. Accumulations (states, normalisers) run in fp32 for
half-precision inputs and in fp64 for fp64 inputs (so ``gradcheck`` works); outputs come back in the
input dtype, recurrent states stay fp32 (or fp64).

Each ``lina_pl/ops/<op>/`` holds ``reference.py`` (the quadratic float64 form it is tested against),
``torch_impl.py`` (the PyTorch path; not ``torch.py``, whose name would replace ``torch`` in the package's
own namespace once imported) and kernel glue such as ``fla.py``. Here ``lina_pl.ops.<op>`` is the op's
function, so reach its modules with ``from lina_pl.ops.<op> import reference``.
"""

from lina_pl.ops.causal_linear_attention import causal_linear_attention, elu_feature_map
from lina_pl.ops.common import accumulation_dtype, rms_norm
from lina_pl.ops.gated_linear_attention import (
    Backend,
    chunk_gated_linear_attention,
    fla_available,
    gated_linear_attention,
    hgrn2_lower_bounds,
    lower_bounded_log_sigmoid,
    recurrent_gated_linear_attention,
    tnl_log_decay,
)
from lina_pl.ops.linear_attention import LinearAttentionBackend, Normalization, linear_attention
from lina_pl.ops.softmax_attention import softmax_attention
from lina_pl.ops.spatial_decay import (
    RESET_LOG_DECAY,
    SadMode,
    SadPosition,
    spatial_aware_log_decay,
    spatial_aware_mask,
)

__all__ = [
    "RESET_LOG_DECAY",
    "Backend",
    "LinearAttentionBackend",
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
