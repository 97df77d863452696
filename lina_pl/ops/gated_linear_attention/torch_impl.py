"""Causal gated linear attention in PyTorch: chunk-parallel for training/prefill, recurrent for decoding.

Runs on any device and is the path the fla kernels are tested against; inputs are validated by
:func:`lina_pl.ops.gated_linear_attention.gated_linear_attention`, which dispatches here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.ops.common import accumulation_dtype


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
    """The recurrence for a single token (decoding), the chunked form for anything longer."""
    if q.shape[1] == 1:
        o, state = recurrent_gated_linear_attention(
            q, k, v, log_decay, scale=scale, initial_state=initial_state
        )
    else:
        o, state = chunk_gated_linear_attention(q, k, v, log_decay, scale=scale, initial_state=initial_state)
    return o, (state if output_final_state else None)


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
