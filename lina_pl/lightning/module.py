"""One LightningModule for every generator family and condition: a preset, a codec and a condition.

The module only turns batches into tokens (through the codec) and hands them to the generator's
``loss``; everything else a run needs — EMA, sample grids, throughput — is a callback
(:mod:`lina_pl.lightning.callbacks`), and the generator itself is built in ``configure_model`` so sharded
strategies (FSDP2, DeepSpeed stage 3) can build or shard it in place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lina_pl.codecs import create_codec
from lina_pl.data.shards import CODES
from lina_pl.lightning.init_from import GATE_MODES, source_weights, transfer_weights
from lina_pl.lightning.strategies import destroy_process_group_at_exit
from lina_pl.models import FAMILIES, Generator, SamplingOptions, create_model, preset
from lina_pl.nn.optim import parameter_groups

LR_SCHEDULES = ("constant", "cosine")
FSDP_DTYPES = ("bfloat16", "float16", "float32")
#: checkpoint entry recording the layout of lina_pl checkpoints; bumped when old ones cannot load
FORMAT_KEY = "lina_pl_format"
CHECKPOINT_FORMAT = 2
#: checkpoint entry with the codec's embedded options (a k-means codebook): sampling needs no tokenizer file
CODEC_KEY = "codec_options"
#: optimizer settings a resumed run takes from its config rather than its checkpoint
CONFIGURED = ("initial_lr", "betas", "weight_decay")


def lr_factor(step: int, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """LR multiplier: linear warm-up from 0.001, then 1 (``constant``) or a cosine decay to 0 at the end."""
    if step < warmup_steps:
        return 0.001 + (1 - 0.001) * step / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return 1.0


class ConfiguredLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` that keeps the configured peak LR when a checkpoint is loaded: a resumed run continues the
    schedule at its step, with the LR of its config (an explicit ``--model.lr`` fine-tunes)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        base_lrs = self.base_lrs
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs


def keep_configured(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Optimizer pre-load hook: moments and step counts come from the checkpoint, the LR, betas and weight
    decay from the config (the LR at the checkpoint's point of the schedule)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        return  # torch refuses the state with its own message
    for saved, ours in zip(saved_groups, optimizer.param_groups, strict=True):
        if saved.get("initial_lr"):
            saved["lr"] *= ours["initial_lr"] / saved["initial_lr"]
        saved.update({k: ours[k] for k in CONFIGURED})


class GeneratorModule(L.LightningModule):
    """Trains a generator preset on shards with AdamW and a warm-up + constant (or cosine) LR.

    Args:
        generator: preset name in ``lina_pl.models.PRESETS`` (``lina_c2i_demo``, ``lasad_b``, ...).
        generator_options: config fields of the preset to change (mixers, depths, mask ratios, ...).
        codec: images <-> tokens: ``patchify`` / ``diffusers`` (continuous, LINA) or ``kmeans`` /
            ``llamagen_vq`` (discrete codes, raster models).
        codec_options: the codec's options, e.g. ``{patch_size: 2}`` or ``{path: /vae, patch_size: 1}``;
            patchify's ``channels`` defaults to ``image_channels``.
        condition: the preset's condition (None) or another one by name (``class``).
        condition_options: options of the condition (e.g. ``{dropout: 0.1}``).
        image_size: (H, W) of the images (linked from the data module).
        image_channels: image channels (linked from the data module).
        num_classes: classes of the data (linked from the data module); sets a class condition's size.
        sampling: default sampling options of the family (LINA: steps, flow_steps, cfg, cfg_schedule;
            raster: cfg, cfg_interval, temperature, top_k, top_p) for grids and ``lina sample``.
        lr: peak learning rate.
        weight_decay: AdamW weight decay; norms, KV gates and HGRN2 bounds are never decayed.
        betas: AdamW betas.
        decay_biases: decay 1-D parameters too (LINA's original recipe) or not (LlamaGen's).
        warmup_steps: linear warm-up from 0.001·lr.
        lr_schedule: "constant" after warm-up (both papers) or "cosine" to 0 at the last step.
        init_from: a lina_pl checkpoint whose generator weights (its EMA when it has one) start this fit,
            e.g. the previous stage of the resolution curriculum; shape-compatible tensors are copied, the
            rest is listed. A resumed run (``--ckpt_path``) restores its own weights over these.
        init_gates: KV gates of another resolution: ``resize`` (``grid`` gates are interpolated; absolute
            gates are reset to 1, as in the original) or ``reset`` (every such gate back to 1).
        activation_checkpointing: recompute each transformer block's activations in the backward pass
            (less memory, about 1/3 more compute; same math).
        fsdp_param_dtype: under FSDP2 (``ModelParallelStrategy``): the dtype blocks compute in
            (``bfloat16``; gradients are reduced and weights kept in fp32); None: the weights' own dtype.
    """

    #: FLOPs of one training batch for the Throughput callback's utilisation figure (not measured yet)
    flops_per_batch: int | None = None

    def __init__(
        self,
        generator: str = "lina_c2i_demo",
        generator_options: dict[str, Any] | None = None,
        codec: str = "patchify",
        codec_options: dict[str, Any] | None = None,
        condition: str | None = None,
        condition_options: dict[str, Any] | None = None,
        image_size: tuple[int, int] = (16, 16),
        image_channels: int = 1,
        num_classes: int | None = None,
        sampling: dict[str, Any] | None = None,
        lr: float = 8e-4,
        weight_decay: float = 0.02,
        betas: tuple[float, float] = (0.9, 0.95),
        decay_biases: bool = True,
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        init_from: str | None = None,
        init_gates: str = "resize",
        activation_checkpointing: bool = False,
        fsdp_param_dtype: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        if init_gates not in GATE_MODES:
            raise ValueError(f"init_gates must be one of {GATE_MODES}, got {init_gates!r}")
        if fsdp_param_dtype is not None and fsdp_param_dtype not in FSDP_DTYPES:
            raise ValueError(
                f"fsdp_param_dtype must be one of {', '.join(FSDP_DTYPES)}, got {fsdp_param_dtype!r}"
            )
        spec = preset(generator)
        family_cls = FAMILIES[spec.family][0]
        options = dict(codec_options or {})
        if codec == "patchify":
            options.setdefault("channels", image_channels)
        self.codec = create_codec(codec, **options)
        if self.codec.kind != family_cls.token_kind:
            raise ValueError(
                f"{generator} models {family_cls.token_kind} tokens, but the {codec} codec makes "
                f"{self.codec.kind} ones; choose a {family_cls.token_kind} codec"
            )
        if self.codec.channels != image_channels:
            raise ValueError(
                f"the {codec} codec takes {self.codec.channels}-channel images, data has {image_channels}"
            )
        self.grid = self.codec.grid(tuple(image_size))
        self.default_sampling = family_cls.Sampling.create(spec.family, **(sampling or {}))
        with torch.device("meta"):  # every option is checked now, at config time, at no memory cost
            create_model(generator, **self.generator_kwargs())
        self.generator: Generator | None = None

    def generator_kwargs(self) -> dict[str, Any]:
        """Everything ``create_model`` gets: the preset, its overrides, the codec's fields, the condition."""
        hp = self.hparams
        kind = hp.condition or preset(hp.generator).condition
        condition_options = dict(hp.condition_options or {})
        if kind == "class" and hp.num_classes == 0:
            raise ValueError(f"{hp.generator} is class-conditioned but the data has captions, not classes")
        if kind == "class" and hp.num_classes is not None:
            given = condition_options.setdefault("num_classes", hp.num_classes)
            if given != hp.num_classes:
                raise ValueError(
                    f"condition_options.num_classes={given}, but the data has {hp.num_classes} classes"
                )
        fields = {"grid": self.grid, **self.codec.generator_fields()}
        return dict(
            fields | (hp.generator_options or {}), condition=hp.condition, condition_options=condition_options
        )

    def configure_model(self) -> None:
        """Build the generator (once; Lightning calls this again when a checkpoint is loaded into a fit),
        and warm-start it from ``init_from`` when a fit begins."""
        if self.generator is not None:
            return
        self.generator = create_model(self.hparams.generator, **self.generator_kwargs())
        self.generator.activation_checkpointing = self.hparams.activation_checkpointing
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if self.hparams.init_from and fitting:
            source = source_weights(self.hparams.init_from)
            report = transfer_weights(self.generator, source, self.hparams.init_gates)
            changed = {k: v for k, v in report.items() if k != "copied" and v}
            rank_zero_info(
                f"init_from {self.hparams.init_from}: copied {len(report['copied'])} tensors"
                + "".join(f"; {k} {len(v)}: {', '.join(v)}" for k, v in changed.items())
            )
        if self.device_mesh is not None:  # ModelParallelStrategy: FSDP2 over its data-parallel dimension
            self.shard(self.device_mesh["data_parallel"])

    def shard(self, mesh) -> None:
        """FSDP2: every block, then the rest of the generator, sharded over ``mesh``, with a mixed-precision
        policy when ``fsdp_param_dtype`` is set. Parameter names do not change, so checkpoints and the EMA
        keep the same keys under every strategy."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        dtype = self.hparams.fsdp_param_dtype
        policy = MixedPrecisionPolicy(
            param_dtype=getattr(torch, dtype) if dtype else None,
            reduce_dtype=torch.float32 if dtype else None,
        )
        for block in self.generator.blocks():
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(self.generator, mesh=mesh, mp_policy=policy)
        for method in ("loss", "generate"):  # the generator's entry points, not forward: gather around them
            register_fsdp_forward_method(self.generator, method)

    @property
    def condition(self):
        return self.generator.condition

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        """Code shards must come from this module's tokenizer (same kind, codebook and stride); a
        multi-process run destroys its process group at exit."""
        destroy_process_group_at_exit()  # a no-op at exit unless a process group was started
        manifest = getattr(getattr(self.trainer, "datamodule", None), "manifest", None)
        if manifest is None or manifest["format"] != CODES:
            return
        if self.codec.kind != "discrete":
            raise ValueError(
                f"these are code shards (codes.npy) for raster models, but {self.hparams.generator} models "
                f"{self.codec.kind} tokens; build pixel or latent shards for it (lina data build with "
                "--codec patchify or diffusers), or train a raster preset on these"
            )
        keys = ("name", "codebook_size", "downsample", "codebook_sha256")
        ours, theirs = self.codec.describe(), manifest["codec"]
        if "codebook_sha256" not in theirs:  # shards built before hashes were recorded
            keys = keys[:-1]
            rank_zero_warn("the code shards' manifest has no codebook hash; rebuild them to check it")
        differ = [f"{k} {theirs.get(k)} there, {ours[k]} here" for k in keys if ours[k] != theirs.get(k)]
        if differ:
            raise ValueError(
                f"the code shards were made by another tokenizer ({theirs.get('path')}) than this module's "
                f"({ours['path']}): {'; '.join(differ)}; rebuild them with this tokenizer (lina data build "
                "--codec NAME --tokenizer-path FILE) or train with theirs"
            )

    def reseed(self, *counters: int) -> None:
        """Seed the global RNGs (mask ratios and orders, condition drops, σ, noise) from the run's seed,
        this rank and ``counters``.

        Why per rank and per step: ``seed_everything`` gives every rank one RNG stream, so all ranks would
        draw the same masks and noise at each step (the original seeds per rank); and a draw that depends
        only on (seed, rank, step) makes a resumed run reproduce the uninterrupted one without saving any
        RNG state, on any number of ranks.
        """
        base = int(os.environ.get("PL_GLOBAL_SEED", 0))
        seed = np.random.SeedSequence([base, self.global_rank, *counters]).generate_state(1, np.uint64)[0]
        torch.manual_seed(int(seed))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        micro = batch_idx % self.trainer.accumulate_grad_batches
        self.reseed(self.trainer.global_step, micro)

    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """The same draws at every validation, so val losses of a run compare checkpoints, not luck."""
        self.reseed(2**32, dataloader_idx, batch_idx)

    def generator_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A data batch with its ``latent`` turned into the generator's ``tokens`` and their ``grid``."""
        latent = batch["latent"]
        return {**batch, "tokens": self.codec.batch_tokens(latent), "grid": self.codec.batch_grid(latent)}

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        return self.generator.loss(self.generator_batch(batch))

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["latent"]))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        skipped = getattr(self.trainer.datamodule, "skipped_samples", None)
        if skipped is not None:
            self.log("data/skipped_samples", float(skipped))
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self.log("val/loss", self.loss(batch), sync_dist=True, batch_size=len(batch["latent"]))

    def configure_optimizers(self):
        hp = self.hparams
        groups = parameter_groups(self.generator, hp.weight_decay, decay_1d=hp.decay_biases)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        optimizer.register_load_state_dict_pre_hook(keep_configured)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = ConfiguredLambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, hp.lr_schedule, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------------------------
    # sampling
    # ---------------------------------------------------------------------------------------------

    def sampling_options(self, **overrides: Any) -> SamplingOptions:
        """The module's default sampling options with ``overrides`` (a name the family lacks is an error)."""
        defaults = {f: getattr(self.default_sampling, f) for f in self.default_sampling.names()}
        return type(self.default_sampling).create(self.generator.family, **(defaults | overrides))

    @torch.no_grad()
    def sample_images(
        self,
        condition: Mapping[str, Any],
        options: SamplingOptions | None = None,
        *,
        seed: int = 0,
        image_size: tuple[int, int] | None = None,
        **generate_options: Any,
    ) -> Tensor:
        """Images ``[N, C, H, W]`` in ``[-1, 1]`` for a batch of condition fields, at ``image_size`` (None:
        the training size), with the generator's current weights (the EMA callback swaps the EMA weights
        in for validation; ``lina sample`` loads them). ``generate_options`` go to the generator's
        ``generate`` as they are (e.g. LINA's ``on_step`` hook, for the inspection notebook)."""
        grid = self.grid if image_size is None else self.codec.grid(tuple(image_size))
        was_training = self.generator.training
        self.generator.eval()
        try:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            options = options or self.default_sampling
            tokens = self.generator.generate(
                condition, options, generator=generator, grid=grid, **generate_options
            )
            if tokens.is_floating_point():  # ±inf stays visible: the codec would clamp it to valid pixels
                tokens = tokens.masked_fill(~torch.isfinite(tokens), float("nan"))
            return self.codec.tokens_to_images(tokens, grid)
        finally:
            self.generator.train(was_training)

    # ---------------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FORMAT_KEY] = CHECKPOINT_FORMAT
        embedded = self.codec.embedded_options()
        if embedded is not None:
            checkpoint[CODEC_KEY] = embedded

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse, in one line, a checkpoint of another format, architecture or tokenizer (resuming)."""
        where = (self._trainer and self.trainer.ckpt_path) or "the checkpoint"
        check_format(checkpoint, str(where))
        if "state_dict" in checkpoint:  # sharded checkpoints load their weights shard by shard
            check_weights_fit(checkpoint["state_dict"], self.state_dict(), where, strict=self.strict_loading)
        if checkpoint.get(CODEC_KEY):
            theirs = create_codec(self.hparams.codec, **checkpoint[CODEC_KEY]).describe()["codebook_sha256"]
            if theirs != self.codec.describe()["codebook_sha256"]:
                raise ValueError(
                    f"{where} was trained with another {self.hparams.codec} codebook than "
                    f"{self.hparams.codec_options}; resume with the tokenizer file it was trained with"
                )


def check_format(checkpoint: Mapping[str, Any], path: str = "the checkpoint") -> None:
    """Refuse checkpoints of another layout with a message naming both versions."""
    version = checkpoint.get(FORMAT_KEY, 1 if "lina_module" in checkpoint else None)
    if version is None:
        raise ValueError(f"{path} was not written by lina_pl (no {FORMAT_KEY!r} entry)")
    if version != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} has lina_pl checkpoint format {version} (written by lina_pl 0.1, LinaC2I/RasterC2I); "
            f"this lina_pl reads format {CHECKPOINT_FORMAT} (GeneratorModule) — retrain it with this version"
        )


def check_weights_fit(
    saved: Mapping[str, Any], own: Mapping[str, Tensor], where: str = "the checkpoint", strict: bool = True
) -> None:
    """Refuse weights of another architecture in one line (torch's strict load lists every tensor)."""
    reshaped = sorted(k for k in own.keys() & saved.keys() if tuple(own[k].shape) != tuple(saved[k].shape))
    missing = sorted(own.keys() - saved.keys()) if strict else []
    unexpected = sorted(saved.keys() - own.keys()) if strict else []
    if not (reshaped or missing or unexpected):
        return
    example = (
        f"{reshaped[0]} is {list(saved[reshaped[0]].shape)} there, {list(own[reshaped[0]].shape)} here"
        if reshaped
        else f"e.g. {(missing or unexpected)[0]}"
    )
    raise ValueError(
        f"{where} does not fit the configured model ({len(reshaped)} tensors of another shape, "
        f"{len(missing)} missing, {len(unexpected)} unexpected; {example}): the config changes the "
        "architecture; resume with the config it was trained with, or start from its weights with "
        "--model.init_from"
    )
