"""Digit scenes: a small, real text-to-image task with GenEval-style captions, from sklearn's digits.

Why: GenEval scores text-to-image models on compositional prompts (objects, counts, colours, positions)
with an object detector. Here the "objects" are real handwritten digits, so the whole benchmark (data,
captions and the scorer in :mod:`lina_pl.metrics.geneval_digits`) runs offline in seconds on a CPU.

Layout (fixed, the scorer relies on it):

* the canvas is 32×32 RGB uint8 with a black background, split into four 16×16 cells in a 2×2 grid:
  cell 0 = top-left, 1 = top-right, 2 = bottom-left, 3 = bottom-right;
* a digit is an 8×8 scikit-learn digit (values 0..16) upscaled ×2 with **nearest neighbour** (every
  pixel becomes a 2×2 block, so intensities stay exactly ``v / 16``) and fills one whole cell; at most
  one digit per cell;
* a digit's pixels are ``round(intensity × colour)`` for a colour of :data:`PALETTE`; when the caption
  names no colour, the colour is drawn at random from the palette.

Captions, one template per GenEval task (digits as numerals, counts as words)::

    single_object  a 7
    two_object     a 3 and a 5                 (two different digits)
    counting       two 4s | three 4s | four 4s
    colors         a red 2
    position       a 1 to the left of a 9 | a 1 to the right of a 9   (same row)
                   a 1 above a 9 | a 1 below a 9                        (same column)
    color_attr     a blue 6 and a green 8      (two different digits, two different colours)

Scenes hold exactly the objects their caption names (no distractors), in random cells consistent with
the caption.

Train/eval split: the 1,797 digits are split once, stratified by label, 80/20 with
``sklearn.model_selection.train_test_split(test_size=0.2, random_state=0)`` (1,437 train, 360 eval
images; the dataset has no duplicate images). Train scenes and the scorer's classifier use only the
train digits; evaluation scenes use only the held-out ones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

CANVAS = 32
CELL = 16
GRID = 2
NUM_CELLS = GRID * GRID

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
SPLITS: tuple[str, ...] = ("train", "eval")

# Seed and share of the fixed stratified digit split (documented in the module docstring).
SPLIT_SEED = 0
EVAL_FRACTION = 0.2


@dataclass(frozen=True)
class SceneSpec:
    """What to draw: the GenEval task, its caption, and the ``(cell, digit, colour name)`` objects."""

    task: str
    caption: str
    objects: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True)
class Requirement:
    """What a caption asks for (the output of :func:`parse_caption`).

    ``digits``, ``counts`` and ``colours`` are aligned, in caption order: ``counts[i]`` copies of
    ``digits[i]`` are wanted, coloured ``colours[i]`` (None: any colour). ``relation`` (position task
    only) is one of :data:`RELATIONS` and reads "``digits[0]`` <relation> ``digits[1]``".
    """

    task: str
    digits: tuple[int, ...]
    counts: tuple[int, ...]
    colours: tuple[str | None, ...]
    relation: str | None = None


# ---------------------------------------------------------------------------------------------- captions

_COLOUR_RE = "|".join(COLOURS)
_COUNT_RE = "|".join(COUNT_WORDS.values())
_WORD_TO_COUNT = {word: n for n, word in COUNT_WORDS.items()}
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("single_object", re.compile(r"a (\d)")),
    ("two_object", re.compile(r"a (\d) and a (\d)")),
    ("counting", re.compile(rf"({_COUNT_RE}) (\d)s")),
    ("colors", re.compile(rf"a ({_COLOUR_RE}) (\d)")),
    ("position", re.compile(r"a (\d) (to the left of|to the right of|above|below) a (\d)")),
    ("color_attr", re.compile(rf"a ({_COLOUR_RE}) (\d) and a ({_COLOUR_RE}) (\d)")),
)


def caption_for(req: Requirement) -> str:
    """The canonical caption of a requirement (inverse of :func:`parse_caption`)."""
    d, c = req.digits, req.colours
    if req.task == "single_object":
        return f"a {d[0]}"
    if req.task == "two_object":
        return f"a {d[0]} and a {d[1]}"
    if req.task == "counting":
        return f"{COUNT_WORDS[req.counts[0]]} {d[0]}s"
    if req.task == "colors":
        return f"a {c[0]} {d[0]}"
    if req.task == "position":
        relation = req.relation if req.relation in ("above", "below") else f"to the {req.relation}"
        return f"a {d[0]} {relation} a {d[1]}"
    if req.task == "color_attr":
        return f"a {c[0]} {d[0]} and a {c[1]} {d[1]}"
    raise ValueError(f"unknown task {req.task!r}; expected one of {TASKS}")


def parse_caption(caption: str) -> Requirement:
    """Parse a caption of one of the six templates; raise ValueError for anything else.

    Why strict: the scorer must never silently score a prompt it does not understand. Captions that fit
    a template but ask for something no scene can hold (the same digit twice in ``two_object`` or
    ``position``, one colour twice in ``color_attr``) are rejected too.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")
    text = caption.strip()
    for task, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if task == "single_object":
            req = Requirement(task, (int(g[0]),), (1,), (None,))
        elif task == "two_object":
            req = Requirement(task, (int(g[0]), int(g[1])), (1, 1), (None, None))
        elif task == "counting":
            req = Requirement(task, (int(g[1]),), (_WORD_TO_COUNT[g[0]],), (None,))
        elif task == "colors":
            req = Requirement(task, (int(g[1]),), (1,), (g[0],))
        elif task == "position":
            relation = g[1].removeprefix("to the ")
            req = Requirement(task, (int(g[0]), int(g[2])), (1, 1), (None, None), relation)
        else:  # color_attr
            req = Requirement(task, (int(g[1]), int(g[3])), (1, 1), (g[0], g[2]))
            if g[0] == g[2]:
                raise ValueError(f"caption {caption!r} names the same colour twice")
        if len(req.digits) == 2 and req.digits[0] == req.digits[1]:
            raise ValueError(f"caption {caption!r} names the same digit twice")
        return req
    raise ValueError(f"caption {caption!r} matches none of the digit-scene templates")


# ------------------------------------------------------------------------------------------------ scenes


def _cell_row_col(cell: int) -> tuple[int, int]:
    return divmod(cell, GRID)


def _two_distinct(rng: np.random.Generator, n: int) -> tuple[int, int]:
    a, b = rng.choice(n, size=2, replace=False)
    return int(a), int(b)


def _random_colour(rng: np.random.Generator) -> str:
    return COLOURS[int(rng.integers(len(COLOURS)))]


def random_scene(rng: np.random.Generator, task: str | None = None) -> SceneSpec:
    """A random scene and its caption; ``task=None`` draws the task uniformly from :data:`TASKS`.

    Cells are random but consistent with the caption (e.g. ``a 1 above a 9``: a random column, the 1 in
    its top cell, the 9 in its bottom cell); colours the caption does not name are random.
    """
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")

    if task == "single_object":
        digit, cell = int(rng.integers(10)), int(rng.integers(NUM_CELLS))
        req = Requirement(task, (digit,), (1,), (None,))
        objects = [(cell, digit, _random_colour(rng))]
    elif task == "two_object":
        digits, cells = _two_distinct(rng, 10), _two_distinct(rng, NUM_CELLS)
        req = Requirement(task, digits, (1, 1), (None, None))
        objects = [(cell, digit, _random_colour(rng)) for cell, digit in zip(cells, digits, strict=True)]
    elif task == "counting":
        digit, count = int(rng.integers(10)), int(rng.choice(list(COUNT_WORDS)))
        cells = sorted(int(c) for c in rng.choice(NUM_CELLS, size=count, replace=False))
        req = Requirement(task, (digit,), (count,), (None,))
        objects = [(cell, digit, _random_colour(rng)) for cell in cells]
    elif task == "colors":
        digit, colour, cell = int(rng.integers(10)), _random_colour(rng), int(rng.integers(NUM_CELLS))
        req = Requirement(task, (digit,), (1,), (colour,))
        objects = [(cell, digit, colour)]
    elif task == "position":
        digits = _two_distinct(rng, 10)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        line = int(rng.integers(GRID))  # the shared row (left/right) or column (above/below)
        if relation in ("left of", "right of"):
            first, second = line * GRID, line * GRID + 1  # left cell, right cell of that row
        else:
            first, second = line, GRID + line  # top cell, bottom cell of that column
        if relation in ("right of", "below"):
            first, second = second, first
        req = Requirement(task, digits, (1, 1), (None, None), relation)
        objects = [(first, digits[0], _random_colour(rng)), (second, digits[1], _random_colour(rng))]
    else:  # color_attr
        digits, cells = _two_distinct(rng, 10), _two_distinct(rng, NUM_CELLS)
        colours = tuple(COLOURS[i] for i in _two_distinct(rng, len(COLOURS)))
        req = Requirement(task, digits, (1, 1), colours)
        objects = [(cell, digit, colour) for cell, digit, colour in zip(cells, digits, colours, strict=True)]
    return SceneSpec(task, caption_for(req), tuple(sorted(objects)))


def _task_cycle(n: int) -> list[str]:
    return [TASKS[i % len(TASKS)] for i in range(n)]


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent generators for scene specs and for rendering, so prompts depend only on ``seed``."""
    spec_seq, render_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(spec_seq), np.random.default_rng(render_seq)


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts, the six tasks in turn (balanced to within one), deterministic in ``seed``.

    Why the same stream as :func:`scenes`: ``scenes(split, n, seed)`` yields exactly these captions, so
    generated images can be scored against real scenes of the same prompts.
    """
    spec_rng, _ = _streams(seed)
    return [random_scene(spec_rng, task).caption for task in _task_cycle(n)]


# ------------------------------------------------------------------------------------------------ digits


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.ascontiguousarray(data.images.astype(np.uint8))  # [1797, 8, 8], values 0..16
    images.setflags(write=False)
    labels = data.target.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


@functools.lru_cache(maxsize=1)
def digit_split() -> dict[str, np.ndarray]:
    """Indices into ``load_digits()`` of the fixed train / eval digits (stratified 80/20, seed 0)."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    train, held_out = train_test_split(
        np.arange(len(labels)), test_size=EVAL_FRACTION, random_state=SPLIT_SEED, stratify=labels
    )
    out = {"train": np.sort(train), "eval": np.sort(held_out)}
    for idx in out.values():
        idx.setflags(write=False)
    return out


def upscale(digits8: np.ndarray) -> np.ndarray:
    """``[..., 8, 8]`` sklearn values 0..16 -> ``[..., 16, 16]`` float32 intensities in [0, 1] (nearest)."""
    x = np.asarray(digits8, dtype=np.float32) / 16.0
    return x.repeat(CELL // 8, axis=-2).repeat(CELL // 8, axis=-1)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def digit_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``split``'s digits as ``([K, 16, 16] float32 intensities in [0, 1], [K] labels)``."""
    _check_split(split)
    images, labels = _digits()
    idx = digit_split()[split]
    return upscale(images[idx]), labels[idx].copy()


@functools.lru_cache(maxsize=2)
def digit_pool(split: str) -> Mapping[int, np.ndarray]:
    """The pool :func:`render` draws from: digit -> ``[K_d, 16, 16]`` float32 intensities in [0, 1]."""
    cells, labels = digit_arrays(split)
    pool = {}
    for d in range(10):
        arr = np.ascontiguousarray(cells[labels == d])
        arr.setflags(write=False)
        pool[d] = arr
    return pool


# ------------------------------------------------------------------------------------------------ render


def render(spec: SceneSpec, digit_images: Mapping[int, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Draw ``spec`` on a black 32×32 canvas -> uint8 ``[32, 32, 3]``.

    Each object takes a random image of its digit from ``digit_images`` (digit -> ``[K, 16, 16]``
    intensities in [0, 1], e.g. :func:`digit_pool`) and fills its cell with ``round(intensity × colour)``.
    """
    canvas = np.zeros((CANVAS, CANVAS, 3), dtype=np.uint8)
    used: set[int] = set()
    for cell, digit, colour in spec.objects:
        if not 0 <= cell < NUM_CELLS or cell in used:
            raise ValueError(f"bad or repeated cell {cell} in {spec}")
        if colour not in PALETTE:
            raise ValueError(f"unknown colour {colour!r}; expected one of {COLOURS}")
        used.add(cell)
        candidates = digit_images[digit]
        if len(candidates) == 0:
            raise ValueError(f"no images of digit {digit} in the pool")
        intensity = np.asarray(candidates[int(rng.integers(len(candidates)))], dtype=np.float32)
        if intensity.shape != (CELL, CELL):
            raise ValueError(f"digit images must be {CELL}×{CELL}, got {intensity.shape}")
        row, col = _cell_row_col(cell)
        pixels = np.rint(intensity[..., None] * np.asarray(PALETTE[colour], dtype=np.float32))
        canvas[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = pixels.astype(np.uint8)
    return canvas


def scenes(split: str, n: int, seed: int = 0) -> Iterator[tuple[np.ndarray, str]]:
    """Yield ``n`` composed scenes ``(uint8 [32, 32, 3] image, caption)``, the six tasks in turn.

    ``split="train"`` draws digits from the train digits, ``split="eval"`` from the held-out ones. The
    captions equal ``make_prompts(n, seed)``.
    """
    pool = digit_pool(split)
    spec_rng, render_rng = _streams(seed)
    for task in _task_cycle(n):
        spec = random_scene(spec_rng, task)
        yield render(spec, pool, render_rng), spec.caption


__all__ = [
    "CANVAS",
    "CELL",
    "COLOURS",
    "PALETTE",
    "RELATIONS",
    "TASKS",
    "Requirement",
    "SceneSpec",
    "caption_for",
    "digit_arrays",
    "digit_pool",
    "digit_split",
    "make_prompts",
    "parse_caption",
    "random_scene",
    "render",
    "scenes",
    "upscale",
]
