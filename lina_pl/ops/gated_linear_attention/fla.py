"""Glue to fla's GLA Triton kernels; imported only once ``backend`` resolved to ``"fla"`` (CUDA inputs)."""

from __future__ import annotations

from fla.ops.gla import chunk_gla, fused_recurrent_gla
from torch import Tensor


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    scale: float,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """``fused_recurrent_gla`` for a single token (decoding), ``chunk_gla`` for anything longer.

    fla wants the log-decay and the state in fp32 whatever the dtype of q, k, v.
    """
    if initial_state is not None:
        initial_state = initial_state.float()
    g = log_decay.float()
    if q.shape[1] == 1:
        o, state = fused_recurrent_gla(
            q, k, v, gk=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    else:
        o, state = chunk_gla(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    return o, state
