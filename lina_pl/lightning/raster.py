"""LightningModule for class-to-image training of a raster AR generator (LASADGen, LlamaGen, baselines)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lina_pl.codecs import create_tokenizer
from lina_pl.data.shards import CODES
from lina_pl.lightning.base import GeneratorModule
from lina_pl.models import create_model


class RasterC2I(GeneratorModule):
    """Next-token cross-entropy over discrete codes; LlamaGen's recipe by default (reference/lasad.md §3.3).

    Args:
        model: preset name (``lasad_b``, ``llamagen_l``, ``lasad_tiny``, ...).
        model_overrides: config fields to change (``mixer``, ``sad_mode``, ``sad_position``, dropouts, ...).
        tokenizer: ``kmeans`` (``lina tokenizer fit``, no pretrained weights) or ``llamagen_vq`` (VQ-16).
        tokenizer_options: its options, e.g. ``{path: runs/lasad_demo/tokenizer.npz}`` (see
            :func:`lina_pl.codecs.create_tokenizer`). The frozen tokenizer encodes PNG batches on the fly
            and decodes samples; code shards (``lina data build --codec NAME``) skip the encoding.
        image_size: (H, W) of the images (linked from the data module).
        image_channels: image channels (linked from the data module).
        num_classes: number of classes (linked from the data module).
        lr: learning rate (constant after the warm-up).
        weight_decay: AdamW weight decay on ≥2-D weights; HGRN2 lower bounds and norms are never decayed.
        betas: AdamW betas.
        decay_biases: decay 1-D parameters too (off, as in LlamaGen).
        warmup_steps: linear warm-up from 0.001·lr (LlamaGen: none).
        lr_schedule: "constant" or "cosine".
        ema_decay: EMA decay per update, or None for no EMA (LlamaGen's default).
        ema_interval: update the EMA every this many steps.
        sample_classes: classes of the sample grid logged at each validation (None = no grid).
        sample_per_class: samples per class in that grid.
        sample_seed: seed of the grid.
        sample_cfg: guidance scale on logits for the grid.
        sample_temperature: softmax temperature for the grid.
        sample_top_k: top-k filter for the grid (0 = off).
        sample_top_p: top-p filter for the grid (1 = off).
    """

    def __init__(
        self,
        model: str = "lasad_tiny",
        model_overrides: dict[str, Any] | None = None,
        tokenizer: str = "kmeans",
        tokenizer_options: dict[str, Any] | None = None,
        image_size: tuple[int, int] = (16, 16),
        image_channels: int = 1,
        num_classes: int = 10,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        decay_biases: bool = False,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        ema_decay: float | None = None,
        ema_interval: int = 1,
        sample_classes: list[int] | None = None,
        sample_per_class: int = 4,
        sample_seed: int = 0,
        sample_cfg: float = 2.0,
        sample_temperature: float = 1.0,
        sample_top_k: int = 0,
        sample_top_p: float = 1.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = create_tokenizer(tokenizer, **(tokenizer_options or {}))
        if self.tokenizer.channels != image_channels:
            raise ValueError(
                f"tokenizer expects {self.tokenizer.channels}-channel images, data has {image_channels}"
            )
        overrides = {
            "grid": self.tokenizer.grid(tuple(image_size)),
            "vocab_size": self.tokenizer.codebook_size,
            "num_classes": num_classes,
        }
        self.model = create_model(model, **(overrides | (model_overrides or {})))
        self.setup_ema()

    def setup(self, stage: str) -> None:
        """Code shards must come from this module's tokenizer (same kind, codebook and stride)."""
        manifest = getattr(getattr(self.trainer, "datamodule", None), "manifest", None)
        if manifest is None or manifest["format"] != CODES:
            return
        keys = ("name", "codebook_size", "downsample")
        ours, theirs = self.tokenizer.describe(), manifest["codec"]
        if any(ours[k] != theirs.get(k) for k in keys):
            raise ValueError(
                f"the code shards were made by {theirs}, but this module tokenizes with {ours}; "
                "rebuild them with this tokenizer (lina data build --codec NAME --tokenizer-path FILE)"
            )

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Cross-entropy of every next code; PNG batches are tokenized here, code shards arrive as codes."""
        latent = batch["latent"]
        codes = self.tokenizer.encode(latent) if latent.is_floating_point() else latent.flatten(1)
        logits = self.model(codes, batch["label"])
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())

    @torch.no_grad()
    def sample_images(
        self,
        labels: Tensor,
        *,
        cfg: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_interval: int = -1,
        seed: int = 0,
        use_ema: bool = True,
    ) -> Tensor:
        """Generate images ``[N, C, H, W]`` in ``[-1, 1]``; unset options take the ``sample_*`` values."""
        hp = self.hparams
        model = self.sampling_model(use_ema)
        codes = model.generate(
            labels,
            cfg=hp.sample_cfg if cfg is None else cfg,
            cfg_interval=cfg_interval,
            temperature=hp.sample_temperature if temperature is None else temperature,
            top_k=hp.sample_top_k if top_k is None else top_k,
            top_p=hp.sample_top_p if top_p is None else top_p,
            generator=torch.Generator(device=labels.device).manual_seed(seed),
        )
        return self.tokenizer.decode(codes, model.config.grid)
