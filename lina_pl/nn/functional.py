"""Pure tensor ops behind every token mixer.

Layout everywhere: ``[batch, seq, heads, head_dim]``. Accumulations (states, normalisers) run in fp32 for
half-precision inputs and in fp64 for fp64 inputs (so ``gradcheck`` works); outputs come back in the
input dtype, recurrent states stay fp32 (or fp64).

The float64 quadratic references these ops are tested against live in :mod:`lina_pl.nn.naive`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Normalization = Literal["division", "subtraction"]
Backend = Literal["auto", "torch", "fla"]
SadMode = Literal["keep", "reset"]
SadPosition = Literal["row_last", "row_second_last", "row_first"]

#: Log-decay used by the "reset" reading of spatial-aware decay. Finite on purpose: a chunked cumulative
#: sum of ``-inf`` turns into ``-inf - (-inf) = nan``; exp(-60) ~ 1e-26 already erases the state.
RESET_LOG_DECAY = -60.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64 (exact tests), everything else accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# Bidirectional linear attention (LINA encoder/decoder, InLine)
# --------------------------------------------------------------------------------------------------


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    normalization: Normalization = "division",
    key_gate: Tensor | None = None,
    value_gate: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Bidirectional ReLU-kernel linear attention in O(N·d²), never forming the N×N weights.

    ``division`` (LINA): ``φ(x) = ReLU(x) + eps`` and, with ``w_ij = φ(q_i)·g^k_j φ(k_j)``,
    ``o_i = Σ_j w_ij g^v_j v_j / (Σ_j w_ij + N·eps)`` — the ``N·eps`` is the original ``+eps`` applied
    after the 1/N state scaling that keeps the fp32 state in range.

    ``subtraction`` (InLine): ``φ = ReLU``, ``s = d^-1/2``, weights ``a_ij = 1/N + (s/N)(φ(q_i)·φ(k_j) −
    φ(q_i)·k̄)`` that sum to one over j but may be negative; ``eps`` is unused (no denominator).

    Gates (the LINA KV gate) multiply ``φ(k)`` and ``v`` before both sums and broadcast to ``[B, N, H, 1]``.
    """
    _check_qkv(q, k, v)
    if normalization not in ("division", "subtraction"):
        raise ValueError(f"normalization must be 'division' or 'subtraction', got {normalization!r}")
    key_gate = None if key_gate is None else _gate(key_gate, k)
    value_gate = None if value_gate is None else _gate(value_gate, k)
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


def _gate(gate: Tensor, like: Tensor) -> Tensor:
    b, n, h, _ = like.shape
    if gate.dim() != 4 or gate.shape[-1] != 1:
        raise ValueError(f"gates must have shape [B|1, N|1, H|1, 1], got {tuple(gate.shape)}")
    try:
        torch.broadcast_shapes(gate.shape, (b, n, h, 1))
    except RuntimeError as err:
        raise ValueError(f"gate of shape {tuple(gate.shape)} does not broadcast to {(b, n, h, 1)}") from err
    return gate


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "q, k, v must be [batch, seq, heads, head_dim]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")


# --------------------------------------------------------------------------------------------------
# Softmax attention
# --------------------------------------------------------------------------------------------------


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None
) -> Tensor:
    """``scaled_dot_product_attention`` in the ``[B, N, H, D]`` layout (flash kernels where available).

    With ``causal=True`` and fewer queries than keys (decoding with a KV cache) the queries are the last
    ones, i.e. query i attends to keys ``j ≤ i + (N_k − N_q)``.
    """
    _check_qkv(q, k, v)
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


# --------------------------------------------------------------------------------------------------
# Causal gated linear attention (LASAD / HGRN2, GLA, TNL, plain causal linear attention)
# --------------------------------------------------------------------------------------------------


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
    _check_qkv(q, k, v)
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
        return _fla_gated_linear_attention(q, k, v, log_decay, scale, initial_state, output_final_state)
    if q.shape[1] == 1:
        o, state = recurrent_gated_linear_attention(
            q, k, v, log_decay, scale=scale, initial_state=initial_state
        )
    else:
        o, state = chunk_gated_linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state)
    return o, (state if output_final_state else None)


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


def _fla_gated_linear_attention(q, k, v, g, scale, initial_state, output_final_state):
    from fla.ops.gla import chunk_gla, fused_recurrent_gla  # lazy: needs CUDA + triton

    if initial_state is not None:
        initial_state = initial_state.float()
    g = g.float()
    if q.shape[1] == 1:
        o, state = fused_recurrent_gla(
            q, k, v, gk=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    else:
        o, state = chunk_gla(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state
        )
    return o, state


def recurrent_gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token recurrence (the decode path; exact but a Python loop over T)."""
    b, t, h, dk = k.shape
    acc = accumulation_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else scale
    state = _initial_state(initial_state, b, h, dk, v.shape[-1], acc, q.device)
    qs, ks, vs, decay = (q.to(acc) * scale), k.to(acc), v.to(acc), log_decay.to(acc).exp()
    outs = []
    for i in range(t):
        state = state * decay[:, i, :, :, None] + ks[:, i, :, :, None] * vs[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", qs[:, i], state))
    return torch.stack(outs, dim=1).to(q.dtype), state


def chunk_gated_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    chunk_size: int = 32,
    sub_chunk_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """Chunk-parallel form (the training path): exact, O(T·C) memory, a loop over T/C chunks only.

    Inside a chunk, decays are cumulative sums ``b`` of ``g`` relative to the chunk start, and every
    exponent formed is a difference ``b_later − b_earlier ≤ 0`` — never ``exp(−b)``, which overflows
    under strong decay. Pairs of sub-chunks use the end of the key sub-chunk as the reference point,
    so both factors stay ≤ 1; pairs inside one sub-chunk form the relative exponent explicitly. The
    defaults (32 / 8) halve a CPU training step against 64 / 16 (the cost grows with the sub-chunk).
    """
    if chunk_size % sub_chunk_size:
        raise ValueError("chunk_size must be a multiple of sub_chunk_size")
    b, t, h, dk = k.shape
    dv = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    scale = dk**-0.5 if scale is None else scale
    c = min(chunk_size, _round_up(t, sub_chunk_size))
    s = min(sub_chunk_size, c)
    pad = _round_up(t, c) - t
    # Zero keys and zero log-decays in the padding leave the state untouched.
    qp, kp, vp, gp = (F.pad(x.to(acc), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, log_decay))
    n, m = (t + pad) // c, c // s

    def chunks(x):  # [B, T, H, D] -> [B, H, n, C, D]
        return x.reshape(b, n, c, h, -1).permute(0, 3, 1, 2, 4)

    qc, kc, vc, gc = chunks(qp * scale), chunks(kp), chunks(vp), chunks(gp)
    cum = gc.cumsum(dim=3)  # b_t relative to the chunk start, ≤ 0 and non-increasing

    # Intra-chunk weights A[t, j], j ≤ t, as [B, H, n, m, s, m, s] (query sub-chunk, pos, key sub-chunk, pos).
    qs_, ks_, cs_ = (x.reshape(b, h, n, m, s, dk) for x in (qc, kc, cum))
    ref = cs_[:, :, :, :, -1]  # end of each key sub-chunk: [B, H, n, m, K]
    rel_q = cs_.unsqueeze(5) - ref[:, :, :, None, None]  # [B,H,n,mq,s,mk,K] = b_t − end(j)
    earlier = torch.ones(m, m, dtype=torch.bool, device=q.device).tril(-1)  # key sub-chunk strictly before
    rel_q = rel_q.masked_fill(~earlier[:, None, :, None], 0.0).clamp(max=0.0)
    k_to_ref = ks_ * (ref.unsqueeze(4) - cs_).exp()  # k_j · exp(end(j) − b_j), factor ≤ 1
    a_off = torch.einsum("bhnisjk,bhnjuk->bhnisju", qs_.unsqueeze(5) * rel_q.exp(), k_to_ref)
    a_off = a_off * earlier[:, None, :, None].to(acc)
    diff = cs_.unsqueeze(5) - cs_.unsqueeze(4)  # [B,H,n,m,s(t),s(j),K] = b_t − b_j
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    diff = diff.masked_fill(~causal[:, :, None], float("-inf"))
    a_diag = torch.einsum("bhnisk,bhnijk,bhnisjk->bhnisj", qs_, ks_, diff.exp())
    eye = torch.eye(m, dtype=acc, device=q.device)
    a = a_off + a_diag.unsqueeze(-2) * eye[:, None, :, None]
    out = torch.einsum("bhnisju,bhnjud->bhnisd", a, vc.reshape(b, h, n, m, s, dv)).reshape(b, h, n, c, dv)

    # Inter-chunk: states at chunk starts by a short loop, then a batched read-out.
    last = cum[:, :, :, -1]  # [B, H, n, K]
    writes = torch.einsum("bhnck,bhncv->bhnkv", kc * (last.unsqueeze(3) - cum).exp(), vc)
    state = _initial_state(initial_state, b, h, dk, dv, acc, q.device)
    starts = []
    for i in range(n):
        starts.append(state)
        state = state * last[:, :, i, :, None].exp() + writes[:, :, i]
    out = out + torch.einsum("bhnck,bhnkv->bhncv", qc * cum.exp(), torch.stack(starts, dim=2))
    out = out.permute(0, 2, 3, 1, 4).reshape(b, n * c, h, dv)[:, :t]
    return out.to(q.dtype), state


def _initial_state(state, b, h, dk, dv, dtype, device) -> Tensor:
    if state is None:
        return torch.zeros(b, h, dk, dv, dtype=dtype, device=device)
    return state.to(dtype)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# --------------------------------------------------------------------------------------------------
# Spatial-aware decay (LASAD Eq. 12)
# --------------------------------------------------------------------------------------------------


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


def hgrn2_lower_bounds(logits: Tensor) -> Tensor:
    """HGRN2's per-layer forget-gate lower bounds from a ``[L, D]`` parameter.

    ``β = cumsum(softmax(logits, 0)) − softmax(logits, 0)[0]``: β_0 = 0 and the bound never decreases with
    depth (β_l = l/L at the zero init).
    """
    p = logits.float().softmax(dim=0)
    return p.cumsum(dim=0) - p[:1]


def lower_bounded_log_sigmoid(f: Tensor, lower_bound: Tensor | None) -> Tensor:
    """``log(β + (1 − β)·σ(f))`` computed stably in fp32 (fp64 for fp64 input); ``β = None`` gives
    ``logsigmoid(f)``."""
    acc = accumulation_dtype(f.dtype)
    g = F.logsigmoid(f.to(acc))
    if lower_bound is None:
        return g
    beta = lower_bound.to(acc)
    return torch.logaddexp(beta.log(), torch.log1p(-beta) + g)


def elu_feature_map(x: Tensor) -> Tensor:
    """``elu(x) + 1`` (Katharopoulos et al.): positive features for plain linear attention."""
    return F.elu(x) + 1.0


def tnl_log_decay(num_heads: int, layer_idx: int, num_layers: int, form: str = "lightning") -> Tensor:
    """Fixed per-head log-decays of TNL / Lightning Attention, ``[H]``.

    ``lightning`` (fla's lightning ops): ``−(8/H)(1 − l/L)·h`` (head 0 never decays, decay weakens with
    depth). ``alibi`` (TNL/MiniMax code): ``−2^(−8(h+1)/H) · (1 − l/(L−1) + 1e−5)``.
    """
    h = torch.arange(num_heads, dtype=torch.float64)
    if form == "lightning":
        return -(8.0 / num_heads) * (1.0 - layer_idx / num_layers) * h
    if form == "alibi":
        depth = 1.0 - layer_idx / max(num_layers - 1, 1) + 1e-5
        return -(2.0 ** (-8.0 * (h + 1) / num_heads)) * depth
    raise ValueError(f"form must be 'lightning' or 'alibi', got {form!r}")


def causal_linear_attention(
    q_features: Tensor,
    k_features: Tensor,
    v: Tensor,
    *,
    q_rotated: Tensor | None = None,
    k_rotated: Tensor | None = None,
    eps: float = 1e-6,
    state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Normalised causal linear attention; RoPE (if given) enters only the numerator.

    ``o_t = Σ_{j≤t} ⟨q̃_t, k̃_j⟩ v_j / (Σ_{j≤t} ⟨φq_t, φk_j⟩ + eps)`` with ``q̃, k̃`` the rotated features
    (or the features themselves). Both sums are gated linear attentions with zero decay; the
    ``(numerator_state, denominator_state)`` pair continues a sequence for decoding.
    """
    q_num = q_features if q_rotated is None else q_rotated
    k_num = k_features if k_rotated is None else k_rotated
    zero = torch.zeros_like(k_num, dtype=accumulation_dtype(k_num.dtype))
    num_state, den_state = (None, None) if state is None else state
    numerator, num_state = gated_linear_attention(
        q_num, k_num, v, zero, scale=1.0, initial_state=num_state, output_final_state=True
    )
    ones = torch.ones_like(v[..., :1])
    denominator, den_state = gated_linear_attention(
        q_features, k_features, ones, zero, scale=1.0, initial_state=den_state, output_final_state=True
    )
    acc = accumulation_dtype(v.dtype)
    out = numerator.to(acc) / (denominator.to(acc) + eps)
    return out.to(v.dtype), (num_state, den_state)


def rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """RMSNorm computed in fp32 at least (LlamaGen/HGRN2 practice), returned in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(acc)
    return y.to(x.dtype)


__all__ = [
    "RESET_LOG_DECAY",
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
