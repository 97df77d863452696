"""``lina sample``: generate samples from a checkpoint into ``samples.npz`` + a PNG grid.

Works for every generator family and both conditions: a class-conditional checkpoint samples ``--classes``
(``--per-class`` images each), a text-conditional one the prompts of ``--prompts FILE`` (one prompt per
non-empty line, ``--per-prompt`` images each). Unset sampling options take the values the module was
trained with (its ``sampling`` hyper-parameters); an option the family does not use (``--top-k`` for LINA,
``--steps`` for a raster model) is an error. ``--resolution H W`` generates at another size than the
training one (LINA only).

``samples.npz`` holds ``arr_0`` (uint8 N×H×W×C, the ADM evaluator convention) and ``labels`` (one class per
image) or ``prompts`` (one string per image); the PNG grid beside it has one row per class or prompt.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lina_pl.conditions import ClassCondition, TextCondition
from lina_pl.errors import ArgumentParser, one_line
from lina_pl.io import save_npz, save_png
from lina_pl.lightning.images import make_grid, to_uint8_nhwc

#: sampling option -> its command-line flag (help says which family uses it)
OPTION_FLAGS = {
    "cfg": "--cfg",
    "cfg_schedule": "--cfg-schedule",
    "steps": "--steps",
    "flow_steps": "--flow-steps",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "cfg_interval": "--cfg-interval",
}
_OPTION_NAME = re.compile(r"\b(" + "|".join(sorted(OPTION_FLAGS, key=len, reverse=True)) + r")\b")
#: images per class / prompt when not given (GenEval scores 4 images per prompt)
DEFAULT_PER_CLASS, DEFAULT_PER_PROMPT = 8, 4


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="lina sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) written by `lina fit`")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--classes", type=int, nargs="+", help="class indices to sample (class checkpoints)")
    what.add_argument(
        "--prompts", metavar="FILE.txt", help="prompt file, one prompt per non-empty line (text checkpoints)"
    )
    p.add_argument("--per-class", type=int, help=f"samples per class (default {DEFAULT_PER_CLASS})")
    p.add_argument("--per-prompt", type=int, help=f"samples per prompt (default {DEFAULT_PER_PROMPT})")
    p.add_argument(
        "--resolution",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="image size in pixels (default: the size the model was trained at; other sizes: LINA only)",
    )
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    p.add_argument(
        "--cfg-schedule",
        choices=["linear", "constant"],
        help="LINA: linear ramps 1 → cfg over the AR steps (C2I FID recipe); constant keeps cfg",
    )
    p.add_argument("--steps", type=int, help="LINA: autoregressive (unmasking) steps")
    p.add_argument("--flow-steps", type=int, help="LINA: Euler steps of the flow head per AR step")
    p.add_argument("--temperature", type=float, help="raster: softmax temperature")
    p.add_argument("--top-k", type=int, help="raster: keep the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, help="raster: nucleus sampling mass (1 = off)")
    p.add_argument(
        "--cfg-interval", type=int, help="raster: stop guidance after this many tokens (-1 = never)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="batch i is sampled with seed + i")
    p.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples.npz", help="output .npz (a PNG grid is written beside it)")
    return p


def read_prompts(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The non-empty lines of ``path``, stripped; a missing, unreadable or empty file is a parser error."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        parser.error(f"prompts file not found: {path}")
    except (OSError, UnicodeDecodeError) as err:
        parser.error(f"cannot read the prompts file {path}: {one_line(err)}")
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        parser.error(f"the prompts file {path} holds no prompts (write one prompt per non-empty line)")
    return prompts


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list, int]:
    """The condition values (classes or prompts) and how many images each gets, from the parsed flags."""
    if args.classes is not None and args.per_prompt is not None:
        parser.error("--per-prompt goes with --prompts; with --classes use --per-class")
    if args.prompts is not None and args.per_class is not None:
        parser.error("--per-class goes with --classes; with --prompts use --per-prompt")
    if args.classes is not None:
        values = args.classes
        repeat = DEFAULT_PER_CLASS if args.per_class is None else args.per_class
    else:
        values = read_prompts(parser, args.prompts)
        repeat = DEFAULT_PER_PROMPT if args.per_prompt is None else args.per_prompt
    if repeat < 1 or args.batch_size < 1:
        parser.error("--per-class / --per-prompt and --batch-size must be ≥ 1")
    if args.resolution is not None and min(args.resolution) < 1:
        parser.error(
            f"--resolution must be two positive sizes H W, got {' '.join(map(str, args.resolution))}"
        )
    if not args.out.endswith(".npz"):
        parser.error(f"--out must end in .npz, got {args.out}")
    return values, repeat


def check_condition(parser: argparse.ArgumentParser, condition, args: argparse.Namespace) -> None:
    """``--classes`` needs a class checkpoint and ``--prompts`` a text one."""
    if args.classes is not None and not isinstance(condition, ClassCondition):
        parser.error(
            f"{args.ckpt} is conditioned on {type(condition).__name__}, not classes: "
            "give --prompts FILE.txt instead of --classes"
        )
    if args.prompts is not None and not isinstance(condition, TextCondition):
        parser.error(
            f"{args.ckpt} is conditioned on {type(condition).__name__}, not text: "
            "give --classes C ... instead of --prompts"
        )


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    values, repeat = check_args(parser, args)
    from lina_pl.lightning.checkpoint import load_module

    given = {name: getattr(args, name) for name in OPTION_FLAGS if getattr(args, name) is not None}
    try:
        module = load_module(args.ckpt, args.device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        parser.error(one_line(err))
    check_condition(parser, module.condition, args)
    try:
        options = module.sampling_options(**given)
    except ValueError as err:  # name the flags, not the option fields: "--top-k", "--cfg must be finite"
        parser.error(_OPTION_NAME.sub(lambda m: OPTION_FLAGS[m.group(1)], one_line(err)))
    try:
        batch = module.condition.display_batch(values, repeat)
        if args.classes is not None:
            module.condition.labels(batch)  # out-of-range classes fail here, before any sampling
    except ValueError as err:
        parser.error(one_line(err))

    # None: the training size; another one is generated by LINA and refused by raster models
    size = None if args.resolution is None else tuple(args.resolution)
    key = "label" if args.classes is not None else "text"
    n = len(batch[key])
    images = []
    try:  # the bar is closed before an error is printed, so the error is the last line
        with tqdm(range(0, n, args.batch_size), desc="sampling", unit="batch") as starts:
            for i, start in enumerate(starts):
                chunk = batch[key][start : start + args.batch_size]
                chunk = chunk.to(args.device) if key == "label" else chunk
                out = module.sample_images({key: chunk}, options, seed=args.seed + i, image_size=size)
                if not bool(torch.isfinite(out).all()):  # they would be written as black images
                    raise FloatingPointError(
                        f"sampling batch {i} produced NaN or ±inf pixels: the weights of {args.ckpt} "
                        "overflow with these options; try another checkpoint or a smaller --cfg"
                    )
                images.append(to_uint8_nhwc(out))
    # a size the model cannot make, a missing text encoder, an overflow
    except (OSError, ImportError, ValueError, FloatingPointError) as err:
        parser.error(one_line(err))
    arr = np.concatenate(images)
    if key == "label":
        fields = {"labels": batch["label"].numpy()}
    else:
        fields = {"prompts": np.asarray(batch["text"], dtype=str)}
    path = save_npz(args.out, arr_0=arr, **fields)
    labels = [str(v) if len(str(v)) <= 40 else str(v)[:37] + "..." for v in values]  # one row per value
    grid_path = save_png(path.with_suffix(".png"), make_grid(arr, nrow=repeat, row_labels=labels))
    print(json.dumps({"samples": str(path), "grid": str(grid_path), "shape": list(arr.shape)}))
    return 0
