"""Checkpoint files: written atomically by a fit, checked before a resume, loaded for sampling, evaluation
and notebooks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lina_pl.io import atomic_write, load_torch
from lina_pl.lightning.callbacks.ema import EMA_KEY
from lina_pl.lightning.callbacks.non_finite import non_finite
from lina_pl.lightning.consolidate import read_checkpoint
from lina_pl.lightning.module import CODEC_KEY, GeneratorModule, check_format
from lina_pl.models import preset


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written to a temporary file that replaces the target only once
    complete and on disk (:func:`lina_pl.io.atomic_write`).

    Why: Lightning writes to the system's temp directory and moves the file over the target; when that is
    another filesystem (a local /tmp, checkpoints on shared storage) the move copies into the truncated
    target, so a kill or a full disk mid-copy leaves a broken ``last.ckpt`` that the next ``--ckpt_path``
    trusts, and nothing is flushed to disk. Here the previous file survives any failed write.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote filesystems: Lightning's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)

        atomic_write(path, write)


def check_resume(path: str | Path, model: Mapping[str, Any]) -> None:
    """A ``--ckpt_path`` must hold the model the config trains: lina_pl's format, the same preset and codec.

    Everything else comes from the config, not the checkpoint (an explicit ``--model.lr`` fine-tunes), so a
    checkpoint of another model would silently train something else. Lightning's special names (``last``,
    ``hpc``) and sharded directories are checked when they are loaded.
    """
    if not Path(path).is_file():
        return
    checkpoint = load_torch(path, mmap=True)
    check_format(checkpoint, str(path))
    saved = checkpoint.get("hyper_parameters") or {}
    fix = (
        "resume with the config it was trained with (the run's tensorboard/config.yaml), or start a new run "
        f"from its weights with --model.init_from {path}"
    )
    if saved.get("generator") != model.get("generator"):
        theirs, ours = saved.get("generator"), model.get("generator")
        raise ValueError(
            f"--ckpt_path {path} holds a {theirs} model ({preset(theirs).family} family), but the config "
            f"trains {ours} ({preset(ours).family} family); {fix}"
        )
    if saved.get("codec") != model.get("codec"):
        raise ValueError(
            f"--ckpt_path {path} was trained on {saved.get('codec')} tokens, but the config uses the "
            f"{model.get('codec')} codec; {fix}"
        )


def load_module(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> GeneratorModule:
    """The ``GeneratorModule`` saved in ``path`` in eval mode, with the EMA weights loaded into its generator
    when ``use_ema`` and the run kept an EMA (otherwise the live weights)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)  # a file, or a sharded (FSDP2) directory
    check_format(checkpoint, str(path))
    ema = checkpoint.get(EMA_KEY) if use_ema else None
    bad = non_finite(checkpoint["state_dict"]) + non_finite(ema or {})
    if bad:
        raise ValueError(
            f"{path} holds NaN or ±inf weights ({len(bad)} tensors, e.g. {bad[0]}): its run diverged; "
            "sample an earlier checkpoint, or retrain with a lower model.lr"
        )
    # built from the dict already in memory: Lightning's load_from_checkpoint would read the file again
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    if checkpoint.get(CODEC_KEY):  # the run's tokenizer, kept in the checkpoint: no file needed
        arguments["codec_options"] = checkpoint[CODEC_KEY]
    module = GeneratorModule(**arguments)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    if ema is not None:
        missing, unexpected = module.generator.load_state_dict(ema, strict=False)
        parameters = {n for n, _ in module.generator.named_parameters()}
        if unexpected or parameters & set(missing):
            raise ValueError(f"{path}: its EMA weights do not match the generator ({unexpected or missing})")
    return module.eval().to(device)
