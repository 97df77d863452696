"""Locality for LINA's decoder attention: a depthwise conv over the image-token grid and the KV gate."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GateForm = Literal["absolute", "grid"]


def check_layout(x: Tensor, n_cond: int, grid_hw: tuple[int, int]) -> None:
    """Fail clearly when ``x``'s length is not ``n_cond + H·W``."""
    gh, gw = grid_hw
    if x.dim() != 3 or x.shape[1] != n_cond + gh * gw:
        raise ValueError(
            f"expected [batch, n_cond + H*W = {n_cond} + {gh}*{gw}, dim] tokens, got {tuple(x.shape)}"
        )


class DepthwiseConvGrid(nn.Module):
    """Depthwise ``k×k`` conv (with bias) over the image tokens laid out as their ``H×W`` grid.

    Condition tokens pass through as zeros, so the output can be added to the attention output
    (LINA applies it to the raw block input and adds it before the output projection).
    """

    def __init__(self, dim: int, kernel_size: int = 5):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep the grid size, got {kernel_size}")
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: Tensor, n_cond: int, grid_hw: tuple[int, int]) -> Tensor:
        check_layout(x, n_cond, grid_hw)
        b, _, d = x.shape
        grid = x[:, n_cond:].transpose(1, 2).reshape(b, d, *grid_hw)
        out = self.conv(grid).flatten(2).transpose(1, 2)
        return F.pad(out, (0, 0, n_cond, 0))


class KVGate(nn.Module):
    """LINA's static gates on φ(K) and V, one scale per head and token position.

    ``absolute`` (the original): free parameters ``[H, N]`` initialised to 1, tied to absolute token
    indices, so the sequence length is fixed. ``grid``: positive gates ``exp(log-gate)`` as a 2-D map
    over the image grid plus a vector over condition tokens, bilinearly (resp. linearly) resized when
    the resolution changes, so a constant map stays constant and learned maps warm-start a new size.
    Either way the gate parameters are excluded from weight decay (see :mod:`lina_pl.nn.optim`).
    """

    no_weight_decay_params = ("key", "value", "key_cond", "value_cond")

    def __init__(self, num_heads: int, n_cond: int, grid_hw: tuple[int, int], form: GateForm = "absolute"):
        super().__init__()
        if form not in ("absolute", "grid"):
            raise ValueError(f"form must be 'absolute' or 'grid', got {form!r}")
        self.form, self.n_cond, self.grid_hw = form, n_cond, tuple(grid_hw)
        gh, gw = grid_hw
        if form == "absolute":
            self.key = nn.Parameter(torch.ones(num_heads, n_cond + gh * gw))
            self.value = nn.Parameter(torch.ones(num_heads, n_cond + gh * gw))
        else:  # log-gates: zero init means gate 1
            self.key = nn.Parameter(torch.zeros(num_heads, gh, gw))
            self.value = nn.Parameter(torch.zeros(num_heads, gh, gw))
            self.key_cond = nn.Parameter(torch.zeros(num_heads, n_cond))
            self.value_cond = nn.Parameter(torch.zeros(num_heads, n_cond))

    def forward(self, n_cond: int, grid_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Key and value gates ``[1, N, H, 1]`` for ``n_cond`` condition tokens and an ``H×W`` grid."""
        if self.form == "absolute":
            n = n_cond + grid_hw[0] * grid_hw[1]
            if n != self.key.shape[1] or n_cond != self.n_cond or tuple(grid_hw) != self.grid_hw:
                raise ValueError(
                    f"the absolute KV gate was built for {self.n_cond} + {self.grid_hw} tokens, got "
                    f"{n_cond} + {tuple(grid_hw)}; use form='grid' for variable resolutions"
                )
            return self._layout(self.key), self._layout(self.value)
        key = self._grid_gate(self.key, self.key_cond, n_cond, grid_hw)
        value = self._grid_gate(self.value, self.value_cond, n_cond, grid_hw)
        return self._layout(key), self._layout(value)

    @staticmethod
    def _layout(gate: Tensor) -> Tensor:  # [H, N] -> [1, N, H, 1]
        return gate.t()[None, :, :, None]

    @staticmethod
    def _grid_gate(log_grid: Tensor, log_cond: Tensor, n_cond: int, grid_hw) -> Tensor:
        log_grid, log_cond = resize_log_gate(log_grid, log_cond, n_cond, grid_hw)
        return torch.cat([log_cond, log_grid.flatten(1)], dim=1).exp()

    @torch.no_grad()
    def resize_(self, n_cond: int, grid_hw: tuple[int, int]) -> None:
        """Resize the learned ``grid`` gates in place (warm start at a new resolution)."""
        if self.form != "grid":
            raise ValueError("only form='grid' gates can be resized; absolute gates are tied to indices")
        for grid_name, cond_name in (("key", "key_cond"), ("value", "value_cond")):
            new_grid, new_cond = resize_log_gate(
                getattr(self, grid_name), getattr(self, cond_name), n_cond, grid_hw
            )
            setattr(self, grid_name, nn.Parameter(new_grid.contiguous()))
            setattr(self, cond_name, nn.Parameter(new_cond.contiguous()))
        self.n_cond, self.grid_hw = n_cond, tuple(grid_hw)


def resize_log_gate(log_grid: Tensor, log_cond: Tensor, n_cond: int, grid_hw) -> tuple[Tensor, Tensor]:
    """Interpolate ``[H, h, w]`` log-gates bilinearly and ``[H, n]`` condition log-gates linearly."""
    if tuple(log_grid.shape[1:]) != tuple(grid_hw):
        log_grid = F.interpolate(log_grid[None], size=tuple(grid_hw), mode="bilinear", align_corners=True)[0]
    if log_cond.shape[1] != n_cond:
        if log_cond.shape[1] == 0 or n_cond == 0:
            log_cond = log_cond.new_zeros(log_cond.shape[0], n_cond)
        else:
            log_cond = F.interpolate(log_cond[None], size=n_cond, mode="linear", align_corners=True)[0]
    return log_grid, log_cond
