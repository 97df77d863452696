"""What every class-conditional generator module shares: EMA, AdamW groups + LR schedule, logging, grids.

Subclasses set ``self.model`` (a generator) and implement ``loss(batch)`` and ``sample_images(labels,
seed=..., use_ema=...)``; the hyper-parameters named here must be constructor arguments of the subclass
(``save_hyperparameters`` exposes them as ``self.hparams``).
"""

from __future__ import annotations

import copy
import math
import time
from abc import ABC, abstractmethod

import lightning as L
import torch
from torch import Tensor

from lina_pl.lightning.images import make_grid, to_uint8_nhwc
from lina_pl.nn.optim import parameter_groups

LR_SCHEDULES = ("constant", "cosine")
#: checkpoint entry naming the module class, so ``lina sample`` can rebuild any generator family
MODULE_KEY = "lina_module"


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0.001, then 1 (``constant``) or a cosine decay to 0 at the end."""
    if step < warmup_steps:
        return 0.001 + (1 - 0.001) * step / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class GeneratorModule(L.LightningModule, ABC):
    """Shared training loop for ``LinaC2I`` and ``RasterC2I``."""

    model: torch.nn.Module

    def setup_ema(self) -> None:
        """An EMA copy of ``self.model`` (saved with the checkpoint), or none when ``ema_decay`` is None."""
        if self.hparams.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.hparams.lr_schedule!r}")
        has_ema = self.hparams.ema_decay is not None
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if has_ema else None
        self._last_step_time: float | None = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[MODULE_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"

    @abstractmethod
    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The training objective on one batch (each generator family defines it)."""

    @abstractmethod
    def sample_images(self, labels: Tensor, *, seed: int = 0, use_ema: bool = True) -> Tensor:
        """Images ``[N, C, H, W]`` in ``[-1, 1]`` for class ``labels``."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        now = time.perf_counter()
        if self._last_step_time is not None:
            images = batch["label"].shape[0] * self.trainer.world_size
            self.log("train/images_per_sec", images / (now - self._last_step_time))
        self._last_step_time = now
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None)
        if skipped is not None:
            self.log("data/skipped_samples", float(skipped))
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and self.global_step % self.hparams.ema_interval == 0:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        ema, live = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - self.hparams.ema_decay)

    def sampling_model(self, use_ema: bool = True) -> torch.nn.Module:
        return self.ema if (use_ema and self.ema is not None) else self.model

    def on_validation_epoch_end(self) -> None:
        """Log a grid of samples for fixed classes and seed (EMA weights) to TensorBoard."""
        classes = self.hparams.sample_classes
        if not classes or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        labels = torch.tensor(classes, device=self.device).repeat_interleave(self.hparams.sample_per_class)
        images = self.sample_images(labels, seed=self.hparams.sample_seed)
        grid = make_grid(to_uint8_nhwc(images), nrow=self.hparams.sample_per_class)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/grid", grid, self.global_step, dataformats="HWC")

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay, decay_1d=hp.decay_biases)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, hp.lr_schedule, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
