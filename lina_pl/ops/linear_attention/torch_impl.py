"""Bidirectional linear attention in PyTorch: O(N·d²) on any device, never forming the N×N weights.

Inputs are validated by :func:`lina_pl.ops.linear_attention.linear_attention`, which dispatches here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.ops.common import accumulation_dtype


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: str,
    key_gate: Tensor | None,
    value_gate: Tensor | None,
    eps: float,
) -> Tensor:
    """Division runs the blocked kernel with its hand-written backward; subtraction is plain autograd."""
    if normalization == "division":
        return _DivisionLinearAttention.apply(q, k, v, key_gate, value_gate, eps)
    return _subtraction_linear_attention(q, k, v, key_gate, value_gate)


def _subtraction_linear_attention(q, k, v, key_gate, value_gate) -> Tensor:
    acc = accumulation_dtype(q.dtype)
    fq, fk, v = F.relu(q.to(acc)), F.relu(k.to(acc)), v.to(acc)
    if key_gate is not None:
        fk = fk * key_gate.to(acc)
    if value_gate is not None:
        v = v * value_gate.to(acc)
    scale = q.shape[-1] ** -0.5
    # Means instead of sums: the 1/N split keeps the state O(1) whatever the length.
    state = torch.einsum("bnhk,bnhv->bhkv", fk, v) / k.shape[1]
    weight_of_mean = 1.0 - scale * torch.einsum("bnhk,bhk->bnh", fq, fk.mean(dim=1))
    out = scale * torch.einsum("bnhk,bhkv->bnhv", fq, state) + weight_of_mean.unsqueeze(-1) * v.mean(
        1, keepdim=True
    )
    return out.to(q.dtype)


#: Tokens per block in the blocked division kernel: transient memory is O(block · D), not O(N · D).
TOKEN_BLOCK = 4096


class _DivisionLinearAttention(torch.autograd.Function):
    """LINA's division form as a blocked two-pass computation with a hand-written backward.

    Forward: pass 1 accumulates the state ``Σ φ(k) vᵀ / N`` and ``mean φ(k)`` block by block; pass 2
    reads each block of queries out into the ``[B, N, H, V]`` output (so merging heads is free). Backward
    does the same with the gradient reductions. Feature maps exist one block at a time, in a
    contiguous ``[B, H, block, D]`` layout (elementwise ops over mixed layouts are slow on CPU), and only
    q, k, v (views of the qkv projection, alive anyway), the tiny state/normaliser and the output are
    saved — a training step costs about the memory of its projections.
    """

    @staticmethod
    def _heads_first(x: Tensor, acc: torch.dtype, relu_eps: float | None = None) -> Tensor:
        """A fresh contiguous ``[B, H, n, D]`` copy in ``acc``, optionally as ``ReLU(x) + eps``."""
        out = torch.empty(x.shape[0], x.shape[2], x.shape[1], x.shape[3], dtype=acc, device=x.device)
        if relu_eps is None:
            return out.copy_(x.transpose(1, 2))
        if x.dtype == acc:  # read the strided input once, write φ(x) contiguous
            torch.clamp(x.transpose(1, 2), min=0, out=out)
        else:
            out.copy_(x.transpose(1, 2)).clamp_(min=0)
        return out.add_(relu_eps)

    @staticmethod
    def _gate_block(gate: Tensor | None, block: slice, acc) -> Tensor | None:
        if gate is None:
            return None
        return _DivisionLinearAttention._heads_first(gate if gate.shape[1] == 1 else gate[:, block], acc)

    @staticmethod
    def forward(ctx, q, k, v, key_gate, value_gate, eps):
        heads_first, gate_block = _DivisionLinearAttention._heads_first, _DivisionLinearAttention._gate_block
        acc = accumulation_dtype(q.dtype)
        b, n, h, dk = k.shape
        blocks = [slice(i, min(i + TOKEN_BLOCK, n)) for i in range(0, n, TOKEN_BLOCK)]
        state = torch.zeros(b, h, dk, v.shape[-1], dtype=acc, device=q.device)
        k_sum = torch.zeros(b, h, 1, dk, dtype=acc, device=q.device)
        for blk in blocks:
            fk = heads_first(k[:, blk], acc, eps)
            vg = heads_first(v[:, blk], acc)
            if key_gate is not None:
                fk = fk.mul_(gate_block(key_gate, blk, acc))
            if value_gate is not None:
                vg = vg.mul_(gate_block(value_gate, blk, acc))
            state += fk.mT @ vg
            k_sum += fk.sum(dim=2, keepdim=True)
        state, k_mean = state.div_(n), k_sum.div_(n)  # means keep the state O(1) whatever the length
        nq = q.shape[1]
        out = torch.empty(b, nq, h, v.shape[-1], dtype=acc, device=q.device)
        denominator = torch.empty(b, h, nq, 1, dtype=acc, device=q.device)
        for blk in [slice(i, min(i + TOKEN_BLOCK, nq)) for i in range(0, nq, TOKEN_BLOCK)]:
            fq = heads_first(q[:, blk], acc, eps)
            den = (fq @ k_mean.mT).add_(eps)
            denominator[:, :, blk] = den
            out[:, blk] = (fq @ state).div_(den).transpose(1, 2)
        ctx.eps = eps
        ctx.save_for_backward(q, k, v, key_gate, value_gate, state, k_mean, denominator, out)
        return out.to(q.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        heads_first, gate_block = _DivisionLinearAttention._heads_first, _DivisionLinearAttention._gate_block
        q, k, v, key_gate, value_gate, state, k_mean, denominator, out = ctx.saved_tensors
        eps, acc = ctx.eps, state.dtype
        n, nq = k.shape[1], q.shape[1]
        # Pass over query blocks: grad of q, and the reductions that flow back into the state.
        grad_q = torch.empty_like(q)
        grad_state = torch.zeros_like(state)
        grad_k_sum = torch.zeros_like(k_mean)
        for blk in [slice(i, min(i + TOKEN_BLOCK, nq)) for i in range(0, nq, TOKEN_BLOCK)]:
            fq = heads_first(q[:, blk], acc, eps)
            grad_num = heads_first(grad_out[:, blk], acc).div_(denominator[:, :, blk])
            # d o / d den = −o / den, so grad_den = −Σ_v grad_num · o
            grad_den = (grad_num * out[:, blk].transpose(1, 2)).sum(-1, keepdim=True).neg_()
            grad_state += fq.mT @ grad_num
            grad_k_sum += grad_den.mT @ fq
            grad_fq = (grad_num @ state.mT).add_(grad_den * k_mean).mul_(fq > eps)
            grad_q[:, blk] = grad_fq.transpose(1, 2)
        grad_state, grad_k_mean = grad_state.div_(n), grad_k_sum.div_(n)
        # Pass over key blocks: grads of k, v and the gates.
        grad_k, grad_v = torch.empty_like(k), torch.empty_like(v)
        need_key_gate = key_gate is not None and ctx.needs_input_grad[3]
        need_value_gate = value_gate is not None and ctx.needs_input_grad[4]
        grad_key_gate = torch.zeros_like(key_gate, dtype=acc) if need_key_gate else None
        grad_value_gate = torch.zeros_like(value_gate, dtype=acc) if need_value_gate else None
        for blk in [slice(i, min(i + TOKEN_BLOCK, n)) for i in range(0, n, TOKEN_BLOCK)]:
            raw_fk = heads_first(k[:, blk], acc, eps)
            raw_v = heads_first(v[:, blk], acc)
            gk, gv = gate_block(key_gate, blk, acc), gate_block(value_gate, blk, acc)
            fk = raw_fk if gk is None else raw_fk * gk
            vg = raw_v if gv is None else raw_v * gv
            grad_vg = fk @ grad_state
            grad_fk = (vg @ grad_state.mT).add_(grad_k_mean)
            if need_key_gate:
                _accumulate_gate_grad(grad_key_gate, (grad_fk * raw_fk).sum(-1, keepdim=True), blk)
            if need_value_gate:
                _accumulate_gate_grad(grad_value_gate, (grad_vg * raw_v).sum(-1, keepdim=True), blk)
            if gk is not None:
                grad_fk = grad_fk.mul_(gk)
            if gv is not None:
                grad_vg = grad_vg.mul_(gv)
            grad_k[:, blk] = grad_fk.mul_(raw_fk > eps).transpose(1, 2)
            grad_v[:, blk] = grad_vg.transpose(1, 2)
        if grad_key_gate is not None:
            grad_key_gate = grad_key_gate.to(key_gate.dtype)
        if grad_value_gate is not None:
            grad_value_gate = grad_value_gate.to(value_gate.dtype)
        return grad_q, grad_k, grad_v, grad_key_gate, grad_value_gate, None


def _accumulate_gate_grad(grad_gate: Tensor, block_grad: Tensor, blk: slice) -> None:
    """Add a ``[B, H, n, 1]`` block gradient into the gradient of a ``[B|1, N|1, H|1, 1]`` gate."""
    block_grad = block_grad.transpose(1, 2)  # [B, n, H, 1]
    if grad_gate.shape[1] == 1:
        grad_gate += block_grad.sum_to_size(grad_gate.shape)
    else:
        target = grad_gate[:, blk]
        target += block_grad.sum_to_size(target.shape)
