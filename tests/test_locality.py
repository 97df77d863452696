"""Depthwise grid conv and the KV gate: layout, zero rows for condition tokens, resizing."""

import pytest
import torch
import torch.nn.functional as F
from helpers import max_err, randn

from lina_pl.nn import DepthwiseConvGrid, KVGate
from lina_pl.nn.locality import resize_log_gate


@pytest.mark.parametrize("n_cond,grid_hw", [(0, (3, 5)), (4, (2, 7)), (1, (6, 6))])
def test_depthwise_conv_on_grid(n_cond, grid_hw):
    conv = DepthwiseConvGrid(6, 5).double()
    x = randn(2, n_cond + grid_hw[0] * grid_hw[1], 6)
    y = conv(x, n_cond, grid_hw)
    assert torch.equal(y[:, :n_cond], torch.zeros_like(y[:, :n_cond]))
    img = x[:, n_cond:].reshape(2, *grid_hw, 6).permute(0, 3, 1, 2)
    ref = F.conv2d(img, conv.conv.weight, conv.conv.bias, padding=2, groups=6)
    assert max_err(y[:, n_cond:], ref.permute(0, 2, 3, 1).reshape(2, -1, 6)) < 1e-12


def test_conv_is_local():
    """A 5×5 kernel: changing one token moves outputs only within Chebyshev distance 2 of it."""
    conv = DepthwiseConvGrid(3, 5).double()
    x = randn(1, 8 * 8, 3)
    x2 = x.clone()
    x2[0, 0] += 1.0  # token at (0, 0)
    changed = (conv(x2, 0, (8, 8)) - conv(x, 0, (8, 8))).abs().sum(-1).view(8, 8) > 0
    assert changed[:3, :3].all() and not changed[3:].any() and not changed[:, 3:].any()


def test_conv_rejects_even_kernels_and_bad_layouts():
    with pytest.raises(ValueError, match="odd"):
        DepthwiseConvGrid(4, 4)
    with pytest.raises(ValueError, match="n_cond"):
        DepthwiseConvGrid(4, 5)(torch.randn(1, 10, 4), 1, (3, 4))


def test_absolute_gate_shape_and_init():
    gate = KVGate(3, 2, (2, 3), "absolute")
    key, value = gate(2, (2, 3))
    assert key.shape == (1, 8, 3, 1) and torch.equal(key, torch.ones_like(key)) and torch.equal(value, key)
    assert sum(p.numel() for p in gate.parameters()) == 2 * 3 * 8  # 2·H·N as in the paper


def test_grid_gate_positive_and_constant_map_stays_constant_when_resized():
    gate = KVGate(2, 3, (4, 4), "grid")
    with torch.no_grad():
        gate.key.fill_(0.7)
        gate.key_cond.fill_(-0.2)
        gate.value.normal_()
    key, value = gate(5, (7, 9))  # other resolution, other condition length
    assert key.shape == (1, 5 + 63, 2, 1) and (value > 0).all()
    assert torch.allclose(key[:, 5:], torch.full_like(key[:, 5:], torch.exp(torch.tensor(0.7)).item()))
    assert torch.allclose(key[:, :5], torch.full_like(key[:, :5], torch.exp(torch.tensor(-0.2)).item()))


def test_grid_gate_resize_in_place_keeps_corners():
    gate = KVGate(2, 2, (3, 3), "grid")
    with torch.no_grad():
        gate.key.normal_()
    corners = gate.key[:, [0, 0, -1, -1], [0, -1, 0, -1]].clone()
    gate.resize_(4, (5, 6))
    assert gate.key.shape == (2, 5, 6) and gate.key_cond.shape == (2, 4)
    assert torch.allclose(gate.key[:, [0, 0, -1, -1], [0, -1, 0, -1]], corners, atol=1e-6)
    assert gate(4, (5, 6))[0].shape == (1, 34, 2, 1)
    with pytest.raises(ValueError, match="grid"):
        KVGate(2, 1, (2, 2), "absolute").resize_(1, (3, 3))


def test_absolute_gate_refuses_other_layouts():
    with pytest.raises(ValueError, match="form='grid'"):
        KVGate(2, 1, (2, 2), "absolute")(1, (3, 3))
    with pytest.raises(ValueError, match="form"):
        KVGate(2, 1, (2, 2), "learned")


def test_resize_log_gate_handles_empty_condition():
    grid, cond = resize_log_gate(torch.zeros(1, 2, 2), torch.zeros(1, 0), 3, (2, 2))
    assert cond.shape == (1, 3) and torch.equal(grid, torch.zeros(1, 2, 2))
