"""Position encodings: sin-cos layout, RoPE relative-position property, table shapes and prefix rows."""

import math

import pytest
import torch
from helpers import max_err, randn

from lina_pl.nn.position import apply_rope, rope_2d, rope_3d, sincos_2d


def test_sincos_2d_formula_non_square():
    dim, gh, gw = 16, 3, 5
    pe = sincos_2d((gh, gw), dim)
    assert pe.shape == (gh * gw, dim)
    h, w = 2, 3
    row = pe[h * gw + w]
    f = 10000 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    expected = torch.cat([torch.sin(w * f), torch.cos(w * f), torch.sin(h * f), torch.cos(h * f)])
    assert max_err(row, expected) < 1e-6


def test_sincos_2d_larger_grid_extends_smaller():
    small, large = sincos_2d((2, 3), 8), sincos_2d((4, 5), 8)
    for h in range(2):
        for w in range(3):
            assert torch.equal(small[h * 3 + w], large[h * 5 + w])


def test_rope_2d_depends_only_on_relative_offset():
    head_dim, gh, gw = 16, 4, 6
    cos, sin = rope_2d(head_dim, (gh, gw))
    q, k = randn(1, 1, 1, head_dim), randn(1, 1, 1, head_dim)
    rotate = lambda x, i: apply_rope(x, cos[i : i + 1], sin[i : i + 1])  # noqa: E731
    pos = lambda r, c: r * gw + c  # noqa: E731
    a = (rotate(q, pos(2, 4)) * rotate(k, pos(1, 1))).sum()
    b = (rotate(q, pos(3, 5)) * rotate(k, pos(2, 2))).sum()  # same (1, 3) offset
    c = (rotate(q, pos(3, 4)) * rotate(k, pos(2, 2))).sum()  # different offset
    assert abs(a - b) < 1e-10 and abs(a - c) > 1e-6


def test_rope_2d_halves_follow_row_and_column():
    cos, _ = rope_2d(8, (3, 4))
    half = 2  # pairs per half (head_dim 8 -> 4 pairs -> 2 for rows, 2 for columns)
    grid = cos.view(3, 4, -1)
    assert torch.equal(grid[:, :1, :half].expand(3, 4, half), grid[..., :half])  # rows only
    assert torch.equal(grid[:1, :, half:].expand(3, 4, half), grid[..., half:])  # columns only


@pytest.mark.parametrize("prefix,cos_value", [("identity", 1.0), ("zero", 0.0)])
def test_rope_prefix_rows(prefix, cos_value):
    cos, sin = rope_2d(8, (2, 2), n_prefix=3, prefix=prefix)
    assert cos.shape == (3 + 4, 4)
    assert (cos[:3] == cos_value).all() and (sin[:3] == 0).all()
    with pytest.raises(ValueError):
        rope_2d(8, (2, 2), n_prefix=1, prefix="random")


@pytest.mark.parametrize("head_dim,split", [(64, (8, 28, 28)), (96, (12, 42, 42))])
def test_rope_3d_split(head_dim, split):
    dt, dh, dw = split
    cos, _ = rope_3d(head_dim, (2, 3, 4))
    grid = cos.view(2, 3, 4, head_dim // 2)
    t_part, h_part, w_part = (
        grid[..., : dt // 2],
        grid[..., dt // 2 : (dt + dh) // 2],
        grid[..., (dt + dh) // 2 :],
    )
    assert w_part.shape[-1] == dw // 2
    assert torch.equal(t_part, t_part[:, :1, :1].expand_as(t_part))  # depends on t only
    assert torch.equal(h_part, h_part[:1, :, :1].expand_as(h_part))  # on h only
    assert torch.equal(w_part, w_part[:1, :1, :].expand_as(w_part))  # on w only


def test_apply_rope_preserves_norm_and_dtype():
    cos, sin = rope_2d(16, (3, 3), n_prefix=1)
    x = torch.randn(2, 10, 2, 16, dtype=torch.bfloat16)
    y = apply_rope(x, cos, sin)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2)
    with pytest.raises(ValueError, match="does not fit"):
        apply_rope(x[:, :5], cos, sin)


def test_rope_frequency_of_first_pair():
    cos, sin = rope_2d(8, (1, 3))
    # column half: first pair rotates by exactly the column index (frequency base^0 = 1)
    assert math.isclose(float(torch.atan2(sin[2, 2], cos[2, 2])), 2.0, rel_tol=1e-6)
