"""LASAD spatial-aware decay (Eq. 12): mask positions, keep/reset semantics, HGRN2 lower bounds."""

import pytest
import torch
from helpers import log_decay, max_err, randn

from lina_pl import ops

W = 4
EXPECTED = {  # 0-based sequence index, class token at 0, width 4, 13 positions
    "row_last": [0, 4, 8, 12],
    "row_second_last": [3, 7, 11],
    "row_first": [1, 5, 9],
}


@pytest.mark.parametrize("position", sorted(EXPECTED))
def test_mask_positions(position):
    mask = ops.spatial_aware_mask(torch.arange(13), W, position)
    assert mask.nonzero().flatten().tolist() == EXPECTED[position]


@pytest.mark.parametrize("position", sorted(EXPECTED))
@pytest.mark.parametrize("start", [0, 3, 10])
def test_keep_zeroes_log_decay_at_absolute_positions(position, start):
    g = log_decay(2, 13, 3, 5) - 0.1  # strictly negative everywhere
    out = ops.spatial_aware_log_decay(g, W, start=start, mode="keep", position=position)
    masked = [p - start for p in range(start, start + 13) if p in _expected_abs(position, start + 13)]
    zero_rows = (out == 0).all(dim=(0, 2, 3)).nonzero().flatten().tolist()
    assert zero_rows == masked
    untouched = [i for i in range(13) if i not in masked]
    assert torch.equal(out[:, untouched], g[:, untouched])


def _expected_abs(position, limit):
    residue = {"row_last": 0, "row_second_last": W - 1, "row_first": 1}[position]
    return {p for p in range(limit) if p % W == residue}


def test_reset_is_large_finite_negative():
    g = log_decay(1, 13, 2, 4)
    out = ops.spatial_aware_log_decay(g, W, mode="reset")
    assert torch.isfinite(out).all()
    assert (out[:, [0, 4, 8, 12]] == ops.RESET_LOG_DECAY).all()
    assert ops.RESET_LOG_DECAY <= -30


def test_keep_means_no_forgetting():
    """At a masked position with a zero key the state passes through unchanged (λ = 1)."""
    b, t, h, d = 1, 9, 1, 3
    q, k, v = randn(b, t, h, d), randn(b, t, h, d), randn(b, t, h, d)
    k[:, 4] = 0.0
    g = ops.spatial_aware_log_decay(log_decay(b, t, h, d) - 0.5, W, mode="keep")
    _, s3 = ops.recurrent_gated_linear_attention(q[:, :4], k[:, :4], v[:, :4], g[:, :4])
    _, s4 = ops.recurrent_gated_linear_attention(q[:, :5], k[:, :5], v[:, :5], g[:, :5])
    assert max_err(s3, s4) < 1e-14


@pytest.mark.parametrize("fn", [ops.chunk_gated_linear_attention, ops.recurrent_gated_linear_attention])
def test_reset_erases_the_past(fn):
    """With reset at row_first, outputs from a row start on do not depend on earlier tokens."""
    b, t, h, d = 1, 17, 2, 4
    q, k, v = randn(b, t, h, d), randn(b, t, h, d), randn(b, t, h, d)
    g = ops.spatial_aware_log_decay(log_decay(b, t, h, d), W, mode="reset", position="row_first")
    o, _ = fn(q, k, v, g)
    k2, v2 = k.clone(), v.clone()
    k2[:, :9], v2[:, :9] = randn(b, 9, h, d), randn(b, 9, h, d)  # change everything before position 9
    o2, _ = fn(q, k2, v2, g)
    assert max_err(o[:, 9:], o2[:, 9:]) < 1e-12
    assert max_err(o[:, :9], o2[:, :9]) > 1e-3


def test_sad_changes_outputs_of_the_chunked_op():
    q, k, v, g = randn(1, 40, 2, 8), randn(1, 40, 2, 8), randn(1, 40, 2, 8), log_decay(1, 40, 2, 8)
    plain, _ = ops.chunk_gated_linear_attention(q, k, v, g)
    sad, _ = ops.chunk_gated_linear_attention(q, k, v, ops.spatial_aware_log_decay(g, 8))
    assert max_err(plain, sad) > 1e-2


def test_bad_options_raise():
    g = log_decay(1, 5, 1, 2)
    with pytest.raises(ValueError, match="mode"):
        ops.spatial_aware_log_decay(g, 4, mode="off")
    with pytest.raises(ValueError, match="position"):
        ops.spatial_aware_log_decay(g, 4, position="row_middle")
    with pytest.raises(ValueError, match="width"):
        ops.spatial_aware_log_decay(g, 0)


def test_hgrn2_lower_bounds_at_init_and_monotone():
    bounds = ops.hgrn2_lower_bounds(torch.zeros(6, 10))
    assert torch.allclose(bounds[:, 0], torch.arange(6) / 6.0)
    random_bounds = ops.hgrn2_lower_bounds(torch.randn(6, 10))
    assert (random_bounds[0] == 0).all()
    assert (random_bounds.diff(dim=0) >= 0).all() and (random_bounds < 1).all()


def test_lower_bounded_log_sigmoid_matches_definition():
    f = torch.randn(4, 7, dtype=torch.float64) * 5
    beta = torch.rand(7, dtype=torch.float64) * 0.9
    out = ops.lower_bounded_log_sigmoid(f, beta)
    ref = torch.log(beta + (1 - beta) * torch.sigmoid(f))
    assert max_err(out, ref) < 1e-12
    assert torch.equal(ops.lower_bounded_log_sigmoid(f, None), torch.nn.functional.logsigmoid(f))


def test_tnl_decays():
    lightning = ops.tnl_log_decay(4, layer_idx=1, num_layers=4)
    assert torch.allclose(lightning, -(8 / 4) * (1 - 1 / 4) * torch.arange(4, dtype=torch.float64))
    alibi = ops.tnl_log_decay(8, layer_idx=0, num_layers=3, form="alibi")
    assert torch.allclose(alibi[0], -torch.tensor(2.0 ** (-1), dtype=torch.float64) * (1 + 1e-5))
    assert (alibi < 0).all()
    with pytest.raises(ValueError):
        ops.tnl_log_decay(4, 0, 2, form="exp")
