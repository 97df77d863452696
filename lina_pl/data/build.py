"""``lina data build``: turn an image source into train/val webdataset shards plus ``manifest.json``.

    lina data build --source digits --out data/shards/digits16
    lina data build --source digit-scenes --out data/shards/scenes --text-encoder bundled:minilm \\
        --text-max-length 16
    lina data build --source image-folder --root /data/imagenet/train --out /data/shards/in256 \\
        --resolution 256 --codec diffusers --vae-path /models/kl16 --batch-size 64

With ``--codec patchify`` the shards hold PNG pixels (the patchify codec needs no encoding); with
``--codec diffusers`` they hold the VAE's posterior moments of each image and of its flip, and with
``--codec llamagen_vq`` or ``kmeans`` the discrete codes of each image and of its flip (raster models;
LlamaGen pre-extracts VQ-16 codes too), so training never runs the encoder.

Class data (digits, an ImageNet-layout folder) is split by a seeded permutation within each class, so it is
reproducible and every class gets the same validation fraction. Text data (digit scenes, a folder of images
with ``<name>.txt`` captions) stores each caption, and with ``--text-encoder`` also its features, so
training never runs the text encoder either. Digit scenes bring their own split: train scenes of the train
digits, evaluation scenes of the held-out digits.
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lina_pl.codecs import DiscreteTokenizer, create_codec
from lina_pl.data import shards, verify
from lina_pl.data.sources import ImageSource, create_source, image_to_tensor, parse_size
from lina_pl.errors import ArgumentParser

#: codecs that write code shards (raster models)
TOKENIZERS = ("kmeans", "llamagen_vq")
#: defaults of the options that depend on the source
DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEXT_MAX_LENGTH = 256


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


def split_source(
    source: ImageSource, val_fraction: float | None, seed: int
) -> tuple[dict[str, np.ndarray], float | None]:
    """``(indices per split, the validation fraction used)``: the source's own split (digit scenes; fraction
    None), else a seeded split by ``val_fraction`` (None: 0.1), stratified by class for class data."""
    fixed = source.fixed_split()
    if fixed is not None:
        if val_fraction is not None:
            raise ValueError(f"--source {source.name} has its own split; set --val-size, not --val-fraction")
        return fixed, None
    fraction = DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction
    labels = source.labels if source.condition == "class" else [0] * len(source)
    return split_indices(labels, fraction, seed), fraction


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _image_encoder(codec, device: str) -> tuple[Callable, Callable]:
    """``(make_sample, encode)``: ``encode(images)`` gives per image the fields ``make_sample`` stores after
    the key and condition: the image itself (pixel shards), or the VAE moments / tokenizer codes of the image
    and of its flip. Images of one size are encoded together, so a chunk may mix aspect buckets."""
    if codec is None:
        return shards.image_sample, lambda images: [(image,) for image in images]
    if isinstance(codec, DiscreteTokenizer):
        make = shards.code_sample

        def run(x: torch.Tensor) -> np.ndarray:
            return codec.encode(x).reshape(len(x), *codec.grid(x.shape[-2:])).cpu().numpy()
    else:
        make = shards.latent_sample

        def run(x: torch.Tensor) -> np.ndarray:
            return codec.moments(x).float().cpu().numpy()

    def encode(images: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        for members in by_size.values():
            pixels = torch.stack([image_to_tensor(images[i]) for i in members]).to(device)
            for i, plain, flipped in zip(members, run(pixels), run(pixels.flip(-1)), strict=True):
                out[i] = (plain, flipped)
        return out

    return make, encode


def caption_features(encoder, captions: Sequence[str]) -> list[np.ndarray]:
    """Per caption, float16 ``[L, E]`` features of its ``L`` real tokens (padding dropped)."""
    features, mask = encoder.encode(list(captions))
    return [f[m].cpu().numpy().astype(np.float16) for f, m in zip(features, mask, strict=True)]


class CaptionFeatures:
    """Captions -> ``caption_features``, encoded in full batches of distinct captions.

    The uncached captions asked for are encoded together with the next uncached ones ``ahead`` (up to the
    encoder's batch size, looking at most ``LOOKAHEAD`` batches far), and a least-recently-used cache of up
    to ``max_bytes`` keeps a repeated caption from being encoded twice (digit scenes have about 2,000
    distinct captions in 20,000 scenes).
    """

    LOOKAHEAD = 16

    def __init__(self, encoder, max_bytes: int = 256 << 20):
        self.encoder, self.max_bytes, self.bytes = encoder, max_bytes, 0
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __call__(self, captions: Sequence[str], ahead: Iterable[str] = ()) -> list[np.ndarray]:
        new = dict.fromkeys(c for c in captions if c not in self.cache)
        if new:
            batch = self.encoder.batch_size
            for caption in itertools.islice(ahead, self.LOOKAHEAD * batch):
                if len(new) >= batch:
                    break
                if caption not in self.cache:
                    new[caption] = None
            for caption, features in zip(new, caption_features(self.encoder, list(new)), strict=True):
                self.cache[caption] = features
                self.bytes += features.nbytes
        out = []
        for caption in captions:
            self.cache.move_to_end(caption)
            out.append(self.cache[caption])
        while self.bytes > self.max_bytes:
            self.bytes -= self.cache.popitem(last=False)[1].nbytes
        return out


def _samples(
    source: ImageSource,
    indices: np.ndarray,
    *,
    codec,
    features_of: CaptionFeatures | None,
    mode: str,
    batch_size: int,
    device: str,
    sizes: Counter,
) -> Iterator[dict]:
    """Shard samples of ``indices``, ``batch_size`` images per codec call (captions turned into features by
    ``features_of`` unless it is None); counts the ``(H, W)`` of every image in ``sizes``."""
    make, encode = _image_encoder(codec, device)
    done = 0
    for chunk in _chunks(source.samples(indices), batch_size):
        keys, images, conditions = zip(*chunk, strict=True)
        done += len(chunk)
        images = [image.convert(mode) for image in images]
        sizes.update((image.height, image.width) for image in images)
        if features_of is None:
            features = [None] * len(keys)
        else:
            features = features_of(conditions, ahead=(source.conditions[i] for i in indices[done:]))
        for key, condition, fields, emb in zip(keys, conditions, encode(images), features, strict=True):
            yield make(key, condition, *fields, text_emb=emb)


def describe_text_encoder(encoder) -> dict:
    """The manifest's ``text_encoder`` entry; the bundled MiniLM is recorded by its alias (portable)."""
    from lina_pl.text.encoder import MINILM_ALIAS, minilm_path

    path = str(Path(encoder.path).resolve())
    try:
        if path == str(minilm_path().resolve()):
            path = MINILM_ALIAS
    except (ImportError, FileNotFoundError):
        pass
    return {
        "path": path,
        "kind": encoder.kind,
        "max_length": encoder.max_length,
        "feature_dim": encoder.feature_dim,
    }


def require_captions(source: ImageSource) -> None:
    """Text features need a text source."""
    if source.condition != "text":
        where = source.name if source.root is None else f"{source.name} {source.root}"
        raise ValueError(
            f"--text-encoder needs captions, but {where} holds class data (text sources: digit-scenes, "
            "or an image folder with <name>.txt captions)"
        )


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


def _codec_layout(
    codec, source: ImageSource
) -> tuple[str, str, Callable[[tuple[int, int]], list[int]], dict]:
    """``(PIL mode, format, latent shape of an (H, W) image, codec entry)``; checks every size bucket."""
    if codec is None:
        return source.mode, shards.IMAGE, lambda hw: [source.channels, *hw], {"name": "patchify"}
    discrete = isinstance(codec, DiscreteTokenizer)
    what = "tokenizer" if discrete else "VAE"
    if codec.channels not in (1, 3):
        raise ValueError(f"the {what} takes {codec.channels}-channel images; only 1 or 3 are supported")
    for height, width in source.sizes:
        if height % codec.downsample or width % codec.downsample:
            size = f"--resolution {height}" if height == width else f"size {height}x{width} of --sizes"
            raise ValueError(f"{size} is not divisible by the {what}'s stride {codec.downsample}")
    mode = "RGB" if codec.channels == 3 else "L"

    def latent_shape(hw: tuple[int, int]) -> list[int]:
        grid = [side // codec.downsample for side in hw]
        return grid if discrete else [codec.latent_channels, *grid]

    return mode, shards.CODES if discrete else shards.LATENT, latent_shape, codec.describe()


def build(
    source: ImageSource,
    out: str | Path,
    *,
    codec=None,
    text_encoder=None,
    shard_size: int = 1000,
    val_fraction: float | None = None,
    seed: int = 0,
    batch_size: int = 32,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Write ``source`` split into train/val shards under ``out`` and return the manifest.

    ``codec`` is None for pixel shards, a :class:`~lina_pl.codecs.diffusers_vae.DiffusersVAECodec` for
    latent shards, or a :class:`~lina_pl.codecs.discrete.DiscreteTokenizer` for code shards.
    ``text_encoder`` (a :class:`~lina_pl.text.encoder.TextEncoder`, text sources only) adds the features of
    each caption. ``val_fraction`` None means 0.1, or the source's own split (digit scenes). Every argument
    is checked before ``out`` is touched, so a bad option never costs an old build.
    """
    out = Path(out)
    mode, fmt, latent_shape, codec_info = _codec_layout(codec, source)
    if text_encoder is not None:
        require_captions(source)
    splits, val_fraction = split_source(source, val_fraction, seed)
    _prepare_out_dir(out, overwrite)
    written, counts, sizes = {}, {}, Counter()
    features_of = None if text_encoder is None else CaptionFeatures(text_encoder)
    options = dict(
        codec=codec, features_of=features_of, mode=mode, batch_size=batch_size, device=device, sizes=sizes
    )
    for split, indices in splits.items():
        samples = _samples(source, indices, **options)
        progress = tqdm(samples, total=len(indices), desc=f"{split} shards", unit="img")
        written[split] = shards.write_split(out, split, progress, shard_size)
        counts[split] = len(indices)
    # the most common size first: `resolution` and `latent_shape` keep describing it for older readers
    present = sorted(sizes, key=lambda hw: (-sizes[hw], hw)) or list(source.sizes[:1])
    latent_shapes = [latent_shape(hw) for hw in present]
    manifest = {
        "format": fmt,
        "source": source.name,
        "root": None if source.root is None else str(source.root.resolve()),
        "condition": source.condition,
        "num_classes": len(source.class_names),
        "class_names": source.class_names,
        "text_encoder": None if text_encoder is None else describe_text_encoder(text_encoder),
        "resolution": list(present[0]),
        "resolutions": [list(hw) for hw in present],
        "channels": len(mode),
        "latent_shape": latent_shape(present[0]),
        "latent_shapes": latent_shapes,
        "codec": codec_info,
        "counts": counts,
        "shards": {split: [w["name"] for w in files] for split, files in written.items()},
        "files": {
            name: entry
            for files in written.values()
            for name, entry in shards.files_entry(files, latent_shapes).items()
        },
        "shard_size": shard_size,
        "val_fraction": val_fraction,
        "seed": seed,
    }
    shards.write_manifest(out, manifest)
    return manifest


def _size_arg(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as exn:
        raise argparse.ArgumentTypeError(str(exn)) from exn


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="lina data", description="Data preparation for class- and text-to-image training."
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
        choices=["digits", "digit-scenes", "image-folder"],
        help="digits: sklearn's 1,797 8×8 digits (10 classes); digit-scenes: 32×32 captioned scenes of "
        "digits (text); image-folder: ROOT/<class>/<images> (ImageNet layout), or images with <name>.txt "
        "captions (text)",
    )
    p.add_argument("--root", help="image folder (only for --source image-folder)")
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
        help="square image side in pixels (default: 16 for digits, 32 for digit scenes, 256 for a folder)",
    )
    p.add_argument(
        "--sizes",
        nargs="+",
        type=_size_arg,
        metavar="HxW",
        help="aspect buckets in pixels, e.g. 256x256 224x288 288x224: each image is centre-cropped to the "
        "bucket of the closest aspect ratio and resized to it (image-folder only; default: the square "
        "--resolution)",
    )
    p.add_argument(
        "--text-encoder",
        metavar="PATH",
        help="store text-encoder features of every caption (txt_emb.npy), so training never runs the "
        "encoder: a local Hugging Face directory or 'bundled:minilm' (default: store captions only)",
    )
    p.add_argument(
        "--text-max-length",
        type=int,
        help=f"tokens per caption the encoder keeps (default: {DEFAULT_TEXT_MAX_LENGTH})",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default: 1000)")
    p.add_argument(
        "--val-fraction",
        type=float,
        help=f"fraction held out for validation, of each class for class data "
        f"(default: {DEFAULT_VAL_FRACTION}; digit scenes use --val-size)",
    )
    p.add_argument(
        "--train-size", type=int, help="digit scenes: training scenes, of the train digits (default: 20000)"
    )
    p.add_argument(
        "--val-size",
        type=int,
        help="digit scenes: validation scenes, of the held-out digits; their captions are "
        "make_prompts(N, seed) (default: 1000)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the train/val split and shard order, or of the digit scenes (default: 0)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images (and captions) per encoder forward pass (default: 32)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device for VAE / tokenizer / text encoding (default: cuda when available, else cpu)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the shards and manifest of a non-empty --out (other files are kept)",
    )
    verify.add_parser(sub)
    return parser


def _check_options(args: argparse.Namespace) -> None:
    """The option combinations, checked before anything is loaded or written."""
    if args.codec == "diffusers" and not args.vae_path:
        raise ValueError("--codec diffusers needs --vae-path DIR (a local diffusers AutoencoderKL)")
    vae_options = (args.vae_path, args.scaling_factor, args.shift_factor)
    if args.codec != "diffusers" and any(v is not None for v in vae_options):
        raise ValueError(
            "--vae-path, --scaling-factor and --shift-factor are only used with --codec diffusers"
        )
    if (args.codec in TOKENIZERS) != (args.tokenizer_path is not None):
        raise ValueError(f"--tokenizer-path goes with --codec {' or '.join(TOKENIZERS)}, and they need it")
    if args.root and args.source != "image-folder":
        raise ValueError("--root is only used with --source image-folder")
    if args.sizes and args.resolution is not None:
        raise ValueError("give --sizes or --resolution, not both (--resolution R means --sizes RxR)")
    if args.text_max_length is not None and args.text_encoder is None:
        raise ValueError("--text-max-length is only used with --text-encoder")
    positive = (args.shard_size, args.batch_size, args.resolution or 1, args.text_max_length or 1)
    if min(positive) < 1:
        raise ValueError("--shard-size, --batch-size, --resolution and --text-max-length must be positive")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action == "verify":
        return verify.run(args)
    try:
        _check_options(args)
        source = create_source(
            args.source,
            root=args.root,
            resolution=args.resolution,
            sizes=args.sizes,
            train_size=args.train_size,
            val_size=args.val_size,
            seed=args.seed,
        )
        if args.text_encoder is not None:
            require_captions(source)
        split_source(source, args.val_fraction, args.seed)  # fails early on a bad --val-fraction
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
            codec = create_codec(args.codec, path=args.tokenizer_path)
        text_encoder = None
        if args.text_encoder is not None:
            from lina_pl.text.encoder import TextEncoder

            max_length = DEFAULT_TEXT_MAX_LENGTH if args.text_max_length is None else args.text_max_length
            text_encoder = TextEncoder(
                args.text_encoder, max_length=max_length, device=args.device, batch_size=args.batch_size
            )
        manifest = build(
            source,
            args.out,
            codec=codec,
            text_encoder=text_encoder,
            shard_size=args.shard_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            batch_size=args.batch_size,
            overwrite=args.overwrite,
            device=args.device,
        )
    except (OSError, ImportError, ValueError) as exn:
        args.command_parser.error(str(exn))
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    if manifest["condition"] == "class":
        what = f"{manifest['num_classes']} classes"
    else:
        what = "captions" + (" + text features" if manifest["text_encoder"] else "")
    sizes = " ".join("x".join(map(str, hw)) for hw in manifest["resolutions"])
    print(f"wrote {counts} samples ({manifest['format']}, {what}, {sizes}) to {args.out}")
    return 0
