"""``lina tokenizer fit``: fit the k-means patch tokenizer (the demo's stand-in for VQ-16) on train shards."""

from __future__ import annotations

import json

import torch

from lina_pl.codecs.kmeans import KMeansTokenizer
from lina_pl.errors import ArgumentParser


def main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="lina tokenizer", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    fit = sub.add_parser("fit", help="fit a codebook on the train split of a shard directory")
    fit.add_argument("--data", required=True, help="shard directory (image.png format)")
    fit.add_argument("--out", required=True, help="output .npz")
    fit.add_argument("--codebook-size", type=int, default=256, help="number of codes")
    fit.add_argument("--patch-size", type=int, default=2, help="pixels per side of a patch (one token)")
    fit.add_argument("--iters", type=int, default=25, help="Lloyd iterations")
    fit.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.codebook_size, args.patch_size) < 1 or args.iters < 0:
        fit.error(
            f"--codebook-size and --patch-size must be ≥ 1 and --iters ≥ 0, got {args.codebook_size}, "
            f"{args.patch_size} and {args.iters}"
        )
    from lina_pl.data.datamodule import ShardDataModule

    images, _ = ShardDataModule(args.data).real_images("train")  # uint8 [N, H, W, C]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    tokenizer = KMeansTokenizer.fit(x, args.codebook_size, args.patch_size, args.iters, args.seed)
    path = tokenizer.save(args.out)
    error = (tokenizer.decode(tokenizer.encode(x), tokenizer.grid(x.shape[-2:])) - x).abs().mean().item()
    print(
        json.dumps(
            {"tokenizer": str(path), "codes": args.codebook_size, "mean_abs_reconstruction_error": error}
        )
    )
    return 0
