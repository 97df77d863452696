"""Image helpers for logging and sample files (torchvision is not importable beside the CPU torch)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (the ADM evaluator's layout)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 ``[N, H, W, C]`` images into one ``[H', W', C]`` image, ``nrow`` images per row."""
    n, h, w, c = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = img
    return grid
