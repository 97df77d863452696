"""The on-disk contract between ``lina data build`` and the DataModules: webdataset shards, manifest.json.

A shard directory holds ``{split}-%06d.tar`` files. Every sample has a ``__key__``, one condition and one
image encoding:

- condition: ``"cls"`` (class index, class data) or ``"txt"`` (the caption, utf-8, text data), the latter
  optionally with ``"txt_emb.npy"`` (float16 ``[L, E]`` text-encoder features of the caption's ``L ≤
  max_length`` real tokens, no padding, so training never runs the encoder);
- encoding: ``"image.png"`` (lossless pixels), ``"latent.npy"`` + ``"latent_flip.npy"`` (float16 posterior
  moments, mean ‖ logvar, of the image and of its horizontal flip), or ``"codes.npy"`` + ``"codes_flip.npy"``
  (int32 codebook indices ``[h, w]`` of a discrete tokenizer, for raster models).

``manifest.json`` describes them; it is written last and atomically, so a directory with a manifest is always
complete. Images may come in several sizes (aspect buckets); ``resolutions`` lists them all. ``files`` records
per shard its sample count, its count per latent shape (``latent_shapes`` order) and its SHA-256, so readers
can verify a shard when they open it and count exactly what a damaged one lost. Manifests of older builds
lack ``files``: they still load, with per-shard counts inferred from ``shard_size`` and nothing to verify.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from lina_pl.io import atomic_write

MANIFEST = "manifest.json"
IMAGE = "image.png"
LATENT = "latent.npy"
LATENT_FLIP = "latent_flip.npy"
CODES = "codes.npy"
CODES_FLIP = "codes_flip.npy"
#: every format's members, in (image, flip) order
FORMATS = {IMAGE: (IMAGE,), LATENT: (LATENT, LATENT_FLIP), CODES: (CODES, CODES_FLIP)}
SPLITS = ("train", "val")
#: condition members: class index, caption, cached caption features
CLS = "cls"
TXT = "txt"
TXT_EMB = "txt_emb.npy"
CONDITIONS = ("class", "text")

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
#: keys a build writes beyond ``MANIFEST_FIELDS``; older manifests lack them and read as uniform class data
CONDITION_FIELDS = ("condition", "text_encoder", "resolutions", "latent_shapes")
#: what a ``text_encoder`` entry records about the encoder that made ``txt_emb.npy``
TEXT_ENCODER_FIELDS = ("path", "kind", "max_length", "feature_dim")
#: what a ``files`` entry records about one shard
FILE_FIELDS = ("samples", "shapes", "sha256")
#: member time stamp of every shard: integer (no pax header per member), fixed (a rebuild gives equal bytes)
TAR_MTIME = 0


def condition_fields(condition: int | str, text_emb: np.ndarray | None = None) -> dict:
    """A sample's condition members: ``{"cls": label}`` for an int, ``{"txt": caption}`` for a str, plus
    ``{"txt_emb.npy": float16 [L, E]}`` when the caption's features are given."""
    if isinstance(condition, str):
        fields = {TXT: condition}
        if text_emb is not None:
            fields[TXT_EMB] = np.asarray(text_emb, dtype=np.float16)
        return fields
    if text_emb is not None:
        raise ValueError("text features go with a caption, not with a class label")
    return {CLS: int(condition)}


def image_sample(key: str, condition: int | str, image: Image.Image, text_emb=None) -> dict:
    """A sample storing pixels (written as PNG, so nothing is lost)."""
    return {"__key__": key, **condition_fields(condition, text_emb), IMAGE: image}


def latent_sample(
    key: str, condition: int | str, moments: np.ndarray, moments_flip: np.ndarray, text_emb=None
) -> dict:
    """A sample storing the posterior moments ``[2c, h, w]`` of the image and of its horizontal flip."""
    return {
        "__key__": key,
        **condition_fields(condition, text_emb),
        LATENT: moments.astype(np.float16),
        LATENT_FLIP: moments_flip.astype(np.float16),
    }


def code_sample(
    key: str, condition: int | str, codes: np.ndarray, codes_flip: np.ndarray, text_emb=None
) -> dict:
    """A sample storing the codes ``[h, w]`` of the image and of its horizontal flip."""
    return {
        "__key__": key,
        **condition_fields(condition, text_emb),
        CODES: codes.astype(np.int32),
        CODES_FLIP: codes_flip.astype(np.int32),
    }


def sample_shape(sample: dict) -> tuple[int, ...]:
    """The latent shape ``batch["latent"]`` will have for a sample about to be written."""
    if IMAGE in sample:
        image = sample[IMAGE]
        return (len(image.getbands()), image.height, image.width)
    if LATENT in sample:
        moments = sample[LATENT]
        return (moments.shape[0] // 2, *moments.shape[1:])
    return tuple(sample[CODES].shape)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks (a shard need not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_split(out_dir: str | Path, split: str, samples: Iterable[dict], shard_size: int) -> list[dict]:
    """Write ``samples`` to ``out_dir/{split}-%06d.tar`` (``shard_size`` per file); per file written, return
    ``{"name", "samples", "shapes": Counter of latent shapes, "sha256"}``.

    An empty split writes no file at all (``ShardWriter`` would otherwise leave an empty tar behind).
    """
    samples = iter(samples)
    first = next(samples, None)
    if first is None:
        return []
    written: list[dict] = []
    shapes: Counter = Counter()
    pattern = str(Path(out_dir) / f"{split}-%06d.tar")

    def post(fname: str) -> None:  # called as each file is closed, before the writer opens the next
        written.append({"name": Path(fname).name, "samples": sink.count, "shapes": Counter(shapes)})
        written[-1]["sha256"] = file_sha256(fname)
        shapes.clear()

    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, post=post, mtime=TAR_MTIME) as sink:
        for sample in itertools.chain([first], samples):
            sink.write(sample)  # may close the previous file first (post), so count the sample after
            shapes[sample_shape(sample)] += 1
    return written


def files_entry(written: list[dict], latent_shapes: list[list[int]]) -> dict:
    """``write_split``'s records -> the manifest's ``files`` (shape counts in ``latent_shapes`` order)."""
    return {
        w["name"]: {
            "samples": w["samples"],
            "shapes": [w["shapes"].get(tuple(shape), 0) for shape in latent_shapes],
            "sha256": w["sha256"],
        }
        for w in written
    }


def write_manifest(out_dir: str | Path, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (a reader sees the old manifest or the complete new one)."""
    missing = [k for k in (*MANIFEST_FIELDS, *CONDITION_FIELDS) if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks {', '.join(missing)}")
    check_manifest(manifest, "manifest")
    text = json.dumps(manifest, indent=2) + "\n"
    return atomic_write(Path(out_dir) / MANIFEST, lambda tmp: tmp.write_text(text))


#: manifests without checksums already warned about (once per process)
_UNVERIFIABLE: set[str] = set()


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
    manifest = with_defaults(manifest)
    check_manifest(manifest, str(path))
    if "files" not in manifest and str(path.resolve()) not in _UNVERIFIABLE:
        _UNVERIFIABLE.add(str(path.resolve()))
        warnings.warn(
            f"{path} has no shard checksums (an older build): damaged shards are found only by their sample "
            "counts, changed bytes not at all; rebuild with `lina data build ... --overwrite` to add them",
            UserWarning,
            stacklevel=2,
        )
    return manifest


def with_defaults(manifest: dict) -> dict:
    """A copy of ``manifest`` with the fields older builds did not write: ``condition`` "class",
    ``text_encoder`` None, ``resolutions`` ``[resolution]`` and ``latent_shapes`` ``[latent_shape]``."""
    defaults = {
        "condition": "class",
        "text_encoder": None,
        "resolutions": [manifest.get("resolution")],
        "latent_shapes": [manifest.get("latent_shape")],
    }
    return defaults | manifest


def check_manifest(manifest: dict, where: str) -> None:
    """Consistency of the condition and size fields (``where`` names the file in the message)."""
    condition, encoder = manifest["condition"], manifest["text_encoder"]
    if condition not in CONDITIONS:
        raise ValueError(f"{where}: unknown condition {condition!r} (expected one of {list(CONDITIONS)})")
    if condition == "text" and (manifest["num_classes"] != 0 or manifest["class_names"]):
        raise ValueError(f"{where}: text data must have num_classes 0 and no class_names")
    if encoder is not None:
        if condition != "text":
            raise ValueError(f"{where}: a text_encoder goes with condition 'text', not {condition!r}")
        missing = [k for k in TEXT_ENCODER_FIELDS if k not in encoder]
        if missing:
            raise ValueError(f"{where}: text_encoder lacks {', '.join(missing)}")
    sizes, shapes = manifest["resolutions"], manifest["latent_shapes"]
    if len(sizes) != len(shapes) or list(manifest["resolution"]) not in [list(r) for r in sizes]:
        raise ValueError(
            f"{where}: resolutions {sizes} and latent_shapes {shapes} must pair up and include "
            f"resolution {manifest['resolution']}; rebuild the shards"
        )
    files = manifest.get("files")
    if files is None:
        return
    for split, names in manifest["shards"].items():
        entries = [files.get(name) for name in names]
        if any(e is None or any(k not in e for k in FILE_FIELDS) for e in entries):
            raise ValueError(f"{where}: `files` lacks an entry (or a field) of a {split!r} shard; rebuild")
        if sum(e["samples"] for e in entries) != manifest["counts"].get(split, 0) or any(
            sum(e["shapes"]) != e["samples"] or len(e["shapes"]) != len(shapes) for e in entries
        ):
            raise ValueError(f"{where}: the {split!r} counts in `files` disagree with `counts`; rebuild")


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest describes it: ``samples`` and ``shapes`` (per ``latent_shapes`` entry) are
    None when an older manifest cannot tell, ``sha256`` is None for manifests without checksums."""

    name: str
    path: str
    samples: int | None
    shapes: tuple[int, ...] | None
    sha256: str | None


def shard_entries(root: str | Path, manifest: dict, split: str, must_exist: bool = True) -> list[ShardEntry]:
    """The shards of ``split``; fails clearly when the manifest lists none or (``must_exist``) a file is gone.

    Without ``files`` (older builds) every shard but the last holds ``shard_size`` samples, the last the rest.
    """
    names = manifest["shards"].get(split) or []
    if not names:
        hint = (
            " (build with --val-fraction > 0, or set trainer.limit_val_batches=0)" if split == "val" else ""
        )
        raise ValueError(f"{root} has no {split!r} shards; counts: {manifest['counts']}{hint}")
    paths = [Path(root) / name for name in names]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent and must_exist:
        raise FileNotFoundError(f"shards listed in {Path(root) / MANIFEST} are missing: {', '.join(absent)}")
    files = manifest.get("files")
    if files is not None:
        return [
            ShardEntry(name, str(p), f["samples"], tuple(f["shapes"]), f["sha256"])
            for name, p, f in zip(names, paths, (files[name] for name in names), strict=True)
        ]
    counts = _inferred_counts(manifest, split, len(names))
    one_shape = len(manifest["latent_shapes"]) == 1
    return [
        ShardEntry(name, str(p), n, (n,) if one_shape and n is not None else None, None)
        for name, p, n in zip(names, paths, counts, strict=True)
    ]


def _inferred_counts(manifest: dict, split: str, n_shards: int) -> list[int | None]:
    size, total = manifest.get("shard_size"), manifest["counts"].get(split, 0)
    if not isinstance(size, int) or not (n_shards - 1) * size < total <= n_shards * size:
        return [None] * n_shards
    return [size] * (n_shards - 1) + [total - (n_shards - 1) * size]
