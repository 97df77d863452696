"""``lina evaluate``: class consistency of ``samples.npz`` against a classifier trained on real shards.

Prints JSON: the classifier's accuracy on held-out real images (the ceiling) and on the samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lina_pl.metrics.class_consistency import class_consistency, fit_classifier


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="lina evaluate", description=__doc__)
    p.add_argument("--samples", required=True, help="samples.npz with arr_0 (uint8 NHWC) and labels")
    p.add_argument(
        "--data", required=True, help="shard directory (image.png format) with train and val splits"
    )
    args = p.parse_args(argv)
    from lina_pl.data.datamodule import ShardDataModule

    if not Path(args.samples).is_file():
        raise SystemExit(f"samples file not found: {args.samples}")
    with np.load(args.samples) as f:
        if "arr_0" not in f or "labels" not in f:
            raise SystemExit(f"{args.samples} must hold arr_0 and labels")
        samples, labels = f["arr_0"], f["labels"]
    data = ShardDataModule(args.data)
    train_images, train_labels = data.real_images("train")
    val_images, val_labels = data.real_images("val")
    if samples.shape[1:] != train_images.shape[1:]:
        raise SystemExit(
            f"samples {samples.shape[1:]} and real images {train_images.shape[1:]} differ in shape"
        )
    classifier = fit_classifier(train_images, train_labels)
    report = {
        "samples": len(samples),
        "class_consistency": class_consistency(classifier, samples, labels),
        "real_heldout_accuracy": class_consistency(classifier, val_images, val_labels),
        "per_class": {
            int(c): class_consistency(classifier, samples[labels == c], labels[labels == c])
            for c in np.unique(labels)
        },
    }
    print(json.dumps(report))
    return 0
