"""Helpers every op shares: the accumulation dtype, the ``[B, N, H, D]`` shape check, RMSNorm."""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (exact tests), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Reject q, k, v that are not ``[batch, seq, heads, head_dim]`` or do not fit (lengths may differ)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm computed in fp32 at least (LlamaGen/HGRN2 practice), returned in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


def float64(*xs: Tensor | None) -> tuple[Tensor | None, ...]:
    """The references' inputs in float64 (``None`` passes through)."""
    return tuple(None if x is None else x.double() for x in xs)
