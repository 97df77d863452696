"""Image helpers for logging and sample files (torchvision is not importable beside the CPU torch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (the ADM evaluator's layout)."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


#: grids are for people: small samples are enlarged to at least this many pixels per cell (nearest neighbour)
MIN_CELL = 64
#: grey between cells and around the grid, so black samples keep their edges
PAD_VALUE = 96


def make_grid(
    images: np.ndarray,
    nrow: int | None = None,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    min_cell: int = MIN_CELL,
) -> np.ndarray:
    """Tile uint8 ``[N, H, W, C]`` images into one ``[H', W', C]`` image, ``nrow`` images per row: each image
    enlarged by an integer factor (nearest neighbour) to at least ``min_cell`` pixels a side, grey padding
    between cells, and ``row_labels`` (a class or a prompt per row) written in a margin on the left."""
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_cell / min(h, w)))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), PAD_VALUE, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = img
    if row_labels is None:
        return grid
    if len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for a grid of {rows} rows")
    return _label_rows(grid, [str(label) for label in row_labels], h, pad)


def _label_rows(grid: np.ndarray, labels: list[str], cell: int, pad: int) -> np.ndarray:
    """``grid`` with a left margin holding each row's label (PIL's built-in font), vertically centred."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    width = max(measure.textbbox((0, 0), label, font=font)[2] for label in labels) + 3 * pad
    canvas = Image.new("L", (width, grid.shape[0]), PAD_VALUE)
    draw = ImageDraw.Draw(canvas)
    for r, label in enumerate(labels):
        draw.text((pad, pad + r * (cell + pad) + cell // 2), label, fill=255, font=font, anchor="lm")
    margin = np.repeat(np.asarray(canvas)[..., None], grid.shape[2], axis=2)
    return np.concatenate([margin, grid], axis=1)
