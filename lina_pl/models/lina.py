"""LINA: NOVA/MAR-style masked autoregressive generator over continuous tokens with linear attention.

Token flow (``reference/lina.md`` §3): the condition module's prefix tokens (one class token, or the padded
prompt's text tokens) and ``M`` learned "bov" tokens go through the condition tower, whose last ``M``
outputs are the condition ``c``; the image encoder sees ``[c ; visible
tokens]``, the visible tokens are scattered back among mask tokens, and the image decoder (LINA decoder
attention: depthwise conv + KV gate) sees ``[c ; all tokens]``. A per-token flow-matching head predicts
the masked tokens. Generation unmasks tokens over a cosine schedule in a random order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lina_pl.conditions import Condition
from lina_pl.models.generator import Generator, SamplingOptions
from lina_pl.nn.attention import create_mixer, mixer_names
from lina_pl.nn.blocks import PostNormBlock
from lina_pl.nn.flow_head import FlowHead, euler_sample, flow_matching_loss
from lina_pl.nn.position import rope_2d, sincos_2d
from lina_pl.sampling import CFG_SCHEDULES, cfg_scale, cosine_mask_counts, truncated_normal_mask_ratio

#: bidirectional mixers of the registry, plus "hybrid" (every ``hybrid_every``-th block softmax)
TOWER_MIXERS = (*mixer_names(bidirectional=True), "hybrid")


@dataclass(frozen=True)
class Layout:
    """Position tables of one image grid: additive sin-cos (zeros under RoPE) and RoPE tables (or None)."""

    grid: tuple[int, int]
    cond_grid: tuple[int, int]
    cond_pos: Tensor  # [1, M, D]
    image_pos: Tensor  # [1, L, D]
    cond_rope: Tensor | None  # [2, P + M, hd/2]
    image_rope: Tensor | None  # [2, M + L, hd/2]


@dataclass(frozen=True)
class LinaSampling(SamplingOptions):
    """LINA's sampling knobs: AR (unmasking) steps, Euler steps per AR step, guidance and its schedule.

    ``cfg_schedule``: ``linear`` ramps the guidance 1 → cfg over the AR steps (the C2I FID recipe),
    ``constant`` keeps cfg at every step (the T2I GenEval recipe).
    """

    steps: int = 64
    flow_steps: int = 25
    cfg_schedule: str = "linear"

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1 or self.flow_steps < 1:
            raise ValueError(f"steps and flow_steps must be ≥ 1, got {self.steps} and {self.flow_steps}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")


@dataclass
class LinaConfig:
    """Every option that changes the math; presets live in :mod:`lina_pl.models.registry`."""

    dim: int = 768
    heads: int = 12
    cond_depth: int = 16  # condition tower ("video encoder") blocks
    encoder_depth: int = 16  # image blocks over [c ; visible tokens]
    decoder_depth: int = 16  # image blocks over [c ; all tokens]
    mlp_ratio: float = 4.0
    token_channels: int = 16  # channels per token (latent channels × patch²)
    grid: tuple[int, int] = (16, 16)  # image-token grid
    cond_grid: tuple[int, int] | None = None  # grid of condition tokens; default half the image grid
    mixer: str = "lina"  # condition tower and image encoder: lina | inline | softmax | hybrid
    decoder_mixer: str = "lina"  # image decoder: lina | inline | softmax | hybrid
    hybrid_every: int = 8  # "hybrid": block i is softmax when i % hybrid_every == hybrid_every − 1
    conv_kernel_size: int = 5  # depthwise conv in linear decoder blocks (0 = off)
    kv_gate: str | None = "absolute"  # KV gate in linear decoder blocks: absolute | grid | None
    position: str = "sincos"  # "sincos": additive 2-D APE (final LINA); "rope": 2-D RoPE on q, k instead
    head_width: int | None = None  # flow head width (default: dim)
    head_depth: int = 6
    mask_ratio_min: float = 0.7
    mask_ratio_max: float = 1.0
    mask_ratio_std: float = 0.25  # truncated normal centred on mask_ratio_max
    mask_per_sample: bool = False  # one ratio per batch (original) or per sample
    loss_repeat: int = 4  # noise draws per masked token (MAR's diffusion batch multiplier)
    flow_shift: float = 1.0

    def __post_init__(self):
        self.grid = tuple(self.grid)
        self.cond_grid = (
            tuple(self.cond_grid)
            if self.cond_grid
            else (max(1, self.grid[0] // 2), max(1, self.grid[1] // 2))
        )
        for name in ("mixer", "decoder_mixer"):
            if getattr(self, name) not in TOWER_MIXERS:
                raise ValueError(f"{name} must be one of {TOWER_MIXERS}, got {getattr(self, name)!r}")
        if not 0.0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1.0:
            raise ValueError("need 0 ≤ mask_ratio_min ≤ mask_ratio_max ≤ 1")
        if self.dim % 4:
            raise ValueError("dim must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.position not in ("sincos", "rope"):
            raise ValueError(f"position must be 'sincos' or 'rope', got {self.position!r}")
        if self.position == "rope" and (self.dim // self.heads) % 4:
            raise ValueError("2-D RoPE needs a head dim divisible by 4")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_cond_tokens(self) -> int:
        return self.cond_grid[0] * self.cond_grid[1]


def _tower(cfg: LinaConfig, depth: int, mixer: str, *, decoder: bool) -> nn.ModuleList:
    """``depth`` post-norm blocks; decoder blocks of a linear mixer add the depthwise conv and KV gate."""
    blocks = []
    for i in range(depth):
        kind = mixer
        if mixer == "hybrid":
            kind = "softmax" if i % cfg.hybrid_every == cfg.hybrid_every - 1 else "lina"
        options: dict[str, Any] = {}
        if decoder and kind != "softmax":
            options = dict(
                conv_kernel_size=cfg.conv_kernel_size,
                kv_gate=cfg.kv_gate,
                n_cond=cfg.num_cond_tokens,
                grid_hw=cfg.grid,
            )
        blocks.append(
            PostNormBlock(cfg.dim, create_mixer(kind, cfg.dim, cfg.heads, **options), cfg.mlp_ratio)
        )
    return nn.ModuleList(blocks)


class LinaGenerator(Generator):
    """LINA for any condition (class labels, text); ``loss`` is the flow-matching objective on masked
    tokens, ``generate`` samples tokens with :class:`LinaSampling`."""

    Sampling = LinaSampling
    token_kind = "continuous"
    family = "lina"

    def __init__(self, config: LinaConfig, condition: Condition):
        super().__init__(config, condition)
        cfg = config
        d = cfg.dim
        self.bov_token = nn.Parameter(torch.zeros(1, 1, d))
        self.cond_blocks = _tower(cfg, cfg.cond_depth, cfg.mixer, decoder=False)
        self.cond_norm = nn.LayerNorm(d)
        # image transformer
        self.token_embed = nn.Linear(cfg.token_channels, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.encoder_blocks = _tower(cfg, cfg.encoder_depth, cfg.mixer, decoder=False)
        self.decoder_blocks = _tower(cfg, cfg.decoder_depth, cfg.decoder_mixer, decoder=True)
        self.final_norm = nn.LayerNorm(d)
        self.head = FlowHead(cfg.token_channels, d, cfg.head_width or d, cfg.head_depth)
        for p in (self.bov_token, self.mask_token):
            nn.init.normal_(p, std=0.02)
        self._layouts: dict[tuple, Layout] = {}

    def blocks(self) -> list[nn.Module]:
        return [*self.cond_blocks, *self.encoder_blocks, *self.decoder_blocks, self.head]

    # ---------------------------------------------------------------------------------------------
    # sequence layout: any image grid, the condition grid follows it
    # ---------------------------------------------------------------------------------------------

    def cond_grid_for(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The condition tower's grid for an image grid: the config's pair, scaled with the image grid
        (half of it by default, as in the original at 256 / 512 / 1024 px)."""
        cfg = self.config
        return tuple(max(1, g * c // full) for g, c, full in zip(grid, cfg.cond_grid, cfg.grid, strict=True))

    def layout(self, grid: tuple[int, int], device: torch.device) -> Layout:
        """Position tables of an image grid (cached per grid and device; never in the state dict).

        ``sincos``: additive 2-D sin-cos on integer positions (larger grids extend, never interpolate,
        as in the original curriculum); ``rope``: 2-D RoPE tables with identity rows for prefixes.
        """
        grid = tuple(int(g) for g in grid)
        key = (grid, str(device))
        if key not in self._layouts:
            cfg, d = self.config, self.config.dim
            cond_grid = self.cond_grid_for(grid)
            m = cond_grid[0] * cond_grid[1]
            if cfg.position == "rope":  # RoPE replaces the additive embedding
                head_dim = d // cfg.heads
                cond_rope = torch.stack(rope_2d(head_dim, cond_grid, n_prefix=self.condition.num_tokens))
                image_rope = torch.stack(rope_2d(head_dim, grid, n_prefix=m))
                cond_pos, image_pos = torch.zeros(1, m, d), torch.zeros(1, grid[0] * grid[1], d)
                tables = (cond_pos, image_pos, cond_rope.float(), image_rope.float())
            else:
                tables = (sincos_2d(cond_grid, d)[None], sincos_2d(grid, d)[None], None, None)
            tables = tuple(None if t is None else t.to(device) for t in tables)
            self._layouts[key] = Layout(grid, cond_grid, *tables)
        return self._layouts[key]

    # ---------------------------------------------------------------------------------------------
    # transformer
    # ---------------------------------------------------------------------------------------------

    def condition_tower(self, prefix: Tensor, layout: Layout) -> Tensor:
        """Condition prefix tokens ``[B, P, D]`` -> the image transformer's condition ``c`` ``[B, M, D]``."""
        b, p = prefix.shape[:2]
        m = layout.cond_pos.shape[1]
        bov = (self.bov_token + layout.cond_pos.to(self.bov_token.dtype)).expand(b, -1, -1)
        h = torch.cat([prefix, bov.to(prefix.dtype)], dim=1)
        rope = None if layout.cond_rope is None else tuple(layout.cond_rope)
        for block in self.cond_blocks:
            h = self.run_block(block, h, n_cond=p, rope=rope)
        return self.cond_norm(h[:, -m:])

    def transformer(self, tokens: Tensor, visible_idx: Tensor, c: Tensor, layout: Layout) -> Tensor:
        """Image transformer: tokens ``[B, L, C]``, known at ``visible_idx`` ``[B, V]`` -> ``z [B, L, D]``."""
        b, n_tok = tokens.shape[:2]
        m, d = c.shape[1], self.config.dim
        is_visible = torch.zeros(b, n_tok, dtype=torch.bool, device=tokens.device)
        is_visible.scatter_(1, visible_idx, True)
        embedded = self.token_embed(tokens)
        full = torch.where(is_visible[..., None], embedded, self.mask_token.to(embedded.dtype))
        full = full + layout.image_pos.to(full.dtype)
        gather_idx = visible_idx[..., None].expand(-1, -1, d)
        visible = torch.gather(full, 1, gather_idx)
        h = torch.cat([c.to(full.dtype), visible], dim=1)
        enc_rope = dec_rope = None
        if layout.image_rope is not None:  # per-sample rows: visible tokens come in a random order
            dec_rope = tuple(layout.image_rope)
            rows = torch.cat([torch.arange(m, device=tokens.device).expand(b, -1), m + visible_idx], dim=1)
            enc_rope = tuple(t[rows] for t in layout.image_rope)
        for block in self.encoder_blocks:
            h = self.run_block(block, h, n_cond=m, rope=enc_rope)
        c, visible = h[:, :m], h[:, m:]
        full = full.scatter(1, gather_idx, visible.to(full.dtype))  # masked positions keep mask + position
        h = torch.cat([c, full], dim=1)
        for block in self.decoder_blocks:
            h = self.run_block(block, h, n_cond=m, grid_hw=layout.grid, rope=dec_rope)
        return self.final_norm(h)[:, m:]

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def sample_mask(self, batch: int, n_tok: int, device) -> tuple[Tensor, Tensor]:
        """Random order per sample; returns ``(visible_idx [B, V], masked [B, L] bool)``.

        With a per-batch ratio every sample keeps the same number ``V`` of visible tokens (the original);
        per-sample ratios keep ``V`` = the smallest count and mask the extra visible ones (so the encoder
        sees a rectangular batch).
        """
        cfg = self.config
        shape = (batch,) if cfg.mask_per_sample else (1,)
        ratio = truncated_normal_mask_ratio(
            shape, cfg.mask_ratio_min, cfg.mask_ratio_max, cfg.mask_ratio_std, device
        )
        n_masked = torch.round(ratio * n_tok).long().clamp(1, n_tok).expand(batch)
        order = torch.rand(batch, n_tok, device=device).argsort(dim=1)
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(n_tok, device=device).expand(batch, -1)
        )
        masked = rank >= (n_tok - n_masked)[:, None]
        n_visible = int(n_tok - n_masked.max())
        return order[:, :n_visible], masked

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Flow-matching loss averaged over masked tokens (and ``loss_repeat`` noise draws); ``batch`` holds
        ``tokens [B, L, C]`` on the grid ``batch["grid"]`` (default: the config's) and the condition's
        fields (dropped to the null condition in training)."""
        cfg = self.config
        tokens, grid = batch["tokens"], tuple(batch.get("grid", cfg.grid))
        n_tok = grid[0] * grid[1]
        if tokens.dim() != 3 or tokens.shape[1:] != (n_tok, cfg.token_channels):
            raise ValueError(
                f"expected tokens [B, {n_tok} = {grid[0]}×{grid[1]}, {cfg.token_channels}], "
                f"got {tuple(tokens.shape)}"
            )
        # fp32 data into bf16 weights (DeepSpeed's bf16, ``.to(bfloat16)``): compute in the weights' dtype
        tokens = tokens.to(self.mask_token.dtype)
        layout = self.layout(grid, tokens.device)
        c = self.condition_tower(self.condition(batch), layout)
        visible_idx, masked = self.sample_mask(tokens.shape[0], n_tok, tokens.device)
        z = self.transformer(tokens, visible_idx, c, layout)
        target, cond = tokens[masked], z[masked]  # [M, C], [M, D]
        r = cfg.loss_repeat
        per_token = flow_matching_loss(
            self.head, target.repeat(r, 1), cond.repeat(r, 1), shift=cfg.flow_shift
        )
        return per_token.mean()

    # ---------------------------------------------------------------------------------------------
    # generation
    # ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        condition: Mapping[str, Any],
        options: LinaSampling | None = None,
        *,
        generator: torch.Generator | None = None,
        grid: tuple[int, int] | None = None,
        on_step: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Sample tokens ``[B, L, C]`` on ``grid`` (default: the config's) for a batch of condition fields.

        ``options.steps`` autoregressive steps unmask ``m_k − m_{k+1}`` tokens each (cosine schedule) in
        one random order per sample; each step integrates the flow ODE with ``flow_steps`` Euler steps.
        CFG (``cfg`` ≠ 1) doubles the batch with the null condition and mixes the velocities
        ``v_u + w_k (v_c − v_u)`` with ``w_k`` from ``cfg_schedule``. With ``cfg = 1`` only the
        conditional branch runs. ``on_step(k, revealed)`` is called after AR step k with the indices
        ``[B, n_k]`` (raster order on ``grid``) of the tokens it revealed, so the generation order can be
        shown (steps that reveal nothing are skipped).
        """
        opts = self.sampling_options(options)
        config = self.config
        guided = opts.cfg != 1.0
        prefix, b = self.conditions_with_null(condition, guided)
        layout = self.layout(grid or config.grid, prefix.device)
        c = self.condition_tower(prefix, layout)
        n_tok, dev = layout.grid[0] * layout.grid[1], c.device
        counts = cosine_mask_counts(n_tok, opts.steps)
        order = torch.rand(b, n_tok, device=dev, generator=generator).argsort(dim=1)
        tokens = torch.zeros(b, n_tok, config.token_channels, device=dev, dtype=c.dtype)
        branches = 2 if guided else 1
        for k in range(opts.steps):
            known, after = n_tok - counts[k], n_tok - counts[k + 1]
            if after == known:
                continue
            visible_idx = order[:, :known]
            z = self.transformer(tokens.repeat(branches, 1, 1), visible_idx.repeat(branches, 1), c, layout)
            new_idx = order[:, known:after]
            z_new = torch.gather(z, 1, new_idx.repeat(branches, 1)[..., None].expand(-1, -1, z.shape[-1]))
            w = cfg_scale(opts.cfg, k, opts.steps, opts.cfg_schedule)
            x = self._sample_tokens(z_new.flatten(0, 1), b * new_idx.shape[1], w, opts.flow_steps, generator)
            tokens = tokens.scatter(
                1, new_idx[..., None].expand(-1, -1, tokens.shape[-1]), x.view(b, -1, x.shape[-1])
            )
            if on_step is not None:
                on_step(k, new_idx)
        return tokens

    def _sample_tokens(self, z: Tensor, n: int, w: float, flow_steps: int, generator) -> Tensor:
        """Euler-sample ``n`` tokens from ``z``: ``[n, D]``, or ``[2n, D]`` (cond ; uncond) under CFG."""
        noise = torch.randn(n, self.config.token_channels, device=z.device, generator=generator).to(z.dtype)
        guided = z.shape[0] == 2 * n

        def velocity(x: Tensor, sigma: Tensor) -> Tensor:
            if not guided:
                return self.head(x, sigma, z)
            v = self.head(torch.cat([x, x]), torch.cat([sigma, sigma]), z)
            v_cond, v_uncond = v[:n], v[n:]
            return v_uncond + w * (v_cond - v_uncond)

        return euler_sample(velocity, noise, flow_steps, shift=self.config.flow_shift)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items() if k in ("dim", "heads", "grid"))
