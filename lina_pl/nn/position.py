"""Position encodings: 2-D sin-cos (LINA/NOVA absolute PE), 2-D RoPE (LlamaGen) and 3-D RoPE (NOVA).

RoPE tables are float64 ``(cos, sin)`` of shape ``[N, head_dim / 2]`` acting on interleaved pairs
``(x[2i], x[2i+1])``. Prefix tokens (class or text tokens) get either the identity rotation (cos 1,
sin 0; required by linear attention, where LlamaGen's all-zero rows would erase the class key) or
LlamaGen's zero rows (``prefix="zero"``, exact LlamaGen behaviour under softmax).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lina_pl.nn.functional import accumulation_dtype

PrefixRotation = Literal["identity", "zero"]


def sincos_1d(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """``[sin(p·f), cos(p·f)]`` with ``f_i = base^(−i/(dim/2))``; ``[len(positions), dim]`` in fp64."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    freqs = base ** (-torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(grid_hw: tuple[int, int], dim: int, base: float = 10000.0) -> Tensor:
    """LINA/NOVA 2-D absolute PE ``[H·W, dim]`` in raster order: ``[sin(w f), cos(w f), sin(h f), cos(h f)]``.

    Integer positions, so a larger grid extends a smaller one instead of stretching it.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos dim must be a multiple of 4, got {dim}")
    gh, gw = grid_hw
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    return torch.cat([sincos_1d(cols, dim // 2, base), sincos_1d(rows, dim // 2, base)], dim=1).float()


def _angles(positions: Tensor, dim: int, base: float) -> Tensor:
    """Rotation angles ``[N, dim/2]`` for ``dim`` channels (``dim/2`` pairs), frequency ``base^(−2i/dim)``."""
    freqs = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    return positions.double()[:, None] * freqs[None]


def _with_prefix(angles: Tensor, n_prefix: int, prefix: PrefixRotation) -> tuple[Tensor, Tensor]:
    if prefix not in ("identity", "zero"):
        raise ValueError(f"prefix must be 'identity' or 'zero', got {prefix!r}")
    cos, sin = angles.cos(), angles.sin()
    if n_prefix:
        pad_cos = torch.ones if prefix == "identity" else torch.zeros
        cos = torch.cat([pad_cos(n_prefix, cos.shape[1], dtype=cos.dtype), cos])
        sin = torch.cat([torch.zeros(n_prefix, sin.shape[1], dtype=sin.dtype), sin])
    return cos, sin


def rope_2d(
    head_dim: int,
    grid_hw: tuple[int, int],
    *,
    n_prefix: int = 0,
    prefix: PrefixRotation = "identity",
    base: float = 10000.0,
) -> tuple[Tensor, Tensor]:
    """LlamaGen 2-D RoPE: first half of the head dim rotates with the row, second half with the column."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    gh, gw = grid_hw
    rows = torch.arange(gh).repeat_interleave(gw)
    cols = torch.arange(gw).repeat(gh)
    half = head_dim // 2
    angles = torch.cat([_angles(rows, half, base), _angles(cols, half, base)], dim=1)
    return _with_prefix(angles, n_prefix, prefix)


def rope_3d(
    head_dim: int,
    grid_thw: tuple[int, int, int],
    *,
    n_prefix: int = 0,
    prefix: PrefixRotation = "identity",
    base: float = 10000.0,
) -> tuple[Tensor, Tensor]:
    """NOVA 3-D RoPE over (t, h, w): ``d//8`` channels for time, the rest split evenly between h and w
    (64 → 8 + 28 + 28, 96 → 12 + 42 + 42); positions in (t, h, w) raster order."""
    dt = head_dim // 8
    dhw = (head_dim - dt) // 2
    if dt % 2 or dhw % 2 or dt + 2 * dhw != head_dim:
        raise ValueError(f"3-D RoPE cannot split head_dim={head_dim} into even (t, h, w) parts")
    gt, gh, gw = grid_thw
    t = torch.arange(gt).repeat_interleave(gh * gw)
    h = torch.arange(gh).repeat_interleave(gw).repeat(gt)
    w = torch.arange(gw).repeat(gt * gh)
    angles = torch.cat([_angles(t, dt, base), _angles(h, dhw, base), _angles(w, dhw, base)], dim=1)
    return _with_prefix(angles, n_prefix, prefix)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x`` ``[B, N, H, D]`` by tables ``[N, D/2]`` or, for per-sample
    positions (tokens gathered in a random order), ``[B, N, D/2]``; computed in fp32 at least."""
    if cos.shape[-2:] != (x.shape[1], x.shape[-1] // 2) or cos.dim() not in (2, 3):
        raise ValueError(f"RoPE table {tuple(cos.shape)} does not fit x {tuple(x.shape)}")
    acc = accumulation_dtype(x.dtype)
    xf = x.to(acc).reshape(*x.shape[:-1], -1, 2)
    c, s = (t.to(device=x.device, dtype=acc).unsqueeze(-2) for t in (cos, sin))  # [(B,) N, 1, D/2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)
    return out.flatten(-2).to(x.dtype)
