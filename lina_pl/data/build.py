"""``lina data build``: turn a labelled image source into train/val webdataset shards plus ``manifest.json``.

    lina data build --source digits --out data/shards/digits16
    lina data build --source image-folder --root /data/imagenet/train --out /data/shards/in256 \\
        --resolution 256 --codec diffusers --vae-path /models/kl16 --batch-size 64

With ``--codec patchify`` the shards hold PNG pixels (the patchify codec needs no encoding); with
``--codec diffusers`` they hold the VAE's posterior moments of each image and of its flip, and with
``--codec llamagen_vq`` or ``kmeans`` the discrete codes of each image and of its flip (raster models;
LlamaGen pre-extracts VQ-16 codes too), so training never runs the encoder. The split is a seeded
permutation within each class, so it is reproducible and every class gets the same validation fraction.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lina_pl.codecs import TOKENIZERS, DiscreteTokenizer, create_tokenizer
from lina_pl.data import shards
from lina_pl.data.sources import ImageSource, create_source, image_to_tensor


def split_indices(labels: Iterable[int], val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified split: ``round(val_fraction·n_c)`` items of each class go to val; both splits are shuffled
    so that consecutive samples (and thus shards) mix classes."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    labels = np.asarray(list(labels))
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val = int(round(val_fraction * len(members)))
        val.append(members[:n_val])
        train.append(members[n_val:])
    return {"train": rng.permutation(np.concatenate(train)), "val": rng.permutation(np.concatenate(val))}


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _encoded_samples(
    source: ImageSource, indices: np.ndarray, codec, mode: str, batch_size: int, device: str
) -> Iterator[dict]:
    """Encode images in batches; each sample keeps the encoding of the image and of its horizontal flip:
    VAE posterior moments, or the codes ``[h, w]`` of a discrete tokenizer."""
    if isinstance(codec, DiscreteTokenizer):
        make = shards.code_sample

        def encode(x: torch.Tensor) -> np.ndarray:
            return codec.encode(x).reshape(len(x), *codec.grid(x.shape[-2:])).cpu().numpy()
    else:
        make = shards.latent_sample

        def encode(x: torch.Tensor) -> np.ndarray:
            return codec.moments(x).float().cpu().numpy()

    for chunk in _chunks(source.samples(indices), batch_size):
        keys, images, labels = zip(*chunk, strict=True)
        pixels = torch.stack([image_to_tensor(image.convert(mode)) for image in images]).to(device)
        plain, flipped = encode(pixels), encode(pixels.flip(-1))
        for key, label, p, f in zip(keys, labels, plain, flipped, strict=True):
            yield make(key, label, p, f)


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty directory unless ``overwrite``; then remove only what a build writes there."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(
                f"--out {out} is not empty; pass --overwrite to replace the shards and manifest in it"
            )
        stale = [out / shards.MANIFEST, *(p for split in shards.SPLITS for p in out.glob(f"{split}-*.tar"))]
        for path in stale:
            path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def build(
    source: ImageSource,
    out: str | Path,
    *,
    codec=None,
    shard_size: int = 1000,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Write ``source`` split into train/val shards under ``out`` and return the manifest.

    ``codec`` is None for pixel shards, a :class:`~lina_pl.codecs.diffusers_vae.DiffusersVAECodec` for
    latent shards, or a :class:`~lina_pl.codecs.discrete.DiscreteTokenizer` for code shards. Every argument
    is checked before ``out`` is touched, so a bad option never costs an old build.
    """
    out = Path(out)
    resolution = source.resolution
    if codec is None:
        mode, fmt = source.mode, shards.IMAGE
        latent_shape = [source.channels, resolution, resolution]
        codec_info = {"name": "patchify"}
    else:
        discrete = isinstance(codec, DiscreteTokenizer)
        what, channels = ("tokenizer", codec.channels) if discrete else ("VAE", codec.image_channels)
        if channels not in (1, 3):
            raise ValueError(f"the {what} takes {channels}-channel images; only 1 or 3 are supported")
        if resolution % codec.downsample:
            raise ValueError(
                f"--resolution {resolution} is not divisible by the {what}'s stride {codec.downsample}"
            )
        mode = "RGB" if channels == 3 else "L"
        side = resolution // codec.downsample
        fmt = shards.CODES if discrete else shards.LATENT
        latent_shape = [side, side] if discrete else [codec.latent_channels, side, side]
        codec_info = codec.describe()
    splits = split_indices(source.labels, val_fraction, seed)
    _prepare_out_dir(out, overwrite)
    shard_files, counts = {}, {}
    for split, indices in splits.items():
        if codec is None:
            samples = (shards.image_sample(k, im, y) for k, im, y in source.samples(indices))
        else:
            samples = _encoded_samples(source, indices, codec, mode, batch_size, device)
        progress = tqdm(samples, total=len(indices), desc=f"{split} shards", unit="img")
        shard_files[split] = shards.write_split(out, split, progress, shard_size)
        counts[split] = len(indices)
    manifest = {
        "format": fmt,
        "source": source.name,
        "root": None if source.root is None else str(source.root.resolve()),
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "resolution": [resolution, resolution],
        "channels": len(mode),
        "latent_shape": latent_shape,
        "codec": codec_info,
        "counts": counts,
        "shards": shard_files,
        "shard_size": shard_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    shards.write_manifest(out, manifest)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lina data", description="Data preparation for class-to-image training."
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser(
        "build",
        help="write train/val webdataset shards and manifest.json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(command_parser=p)  # so errors print the `build` usage
    p.add_argument(
        "--source",
        required=True,
        choices=["digits", "image-folder"],
        help="digits: sklearn's 1,797 8×8 digits (10 classes); image-folder: ROOT/<class>/<images>",
    )
    p.add_argument("--root", help="image folder in ImageNet layout (only for --source image-folder)")
    p.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    p.add_argument(
        "--codec",
        choices=["patchify", "diffusers", *TOKENIZERS],
        default="patchify",
        help="patchify: store PNG pixels; diffusers: store VAE posterior moments; "
        "kmeans / llamagen_vq: store discrete codes for raster models (default: patchify)",
    )
    p.add_argument("--vae-path", help="local diffusers AutoencoderKL directory (for --codec diffusers)")
    p.add_argument(
        "--tokenizer-path",
        help="tokenizer file: a `lina tokenizer fit` .npz (kmeans) or a LlamaGen VQ checkpoint (llamagen_vq)",
    )
    p.add_argument(
        "--scaling-factor",
        type=float,
        help="latent scale recorded in the manifest (default: the VAE config's, else 1.0)",
    )
    p.add_argument(
        "--shift-factor",
        type=float,
        help="latent shift recorded in the manifest (default: the VAE config's, else 0.0)",
    )
    p.add_argument(
        "--resolution",
        type=int,
        help="square image side in pixels (default: 16 for digits, 256 for an image folder)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default: 1000)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of each class held out for validation (default: 0.1)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the train/val split and shard order (default: 0)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per encoder forward pass (default: 32)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for VAE / tokenizer encoding (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards and manifest of a non-empty --out (other files are kept)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.codec == "diffusers" and not args.vae_path:
            raise ValueError("--codec diffusers needs --vae-path DIR (a local diffusers AutoencoderKL)")
        vae_options = (args.vae_path, args.scaling_factor, args.shift_factor)
        if args.codec != "diffusers" and any(v is not None for v in vae_options):
            raise ValueError(
                "--vae-path, --scaling-factor and --shift-factor are only used with --codec diffusers"
            )
        if (args.codec in TOKENIZERS) != (args.tokenizer_path is not None):
            raise ValueError(
                f"--tokenizer-path goes with --codec {' or '.join(TOKENIZERS)}, and they need it"
            )
        if args.root and args.source != "image-folder":
            raise ValueError("--root is only used with --source image-folder")
        if min(args.shard_size, args.batch_size, args.resolution or 1) < 1:
            raise ValueError("--shard-size, --batch-size and --resolution must be positive")
        source = create_source(args.source, root=args.root, resolution=args.resolution)
        codec = None
        if args.codec == "diffusers":
            from lina_pl.codecs.diffusers_vae import DiffusersVAECodec

            codec = DiffusersVAECodec(
                args.vae_path,
                scaling_factor=args.scaling_factor,
                shift_factor=args.shift_factor,
                device=args.device,
            )
        elif args.codec in TOKENIZERS:
            codec = create_tokenizer(args.codec, path=args.tokenizer_path)
        manifest = build(
            source,
            args.out,
            codec=codec,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            device=args.device,
        )
    except (FileNotFoundError, ValueError) as exn:
        args.command_parser.error(str(exn))
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    print(f"wrote {counts} samples ({manifest['format']}, {manifest['num_classes']} classes) to {args.out}")
    return 0
