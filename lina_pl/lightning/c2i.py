"""LightningModule for class-to-image training of a LINA generator on latent (or pixel) shards."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lina_pl.codecs import create_codec
from lina_pl.lightning.images import make_grid, to_uint8_nhwc
from lina_pl.models import create_model
from lina_pl.nn.optim import parameter_groups


class LinaC2I(L.LightningModule):
    """Trains ``model`` (a preset name) with AdamW, warm-up then constant (or cosine) LR, and an EMA copy.

    Args:
        model: preset name in ``lina_pl.models.PRESETS``.
        model_overrides: config fields to change (mixers, depths, mask ratios, ...).
        codec: images <-> latents: "patchify" (pixels) or "diffusers" (a local AutoencoderKL).
        codec_options: the codec's options, e.g. ``{patch_size: 2}`` or ``{path: /vae, patch_size: 1}``;
            patchify's ``channels`` defaults to ``image_channels``.
        image_size: (H, W) of the images (linked from the data module).
        image_channels: image channels (linked from the data module).
        num_classes: number of classes (linked from the data module).
        lr: peak learning rate.
        weight_decay: AdamW weight decay; norms and KV gates are never decayed.
        betas: AdamW betas.
        decay_biases: decay 1-D parameters too (LINA's original recipe) or not (LlamaGen's).
        warmup_steps: linear warm-up from 0.001·lr.
        lr_schedule: "constant" after warm-up (the paper) or "cosine" to 0 at the last step.
        ema_decay: EMA decay per update; the EMA weights make the samples.
        ema_interval: update the EMA every this many steps.
        sample_classes: classes of the sample grid logged at each validation (None = no grid).
        sample_per_class: samples per class in that grid.
        sample_seed: seed of the grid (the same images are tracked across validations).
        sample_steps: autoregressive steps for the grid.
        sample_flow_steps: Euler steps per AR step for the grid.
        sample_cfg: guidance scale for the grid.
    """

    def __init__(
        self,
        model: str = "lina_c2i_demo",
        model_overrides: dict[str, Any] | None = None,
        codec: str = "patchify",
        codec_options: dict[str, Any] | None = None,
        image_size: tuple[int, int] = (16, 16),
        image_channels: int = 1,
        num_classes: int = 10,
        lr: float = 8e-4,
        weight_decay: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.95),
        decay_biases: bool = True,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: float = 0.9999,
        ema_interval: int = 1,
        sample_classes: list[int] | None = None,
        sample_per_class: int = 4,
        sample_seed: int = 0,
        sample_steps: int = 16,
        sample_flow_steps: int = 25,
        sample_cfg: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        options = dict(codec_options or {})
        if codec == "patchify":
            options.setdefault("channels", image_channels)
        self.codec = create_codec(codec, **options)
        grid = self.codec.grid(tuple(image_size))
        overrides = {"grid": grid, "token_channels": self.codec.token_channels, "num_classes": num_classes}
        self.model = create_model(model, **(overrides | (model_overrides or {})))
        self.ema = copy.deepcopy(self.model).requires_grad_(False)  # no dropout/BN: mode is irrelevant
        self._last_step_time: float | None = None

    # ------------------------------------------------------------------------------------------------
    # steps
    # ------------------------------------------------------------------------------------------------

    def tokens(self, batch: dict[str, Tensor]) -> Tensor:
        return self.codec.to_tokens(batch["latent"])

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model(self.tokens(batch), batch["label"])
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
        self.log("val/loss", self.model(self.tokens(batch), batch["label"]), sync_dist=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.global_step % self.hparams.ema_interval == 0:
            self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        ema, live = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - self.hparams.ema_decay)

    # ------------------------------------------------------------------------------------------------
    # samples
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_images(
        self,
        labels: Tensor,
        *,
        steps: int = 16,
        flow_steps: int = 25,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        seed: int = 0,
        use_ema: bool = True,
    ) -> Tensor:
        """Generate images ``[N, C, H, W]`` in ``[-1, 1]`` for ``labels`` (EMA weights by default)."""
        model = self.ema if use_ema else self.model
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        tokens = model.generate(
            labels,
            steps=steps,
            flow_steps=flow_steps,
            cfg=cfg,
            cfg_schedule=cfg_schedule,
            generator=generator,
        )
        return self.codec.tokens_to_images(tokens, model.config.grid)

    def on_validation_epoch_end(self) -> None:
        classes = self.hparams.sample_classes
        if not classes or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        labels = torch.tensor(classes, device=self.device).repeat_interleave(self.hparams.sample_per_class)
        images = self.sample_images(
            labels,
            steps=self.hparams.sample_steps,
            flow_steps=self.hparams.sample_flow_steps,
            cfg=self.hparams.sample_cfg,
            seed=self.hparams.sample_seed,
        )
        grid = make_grid(to_uint8_nhwc(images), nrow=self.hparams.sample_per_class)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_image"):
            experiment.add_image("samples/grid", grid, self.global_step, dataformats="HWC")

    # ------------------------------------------------------------------------------------------------
    # optimisation
    # ------------------------------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self.model, hp.weight_decay, decay_1d=hp.decay_biases)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)

        def factor(step: int) -> float:
            return lr_factor(step, hp.warmup_steps, hp.lr_schedule, total)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0.001, then 1 (``constant``) or a cosine decay to 0 at the end."""
    if step < warmup_steps:
        return 0.001 + (1 - 0.001) * step / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0
