"""``lina sample``: generate class-conditional samples from a checkpoint into ``samples.npz`` + a PNG grid.

Works for every generator family (LINA masked AR, raster AR); options a family does not use are ignored,
and unset options take the values the module was trained with (its ``sample_*`` hyper-parameters).
``samples.npz`` holds ``arr_0`` (uint8 N×H×W×C, the ADM evaluator convention) and ``labels``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lina_pl.io import save_npz, save_png
from lina_pl.lightning.base import MODULE_KEY
from lina_pl.lightning.images import make_grid, to_uint8_nhwc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lina sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt)")
    p.add_argument("--classes", type=int, nargs="+", required=True, help="class indices to sample")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument(
        "--cfg-schedule",
        choices=["linear", "constant"],
        default="linear",
        help="LINA: linear ramps 1 → cfg over the AR steps (C2I FID recipe); constant keeps cfg",
    )
    p.add_argument("--steps", type=int, default=None, help="LINA: autoregressive (unmasking) steps")
    p.add_argument(
        "--flow-steps", type=int, default=None, help="LINA: Euler steps of the flow head per AR step"
    )
    p.add_argument("--temperature", type=float, default=None, help="raster: softmax temperature")
    p.add_argument("--top-k", type=int, default=None, help="raster: keep the k most likely codes (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="raster: nucleus sampling mass (1 = off)")
    p.add_argument(
        "--cfg-interval", type=int, default=None, help="raster: stop guidance after this many tokens"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the live weights instead of the EMA weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="samples.npz", help="output .npz (a PNG grid is written beside it)")
    return p


def load_module(ckpt: str, device: str = "cpu"):
    """The LightningModule saved in ``ckpt``, whichever generator family it trains."""
    if not Path(ckpt).is_file():
        raise SystemExit(f"checkpoint not found: {ckpt}")
    class_path = torch.load(ckpt, map_location="cpu", weights_only=False).get(MODULE_KEY)
    if class_path is None:
        raise SystemExit(f"{ckpt} was not written by a lina_pl module (no {MODULE_KEY!r} entry)")
    module_name, _, class_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls.load_from_checkpoint(ckpt, map_location=device).eval().to(device)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.per_class < 1 or not args.out.endswith(".npz"):
        raise SystemExit("--per-class must be ≥ 1 and --out must end in .npz")
    module = load_module(args.ckpt, args.device)
    num_classes = module.model.config.num_classes
    bad = [c for c in args.classes if not 0 <= c < num_classes]
    if bad:
        raise SystemExit(f"classes {bad} are outside 0..{num_classes - 1}")
    requested = dict(
        steps=args.steps,
        flow_steps=args.flow_steps,
        cfg=args.cfg,
        cfg_schedule=args.cfg_schedule,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        cfg_interval=args.cfg_interval,
    )
    accepted = inspect.signature(module.sample_images).parameters
    options = {k: v for k, v in requested.items() if v is not None and k in accepted}
    labels = torch.tensor(args.classes).repeat_interleave(args.per_class)
    images, batches = [], labels.split(args.batch_size)
    for i, chunk in enumerate(tqdm(batches, desc="sampling", unit="batch")):
        out = module.sample_images(
            chunk.to(args.device), seed=args.seed + i, use_ema=not args.no_ema, **options
        )
        images.append(to_uint8_nhwc(out))
    arr = np.concatenate(images)
    path = save_npz(args.out, arr_0=arr, labels=labels.numpy())
    grid_path = save_png(path.with_suffix(".png"), make_grid(arr, nrow=args.per_class))
    print(json.dumps({"samples": str(path), "grid": str(grid_path), "shape": list(arr.shape)}))
    return 0
