"""The on-disk contract between ``lina data build`` and the DataModules: webdataset shards, manifest.json.

A shard directory holds ``{split}-%06d.tar`` files whose samples are ``{"__key__", "cls": int}`` and either
``"image.png"`` (lossless pixels), ``"latent.npy"`` + ``"latent_flip.npy"`` (float16 posterior moments,
mean ‖ logvar, of the image and of its horizontal flip), or ``"codes.npy"`` + ``"codes_flip.npy"`` (int32
codebook indices ``[h, w]`` of a discrete tokenizer, for raster models). ``manifest.json`` describes
them; it is written last and atomically, so a directory with a manifest is always complete.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

MANIFEST = "manifest.json"
IMAGE = "image.png"
LATENT = "latent.npy"
LATENT_FLIP = "latent_flip.npy"
CODES = "codes.npy"
CODES_FLIP = "codes_flip.npy"
#: each format's members, in (image, flip) order
FORMATS = {IMAGE: (IMAGE,), LATENT: (LATENT, LATENT_FLIP), CODES: (CODES, CODES_FLIP)}
SPLITS = ("train", "val")

#: keys every manifest must have (see data/README.md for their meaning)
MANIFEST_FIELDS = (
    "format",
    "num_classes",
    "class_names",
    "resolution",
    "channels",
    "latent_shape",
    "codec",
    "counts",
    "shards",
)


def image_sample(key: str, image: Image.Image, label: int) -> dict:
    """A sample storing pixels (written as PNG, so nothing is lost)."""
    return {"__key__": key, "cls": int(label), IMAGE: image}


def latent_sample(key: str, label: int, moments: np.ndarray, moments_flip: np.ndarray) -> dict:
    """A sample storing the posterior moments ``[2c, h, w]`` of the image and of its horizontal flip."""
    return {
        "__key__": key,
        "cls": int(label),
        LATENT: moments.astype(np.float16),
        LATENT_FLIP: moments_flip.astype(np.float16),
    }


def code_sample(key: str, label: int, codes: np.ndarray, codes_flip: np.ndarray) -> dict:
    """A sample storing the codes ``[h, w]`` of the image and of its horizontal flip."""
    return {
        "__key__": key,
        "cls": int(label),
        CODES: codes.astype(np.int32),
        CODES_FLIP: codes_flip.astype(np.int32),
    }


def write_split(out_dir: str | Path, split: str, samples: Iterable[dict], shard_size: int) -> list[str]:
    """Write ``samples`` to ``out_dir/{split}-%06d.tar`` (``shard_size`` per file); return the file names.

    An empty split writes no file at all (``ShardWriter`` would otherwise leave an empty tar behind).
    """
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return []
    written: list[str] = []
    pattern = str(Path(out_dir) / f"{split}-%06d.tar")
    post = lambda fname: written.append(Path(fname).name)  # noqa: E731
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=post) as sink:
        for sample in itertools.chain([first], samples):
            sink.write(sample)
    return written


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temp file in the same directory, then ``os.replace``)."""
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {', '.join(missing)}")
    out_dir = Path(out_dir)
    with tempfile.NamedTemporaryFile("w", dir=out_dir, prefix=".manifest-", suffix=".tmp", delete=False) as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    os.chmod(f.name, 0o644)  # temp files are created private; the manifest is as readable as the shards
    os.replace(f.name, out_dir / MANIFEST)
    return out_dir / MANIFEST


def load_manifest(root: str | Path) -> dict:
    """Read and check ``root/manifest.json``; the errors say how to fix a missing or broken one."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise FileNotFoundError(f"shard directory {root} does not exist; build it with `lina data build`")
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {root}: not a shard directory, or its build did not finish "
            "(rebuild with `lina data build ... --overwrite`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exn:
        raise ValueError(f"{path} is not valid JSON ({exn}); rebuild the shards") from exn
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(manifest).__name__}")
    missing = [k for k in MANIFEST_FIELDS if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; it was not written by `lina data build`")
    if manifest["format"] not in FORMATS:
        raise ValueError(f"{path}: unknown format {manifest['format']!r} (expected one of {list(FORMATS)})")
    return manifest


def shard_urls(root: str | Path, manifest: dict, split: str) -> list[str]:
    """Paths of ``split``'s shards; fails clearly when the manifest lists none or a file is gone."""
    names = manifest["shards"].get(split) or []
    if not names:
        hint = (
            " (build with --val-fraction > 0, or set trainer.limit_val_batches=0)" if split == "val" else ""
        )
        raise ValueError(f"{root} has no {split!r} shards; counts: {manifest['counts']}{hint}")
    paths = [Path(root) / name for name in names]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"shards listed in {Path(root) / MANIFEST} are missing: {', '.join(absent)}")
    return [str(p) for p in paths]
