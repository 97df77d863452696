"""``lina consolidate``: a sharded (FSDP2 / distributed) checkpoint directory -> one ordinary checkpoint file.

Why: ``ModelParallelStrategy`` writes each rank's shards into a directory, which resumes on any number of
ranks but which ``lina sample``, ``init_from`` and notebooks would otherwise need a process group to read.
torch's ``dcp_to_torch_save`` reads the shards without one; this puts the weights, the EMA (stored beside
them as ``ema_state_dict.<name>``) and the run's metadata back into the layout of a single-process
checkpoint. Optimizer states are dropped: resume from the directory itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from lina_pl.errors import ArgumentParser
from lina_pl.io import atomic_write, load_torch
from lina_pl.lightning.callbacks.ema import EMA_KEY

#: file Lightning's ModelParallelStrategy writes beside the shards (everything but weights and optimizers)
METADATA_FILE = "meta.pt"


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint as one dict: a file as it is, a sharded directory consolidated in memory."""
    path = Path(path)
    if path.is_file():
        return load_torch(path)  # a text or truncated file is one clear error
    if not (path / METADATA_FILE).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (neither a file nor a sharded checkpoint)")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    checkpoint = torch.load(path / METADATA_FILE, map_location="cpu", weights_only=False)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, Path(tmp) / "full.pt")
        stored = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=False)["state_dict"]
    prefix = f"{EMA_KEY}."
    checkpoint["state_dict"] = {k: v for k, v in stored.items() if not k.startswith(prefix)}
    ema = {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}
    if ema:
        checkpoint[EMA_KEY] = ema
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="lina consolidate",
        description="A sharded checkpoint directory (FSDP2) -> one file for `lina sample` and init_from.",
    )
    parser.add_argument("checkpoint", type=Path, help="the sharded checkpoint directory (e.g. last.ckpt/)")
    parser.add_argument("--out", type=Path, required=True, help="the single checkpoint file to write")
    args = parser.parse_args(argv)
    checkpoint = read_checkpoint(args.checkpoint)
    atomic_write(args.out, lambda tmp: torch.save(checkpoint, tmp))
    print(
        f"{args.out}: {len(checkpoint['state_dict'])} weights, EMA {'yes' if EMA_KEY in checkpoint else 'no'}"
    )
    return 0
