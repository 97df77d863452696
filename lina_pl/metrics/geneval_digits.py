"""GenEval on digit scenes: score generated 32×32 images against their captions, offline, in seconds.

Why: GenEval measures whether a text-to-image model gets objects, counts, colours and positions right
by detecting objects in its samples. On digit scenes (:mod:`lina_pl.data.digit_scenes`) the layout is
fixed — a 2×2 grid of 16×16 cells, at most one digit per cell — so "detection" reduces to three
per-cell decisions:

* **occupied or empty**: a cell is occupied when its mean brightness (max over RGB, in [0, 1]) is at
  least :data:`OCCUPIED_MEAN` = 0.09, half the mean brightness of the faintest real digit (0.18 over all
  1,797 digits; empty real cells are exactly 0);
* **which digit**: an RBF SVM trained (deterministically, about a second) on the *train* digits only,
  so evaluation scenes, drawn from held-out digits, are never seen by it. Its input is the cell's
  16×16 brightness divided by the cell's maximum (the same normalisation as in training, which makes
  it indifferent to colour and overall intensity). It scores about 99% on the held-out digits. An
  occupied cell farther than :data:`MAX_DIGIT_DISTANCE` from every train digit (same normalisation) is
  no object at all: a detector does not detect noise;
* **which colour**: the mean RGB of the cell's bright pixels (brightness above half the cell's
  maximum), rescaled so that its largest channel is 255, then the nearest palette colour (Euclidean).

Real composed evaluation scenes (held-out digits) score 0.98-1.0 per task and about 0.99 overall: the
ceiling a generator can reach. The same images with their captions shuffled score about 0.03 overall.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lina_pl.data.digit_scenes import (
    CANVAS,
    CELL,
    COLOURS,
    GRID,
    NUM_CELLS,
    PALETTE,
    TASKS,
    Requirement,
    digit_arrays,
    parse_caption,
)

OCCUPIED_MEAN = 0.09
#: an occupied cell is an object only when its normalised brightness lies within this Euclidean distance of
#: some train digit: GenEval's detector finds no object in a blob of noise. Held-out real digits lie at
#: 1.4-3.4 (5th-99th percentile), noise from an untrained generator at 5.2-7.9, random blobs at 7.8-10.2
MAX_DIGIT_DISTANCE = 4.5
BRIGHT_FRACTION = 0.5
_PALETTE_RGB = np.asarray([PALETTE[name] for name in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class Detection:
    """One occupied cell of a generated image: where, which digit, which palette colour."""

    cell: int
    digit: int
    colour: str


def _normalise(brightness: np.ndarray) -> np.ndarray:
    """``[N, 16, 16]`` brightness in [0, 1] -> ``[N, 256]`` divided by each cell's maximum."""
    flat = brightness.reshape(len(brightness), -1).astype(np.float32)
    return flat / np.maximum(flat.max(axis=1, keepdims=True), 1e-6)


@functools.lru_cache(maxsize=1)
def classifier():
    """The digit classifier (an RBF SVC on normalised 16×16 train-split cells), fitted once per process."""
    from sklearn.svm import SVC

    cells, labels = digit_arrays("train")
    return SVC(gamma="scale", C=10.0).fit(_normalise(cells), labels)


@functools.lru_cache(maxsize=1)
def train_digits():
    """Nearest-neighbour index of the normalised train cells: how far a cell is from any real digit."""
    from sklearn.neighbors import NearestNeighbors

    cells, _ = digit_arrays("train")
    return NearestNeighbors(n_neighbors=1).fit(_normalise(cells))


def _check_images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if images.ndim != 4 or images.shape[1:] != (CANVAS, CANVAS, 3):
        raise ValueError(f"images must have shape [N, {CANVAS}, {CANVAS}, 3], got {list(images.shape)}")
    return images


def _cells(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 32, 32, 3]`` -> float32 ``[N, 4, 16, 16, 3]`` in [0, 1], cells in row-major order."""
    n = len(images)
    x = images.astype(np.float32).reshape(n, GRID, CELL, GRID, CELL, 3) / 255.0
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, NUM_CELLS, CELL, CELL, 3)


def detect(images: np.ndarray) -> list[list[Detection]]:
    """The digits found in each image of uint8 ``[N, 32, 32, 3]``, per image in cell order."""
    images = _check_images(images)
    cells = _cells(images)  # [N, 4, 16, 16, 3]
    brightness = cells.max(axis=-1)  # [N, 4, 16, 16]
    occupied = brightness.mean(axis=(-1, -2)) >= OCCUPIED_MEAN  # [N, 4]
    out: list[list[Detection]] = [[] for _ in range(len(images))]
    if not occupied.any():
        return out
    image_idx, cell_idx = np.nonzero(occupied)
    normalised = _normalise(brightness[image_idx, cell_idx])
    digit_like = train_digits().kneighbors(normalised)[0][:, 0] <= MAX_DIGIT_DISTANCE
    image_idx, cell_idx, normalised = image_idx[digit_like], cell_idx[digit_like], normalised[digit_like]
    if not len(image_idx):
        return out
    digits = classifier().predict(normalised)

    rgb = cells[image_idx, cell_idx].reshape(len(image_idx), -1, 3)  # [M, 256, 3]
    bright = brightness[image_idx, cell_idx].reshape(len(image_idx), -1)  # [M, 256]
    mask = bright > BRIGHT_FRACTION * bright.max(axis=1, keepdims=True)
    mean_rgb = (rgb * mask[..., None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    chroma = 255.0 * mean_rgb / np.maximum(mean_rgb.max(axis=1, keepdims=True), 1e-6)
    colour_idx = ((chroma[:, None, :] - _PALETTE_RGB[None]) ** 2).sum(-1).argmin(axis=1)

    for i, c, d, k in zip(image_idx, cell_idx, digits, colour_idx, strict=True):
        out[int(i)].append(Detection(int(c), int(d), COLOURS[int(k)]))
    return out


def _in_relation(a: int, b: int, relation: str) -> bool:
    """Whether cell ``a`` is ``relation`` cell ``b`` (left/right: same row; above/below: same column)."""
    (ra, ca), (rb, cb) = divmod(a, GRID), divmod(b, GRID)
    if relation == "left of":
        return ra == rb and ca < cb
    if relation == "right of":
        return ra == rb and ca > cb
    if relation == "above":
        return ca == cb and ra < rb
    if relation == "below":
        return ca == cb and ra > rb
    raise ValueError(f"unknown relation {relation!r}")


def check(req: Requirement, detections: Sequence[Detection]) -> bool:
    """Whether ``detections`` satisfy ``req`` under the rules listed in :func:`score`."""

    def cells_of(digit: int, colour: str | None = None) -> list[int]:
        return [d.cell for d in detections if d.digit == digit and (colour is None or d.colour == colour)]

    if req.task == "counting":
        return len(cells_of(req.digits[0])) == req.counts[0]
    if req.task == "position":
        first, second = cells_of(req.digits[0]), cells_of(req.digits[1])
        return any(_in_relation(a, b, req.relation) for a in first for b in second)
    # single_object, two_object, colors, color_attr: each named digit present (with its colour, if named)
    return all(cells_of(digit, colour) for digit, colour in zip(req.digits, req.colours, strict=True))


def correct(images: np.ndarray, prompts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Per image: the prompt's task and whether the image satisfies it (bool ``[N]``)."""
    images = _check_images(images)
    if isinstance(prompts, str):
        raise ValueError("prompts must be a sequence of captions, not one str")
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    requirements = [parse_caption(p) for p in prompts]  # before detection: fail fast on a bad prompt
    found = detect(images)
    ok = np.array([check(req, det) for req, det in zip(requirements, found, strict=True)], dtype=bool)
    return [req.task for req in requirements], ok


def score(images: np.ndarray, prompts: Sequence[str]) -> dict:
    """GenEval-style accuracies of uint8 ``[N, 32, 32, 3]`` images generated for ``prompts``.

    Rules (one detection per occupied cell, see the module docstring):

    * ``single_object`` (``a 7``): at least one 7;
    * ``two_object`` (``a 3 and a 5``): at least one 3 and at least one 5;
    * ``counting`` (``three 4s``): exactly three 4s (other digits are ignored);
    * ``colors`` (``a red 2``): at least one red 2;
    * ``position`` (``a 1 above a 9``): some 1 and some 9 in the stated relation — left/right of: same
      row, that column order; above/below: same column, that row order;
    * ``color_attr`` (``a blue 6 and a green 8``): at least one blue 6 and at least one green 8.

    Returns ``{task: accuracy}`` for each task that has prompts, ``"overall"``: the mean of those
    accuracies (GenEval's overall score; tasks without prompts are left out), and ``"counts"``:
    ``{task: number of prompts}``. Raises ValueError for images that are not uint8 ``[N, 32, 32, 3]``,
    a prompt count that differs from N, no images, or a prompt that does not parse.
    """
    tasks, ok = correct(images, prompts)
    if len(ok) == 0:
        raise ValueError("no images to score")
    tasks_arr = np.asarray(tasks)
    result: dict = {}
    counts: dict[str, int] = {}
    for task in TASKS:
        sel = tasks_arr == task
        if sel.any():
            result[task] = float(ok[sel].mean())
            counts[task] = int(sel.sum())
    result["overall"] = float(np.mean([result[t] for t in counts]))
    result["counts"] = counts
    return result


__all__ = [
    "BRIGHT_FRACTION",
    "OCCUPIED_MEAN",
    "Detection",
    "check",
    "classifier",
    "correct",
    "detect",
    "score",
]
