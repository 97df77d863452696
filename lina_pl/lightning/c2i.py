"""LightningModule for class-to-image training of a LINA generator on latent (or pixel) shards."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lina_pl.codecs import create_codec
from lina_pl.lightning.base import GeneratorModule
from lina_pl.models import create_model


class LinaC2I(GeneratorModule):
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
        ema_decay: EMA decay per update; the EMA weights make the samples (None: no EMA).
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
        ema_decay: float | None = 0.9999,
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
        options = dict(codec_options or {})
        if codec == "patchify":
            options.setdefault("channels", image_channels)
        self.codec = create_codec(codec, **options)
        grid = self.codec.grid(tuple(image_size))
        overrides = {"grid": grid, "token_channels": self.codec.token_channels, "num_classes": num_classes}
        self.model = create_model(model, **(overrides | (model_overrides or {})))
        self.setup_ema()

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(self.codec.to_tokens(batch["latent"]), batch["label"])

    @torch.no_grad()
    def sample_images(
        self,
        labels: Tensor,
        *,
        steps: int | None = None,
        flow_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str = "linear",
        seed: int = 0,
        use_ema: bool = True,
    ) -> Tensor:
        """Generate images ``[N, C, H, W]`` in ``[-1, 1]`` for ``labels`` (EMA weights by default);
        unset options take the ``sample_*`` hyper-parameters."""
        hp = self.hparams
        model = self.sampling_model(use_ema)
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        tokens = model.generate(
            labels,
            steps=steps or hp.sample_steps,
            flow_steps=flow_steps or hp.sample_flow_steps,
            cfg=hp.sample_cfg if cfg is None else cfg,
            cfg_schedule=cfg_schedule,
            generator=generator,
        )
        return self.codec.tokens_to_images(tokens, model.config.grid)
