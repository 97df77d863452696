"""``lina evaluate``: score ``samples.npz`` files written by ``lina sample``; each metric prints JSON.

consistency      class-conditional samples (``arr_0`` + ``labels``): the accuracy of a classifier trained
                 on real shards on the samples, and on held-out real images (the ceiling).
geneval-digits   text-conditional samples of digit scenes (``arr_0`` uint8 N×32×32×3 + ``prompts``):
                 GenEval-style accuracy per task and overall; ``--make-prompts N --out FILE.txt`` writes
                 a balanced prompt file for ``lina sample --prompts`` instead.
fid, kid, is,    FID (+ sFID), KID, Inception Score, improved precision/recall (or all of them) of any
pr, all          samples against real images (shards, an images .npz, cached or ADM statistics), with
                 ``--features digits`` (a small net trained on real digits) or ``inception``.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from pathlib import Path

import numpy as np

from lina_pl.data.digit_scenes import CANVAS
from lina_pl.errors import ArgumentParser, one_line
from lina_pl.metrics.commands import add_parsers as add_generative_parsers

#: the npz field beside arr_0 each metric reads -> the numpy dtype kinds it accepts, in words
FIELDS = {"labels": ("iu", "integer class labels"), "prompts": ("U", "strings (a numpy unicode array)")}
#: the images geneval-digits scores (digit scenes): H, W, C
SCENE_SHAPE = (CANVAS, CANVAS, 3)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="lina evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="metric", metavar="METRIC", required=True)
    consistency = sub.add_parser(
        "consistency", help="class consistency of class-conditional samples against real shards"
    )
    consistency.add_argument(
        "--samples", required=True, metavar="S.npz", help="samples.npz with arr_0 (uint8 NHWC) and labels"
    )
    consistency.add_argument(
        "--data",
        required=True,
        metavar="SHARDS",
        help="shard directory (image.png format) with train and val splits",
    )
    consistency.set_defaults(run=run_consistency, parser=consistency)
    geneval = sub.add_parser(
        "geneval-digits", help="GenEval on digit scenes for text-conditional samples (or make its prompts)"
    )
    what = geneval.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--samples", metavar="S.npz", help="samples.npz with arr_0 (uint8 N×32×32×3) and prompts"
    )
    what.add_argument(
        "--make-prompts", type=int, metavar="N", help="write N evaluation prompts, the six tasks in turn"
    )
    geneval.add_argument(
        "--seed", type=int, default=0, metavar="S", help="with --make-prompts: the prompts' seed"
    )
    geneval.add_argument(
        "--out", metavar="FILE.txt", help="with --make-prompts: the prompt file to write (.txt)"
    )
    geneval.set_defaults(run=run_geneval_digits, parser=geneval)
    add_generative_parsers(sub)
    return parser


def load_samples(parser: argparse.ArgumentParser, path: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    """``arr_0`` (uint8 N×H×W×C) and ``field`` (one entry per image) of a samples file; anything else is
    a parser error naming the problem."""
    if not Path(path).is_file():
        parser.error(f"samples file not found: {path}")
    try:
        data = np.load(path)
    except (ValueError, zipfile.BadZipFile):  # not a zip archive (numpy then suspects a pickle)
        data = None
    except OSError as err:
        parser.error(f"cannot read {path}: {one_line(err)}")
    if not isinstance(data, np.lib.npyio.NpzFile):
        parser.error(f"{path} is not an .npz archive; samples must be an .npz with arr_0 and {field}")
    kinds, kind_words = FIELDS[field]
    with data:
        missing = [key for key in ("arr_0", field) if key not in data.files]
        if missing:
            parser.error(
                f"{path} has no {' or '.join(missing)} (it holds: {', '.join(data.files) or 'nothing'}); "
                f"samples must hold arr_0 and {field}, as `lina sample` writes them"
            )
        try:
            images, values = data["arr_0"], data[field]
        except ValueError as err:  # an object array (pickled), refused without allow_pickle
            parser.error(f"{path}: {field} must be {kind_words}, not pickled objects ({one_line(err)})")
    from lina_pl.metrics.reference import check_images

    try:
        check_images(images, path)
    except ValueError as err:
        parser.error(one_line(err))
    if values.dtype.kind not in kinds or values.ndim != 1:
        parser.error(f"{path}: {field} must be 1-D {kind_words}, got {values.dtype} {list(values.shape)}")
    if len(values) != len(images):
        parser.error(f"{path} holds {len(images)} images but {len(values)} {field}; need one per image")
    return images, values


def run_consistency(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    from lina_pl.data.datamodule import ShardDataModule
    from lina_pl.metrics.class_consistency import class_consistency, fit_classifier

    samples, labels = load_samples(parser, args.samples, "labels")
    try:
        data = ShardDataModule(args.data)
        train_images, train_labels = data.real_images("train")
        val_images, val_labels = data.real_images("val")
    except (FileNotFoundError, ValueError) as err:
        parser.error(one_line(err))
    if samples.shape[1:] != train_images.shape[1:]:
        parser.error(f"samples {samples.shape[1:]} and real images {train_images.shape[1:]} differ in shape")
    outside = sorted({int(c) for c in labels if not 0 <= c < data.num_classes})
    if outside:
        parser.error(
            f"{args.samples}: labels must be classes of {args.data} (0..{data.num_classes - 1}), got "
            f"{', '.join(map(str, outside[:5]))}; sample with --classes in that range"
        )
    classifier = fit_classifier(train_images, train_labels)
    return {
        "samples": len(samples),
        "class_consistency": class_consistency(classifier, samples, labels),
        "real_heldout_accuracy": class_consistency(classifier, val_images, val_labels),
        "per_class": {
            int(c): class_consistency(classifier, samples[labels == c], labels[labels == c])
            for c in np.unique(labels)
        },
    }


def run_geneval_digits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict | str:
    from lina_pl.metrics import geneval_digits

    if args.make_prompts is None:
        if args.out is not None:
            parser.error("--out goes with --make-prompts; scores are printed")
        images, prompts = load_samples(parser, args.samples, "prompts")
        if images.shape[1:] != SCENE_SHAPE:
            parser.error(
                f"{args.samples}: geneval-digits scores 32×32 RGB digit scenes, got images of shape "
                f"{list(images.shape[1:])} (sample a digit-scene model at --resolution 32 32)"
            )
        try:
            return geneval_digits.score(images, prompts.tolist())
        except ValueError as err:  # a prompt that is no digit-scene caption
            parser.error(f"{args.samples}: {one_line(err)}")
    return make_prompts(parser, args)


def make_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    from lina_pl.data.digit_scenes import make_prompts
    from lina_pl.io import atomic_write

    if args.make_prompts < 1:
        parser.error(f"--make-prompts needs N ≥ 1, got {args.make_prompts}")
    if args.out is None:
        parser.error("--make-prompts needs --out FILE.txt")
    text = "".join(f"{prompt}\n" for prompt in make_prompts(args.make_prompts, args.seed))
    return str(atomic_write(args.out, lambda tmp: tmp.write_text(text, encoding="utf-8")))


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.run(args.parser, args)  # errors are reported with the subcommand's usage line
    print(result if isinstance(result, str) else json.dumps(result))
    return 0
