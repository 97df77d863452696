"""What a fit does when its loss turns NaN or ±inf: stop and name the step (default), or skip the step.

Why: without it a diverged run trains on silently, ends with exit status 0 and overwrites ``last.ckpt`` with
NaN weights, which ``lina sample`` turns into black images. The loss is checked before the backward pass,
so a stopped run never applies the bad step; and since a finite loss can still come with an update that
breaks the weights, no checkpoint holding a non-finite weight is written either: the last good one stays on
disk. Every rank takes the same decision (one all-reduce of a flag per step under DDP).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lina_pl.lightning.callbacks.ema import EMA_KEY

ACTIONS = ("stop", "skip")


def non_finite(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or ±inf (one host sync per device)."""
    flags: dict[torch.device, list[tuple[str, Tensor]]] = {}
    for name, t in tensors.items():
        if isinstance(t, Tensor) and t.is_floating_point():
            local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor shard: no collective
            flags.setdefault(local.device, []).append((name, torch.isfinite(local).all()))
    bad = []
    for pairs in flags.values():
        finite = torch.stack([flag for _, flag in pairs]).tolist()
        bad += [name for (name, _), ok in zip(pairs, finite, strict=True) if not ok]
    return bad


class NonFiniteGuard(Callback):
    """Stops a fit (or skips the step) when the training loss is NaN or ±inf; never writes such weights.

    Args:
        action: ``stop``: end the run with an error naming the step; the weights and the checkpoints on disk
            stay those of the last good step. ``skip``: drop that step's gradients (the optimizer leaves the
            weights alone; the LR schedule moves on) and carry on.
        max_skips: with ``skip``, a non-finite loss after this many skipped steps in a row ends the run like
            ``stop`` (a run that cannot make progress stops).
    """

    def __init__(self, action: str = "stop", max_skips: int = 10):
        if action not in ACTIONS:
            raise ValueError(f"non_finite.action must be one of {', '.join(ACTIONS)}, got {action!r}")
        if max_skips < 1:
            raise ValueError(f"non_finite.max_skips must be ≥ 1, got {max_skips}")
        self.action, self.max_skips = action, max_skips
        self.skipped_in_a_row = 0
        self._skip_step = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if not trainer.strategy.reduce_boolean_decision(not finite, all=False):
            return
        value = f"{loss.detach().float().mean().item()}" if not finite else "non-finite on another rank"
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.action == "stop" or self.skipped_in_a_row >= self.max_skips:
            if self.action == "skip":
                where += f" after {self.skipped_in_a_row} skipped steps in a row"
                alternative = "raise --non_finite.max_skips"
            else:
                alternative = "pass --non_finite.action skip to skip such steps"
            raise FloatingPointError(
                f"the training loss is {value} at {where}: the run diverged and stopped before applying "
                "this step, and the checkpoints already written keep their good weights; lower model.lr or "
                f"raise model.warmup_steps (or {alternative})"
            )
        self._skip_step = True
        rank_zero_warn(f"skipping {where}: the training loss is {value}")

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._skip_step:
            optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left as they are
            self._skip_step = False
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        bad = non_finite(checkpoint.get("state_dict", {})) + non_finite(checkpoint.get(EMA_KEY) or {})
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            example = f", e.g. {bad[0]}" if bad else " on another rank"
            raise FloatingPointError(
                f"refusing to write a checkpoint at step {trainer.global_step}: {len(bad)} weight tensors "
                f"are NaN or ±inf{example}; the run diverged, and the checkpoints already written keep "
                "their good weights; lower model.lr or raise model.warmup_steps"
            )
