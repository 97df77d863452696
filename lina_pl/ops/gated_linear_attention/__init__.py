"""Causal gated linear attention (LASAD / HGRN2, GLA, TNL), dispatched on ``backend=``.

``reference`` holds the quadratic float64 form, ``torch_impl`` the PyTorch path (any device), ``fla`` the
glue to fla's CUDA kernels (imported only when chosen), ``decays`` the log-decay parameterisations.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lina_pl.ops.common import check_qkv
from lina_pl.ops.gated_linear_attention import decays, reference, torch_impl
from lina_pl.ops.gated_linear_attention.decays import (
    hgrn2_lower_bounds,
    lower_bounded_log_sigmoid,
    tnl_log_decay,
)
from lina_pl.ops.gated_linear_attention.torch_impl import (
    chunk_gated_linear_attention,
    recurrent_gated_linear_attention,
)

Backend = Literal["auto", "torch", "fla"]


def gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Causal ``S_t = exp(g_t)[:, None] · S_{t-1} + k_t v_tᵀ``, ``o_t = scale · q_tᵀ S_t``.

    ``log_decay`` (``g``) is ``[B, T, H, K]`` with values ≤ 0. ``scale`` defaults to ``K**-0.5``. The state
    ``[B, H, K, V]`` is fp32 (fp64 for fp64 inputs); pass it back as ``initial_state`` to continue a
    sequence, so decoding token by token equals one call over the whole sequence.

    ``backend``: ``"torch"`` runs the pure-PyTorch path on any device (chunked for training/prefill,
    recurrent for a single token); ``"fla"`` runs fla's ``chunk_gla``/``fused_recurrent_gla`` CUDA
    kernels; ``"auto"`` picks fla for bf16/fp16 CUDA inputs when it is installed.
    """
    check_qkv(q, k, v)
    if log_decay.shape != k.shape:
        raise ValueError(f"log_decay must match k's shape {tuple(k.shape)}, got {tuple(log_decay.shape)}")
    b, _, h, dk = k.shape
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(
            f"initial_state must be [B, H, K, V] = {(b, h, dk, v.shape[-1])}, "
            f"got {tuple(initial_state.shape)}"
        )
    scale = dk**-0.5 if scale is None else scale
    if _resolve_backend(backend, q) == "fla":
        from lina_pl.ops.gated_linear_attention import fla  # lazy: needs CUDA + triton

        run = fla.gated_linear_attention
    else:
        run = torch_impl.gated_linear_attention
    return run(
        q, k, v, log_decay, scale=scale, initial_state=initial_state, output_final_state=output_final_state
    )


def _resolve_backend(backend: str, q: Tensor) -> str:
    if backend not in ("auto", "torch", "fla"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
    if backend == "auto":
        # fla 0.6.0's chunk_gla raised "CUDA error: misaligned address" for fp32 inputs (T=17 with an
        # initial state; H100, triton 3.6), so fp32 stays on the torch path unless fla is asked for.
        half = q.dtype in (torch.bfloat16, torch.float16)
        return "fla" if q.is_cuda and half and fla_available() else "torch"
    if backend == "fla" and not q.is_cuda:
        raise RuntimeError("backend='fla' needs CUDA tensors (fla's Triton kernels have no CPU driver)")
    return backend


def fla_available() -> bool:
    """True when fla's kernels can run here: CUDA present and ``fla`` importable (checked without import)."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("fla") is not None


__all__ = [
    "Backend",
    "chunk_gated_linear_attention",
    "decays",
    "fla_available",
    "gated_linear_attention",
    "hgrn2_lower_bounds",
    "lower_bounded_log_sigmoid",
    "recurrent_gated_linear_attention",
    "reference",
    "tnl_log_decay",
    "torch_impl",
]
