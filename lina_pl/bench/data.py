"""Data benchmark: ``ShardDataModule`` throughput on latent shards shaped like 256 px KL-16 latents.

Writes synthetic VAE shards (float16 posterior moments ``[32, 16, 16]`` of an image and of its flip, a class
label; 1,000 classes) with the package's shard writer to a temporary directory, then runs the training loader
(the target: 5,000 samples/s with two workers on two CPU cores). Prints one JSON object:

- ``samples_per_s``: the loader with ``--workers`` DataLoader workers, by the wall clock (on a machine
  shared with other jobs, this is what was left for it);
- ``pipeline_cpu_us_per_sample``: CPU time of the whole pipeline per sample, the loader run in one process
  (no workers), which other jobs barely change; ``main_process_cpu_us_per_sample``: what receiving the
  workers' batches costs the training process; ``cpu_bound_samples_per_s``: what ``min(workers, CPUs)``
  idle cores allow at these costs;
- ``per_sample_us``: CPU time per sample of each stage, on one shard, best of three: ``tar_read`` (read the
  file, verify its SHA-256, split the tar into samples), ``decode`` (decode and check every sample),
  ``collate`` (pick the image or its flip, stack the batch), ``posterior_flip`` (the flip draws and the
  posterior sample, scaled).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lina_pl.data import shards
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.reader import Examples, group_samples, read_shard, tar_members
from lina_pl.errors import ArgumentParser

#: 256 px images through a stride-16, 16-channel KL VAE (MAR's KL-16)
LATENT_SHAPE = (16, 16, 16)
NUM_CLASSES = 1000
TARGET_SAMPLES_PER_S = 5000


def write_latent_shards(out: Path, samples: int, shard_size: int, seed: int = 0) -> dict:
    """Synthetic KL-16 train shards and their manifest (moments: unit-normal means, log-variances near −6)."""
    rng = np.random.default_rng(seed)
    c, h, w = LATENT_SHAPE

    def make():
        for i in range(samples):
            moments = np.concatenate([rng.standard_normal((c, h, w)), rng.uniform(-8, -4, (c, h, w))])
            yield shards.latent_sample(f"{i:08d}", i % NUM_CLASSES, moments, moments[..., ::-1])

    written = shards.write_split(out, "train", make(), shard_size)
    manifest = {
        "format": shards.LATENT,
        "source": "synthetic",
        "root": None,
        "condition": "class",
        "num_classes": NUM_CLASSES,
        "class_names": [str(i) for i in range(NUM_CLASSES)],
        "text_encoder": None,
        "resolution": [256, 256],
        "resolutions": [[256, 256]],
        "channels": 3,
        "latent_shape": list(LATENT_SHAPE),
        "latent_shapes": [list(LATENT_SHAPE)],
        "codec": {"name": "diffusers", "latent_channels": c, "downsample": 16, "scaling_factor": 0.2325},
        "counts": {"train": samples, "val": 0},
        "shards": {"train": [f["name"] for f in written], "val": []},
        "files": shards.files_entry(written, [list(LATENT_SHAPE)]),
        "shard_size": shard_size,
        "val_fraction": 0.0,
        "seed": seed,
    }
    shards.write_manifest(out, manifest)
    return manifest


def time_loader(root: Path, batch_size: int, workers: int, batches: int, warmup: int) -> tuple[float, float]:
    """``(samples per second of wall time, CPU µs per sample in this process)`` over ``batches`` training
    batches after ``warmup`` ones (the workers started)."""
    data = ShardDataModule(str(root), batch_size=batch_size, num_workers=workers, samples_per_epoch=1 << 40)
    loader = data.train_dataloader()
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    loader.close()
    return batches * batch_size / wall, 1e6 * cpu / (batches * batch_size)


def stage_costs(root: Path, batch_size: int, repeats: int = 3) -> dict[str, float]:
    """CPU microseconds per sample of each stage on the first shard, in this process (best of ``repeats``)."""
    manifest = shards.load_manifest(root)
    entry = shards.shard_entries(root, manifest, "train")[0]
    examples = Examples(manifest, scale=0.2325)
    best = dict.fromkeys(("tar_read", "decode", "collate", "posterior_flip"), float("inf"))
    clock = time.process_time
    for _ in range(repeats):
        costs = dict.fromkeys(best, 0.0)
        tick = clock()
        data = Path(entry.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise RuntimeError(f"{entry.path} changed while the benchmark ran")
        samples = group_samples(tar_members(data, check_headers=False)[0])
        costs["tar_read"] = clock() - tick
        tick = clock()
        items = [examples.check(sample) for sample in samples]
        costs["decode"] = clock() - tick
        generator = torch.Generator().manual_seed(0)
        starts = range(0, len(items) - batch_size + 1, batch_size)
        for start in starts:
            tick = clock()
            flips = examples.flips(batch_size, generator)
            middle = clock()
            batch = examples.collate(items[start : start + batch_size], flips)
            end = clock()
            examples.finish(batch, generator)
            costs["collate"] += end - middle
            costs["posterior_flip"] += (middle - tick) + (clock() - end)
        batched = len(starts) * batch_size
        per_sample = {
            k: v / (batched if k in ("collate", "posterior_flip") else len(items)) for k, v in costs.items()
        }
        best = {k: min(best[k], per_sample[k]) for k in best}
    if len(read_shard(entry, examples).items) != entry.samples:  # the reader the loader uses must agree
        raise RuntimeError(f"{entry.path}: the loader's reader lost samples")
    per_sample = {k: round(1e6 * v, 2) for k, v in best.items()}
    return per_sample | {"total": round(sum(per_sample.values()), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="lina bench data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=8000, help="samples written (default: 8000)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default: 2)")
    parser.add_argument("--batches", type=int, default=300, help="batches timed (default: 300)")
    parser.add_argument("--warmup", type=int, default=20, help="batches before timing (default: 20)")
    args = parser.parse_args(argv)
    if min(args.samples, args.shard_size, args.batch_size, args.batches) < 1 or args.workers < 0:
        parser.error("--samples, --shard-size, --batch-size and --batches must be positive")
    if args.samples < args.batch_size:
        parser.error("--samples must hold at least one batch")
    with tempfile.TemporaryDirectory(prefix="lina-bench-data-") as tmp:
        root = Path(tmp)
        write_latent_shards(root, args.samples, args.shard_size)
        per_sample = stage_costs(root, args.batch_size)
        _, pipeline_cpu = time_loader(root, args.batch_size, 0, max(1, args.batches // 3), args.warmup)
        throughput, main_cpu = time_loader(root, args.batch_size, args.workers, args.batches, args.warmup)
    cores = min(max(1, args.workers), os.cpu_count() or 1)
    result = {
        "latent_shape": list(LATENT_SHAPE),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "samples_per_s": round(throughput, 1),
        "target_samples_per_s": TARGET_SAMPLES_PER_S,
        "meets_target": throughput >= TARGET_SAMPLES_PER_S,
        "pipeline_cpu_us_per_sample": round(pipeline_cpu, 2),
        "main_process_cpu_us_per_sample": round(main_cpu, 2) if args.workers else None,
        "cpu_bound_samples_per_s": round(1e6 * cores / (pipeline_cpu + (main_cpu if args.workers else 0)), 1),
        "per_sample_us": per_sample,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
