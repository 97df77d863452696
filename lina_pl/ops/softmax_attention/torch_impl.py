"""Softmax attention through ``scaled_dot_product_attention`` (flash / memory-efficient kernels where
PyTorch has them), in the ``[B, N, H, D]`` layout of every op here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.ops.common import check_qkv


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None
) -> Tensor:
    """``scaled_dot_product_attention`` in the ``[B, N, H, D]`` layout (flash kernels where available).

    With ``causal=True`` and fewer queries than keys (decoding with a KV cache) the queries are the last
    ones, i.e. query i attends to keys ``j ≤ i + (N_k − N_q)``.
    """
    check_qkv(q, k, v)
    nq, nk = q.shape[1], k.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    if causal and nq != nk:
        if nq == 1:  # one new token sees every cached key
            out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)
        else:
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    return out.transpose(1, 2)
