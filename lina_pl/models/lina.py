"""LINA: NOVA/MAR-style masked autoregressive generator over continuous tokens with linear attention.

Token flow (``reference/lina.md`` §3): a class embedding and ``M`` learned "bov" tokens go through the
condition tower, whose last ``M`` outputs are the condition ``c``; the image encoder sees ``[c ; visible
tokens]``, the visible tokens are scattered back among mask tokens, and the image decoder (LINA decoder
attention: depthwise conv + KV gate) sees ``[c ; all tokens]``. A per-token flow-matching head predicts
the masked tokens. Generation unmasks tokens over a cosine schedule in a random order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lina_pl.nn.attention import LinaAttention, SoftmaxAttention
from lina_pl.nn.blocks import PostNormBlock
from lina_pl.nn.flow_head import FlowHead, euler_sample, flow_matching_loss
from lina_pl.nn.position import rope_2d, sincos_2d
from lina_pl.sampling import cfg_scale, cosine_mask_counts, drop_labels, truncated_normal_mask_ratio

TOWER_MIXERS = ("lina", "inline", "softmax", "hybrid")


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
    num_classes: int = 1000
    label_dropout: float = 0.1  # classes replaced by the null class in training (for CFG)
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
    blocks = []
    for i in range(depth):
        kind = mixer
        if mixer == "hybrid":
            kind = "softmax" if i % cfg.hybrid_every == cfg.hybrid_every - 1 else "lina"
        if kind == "softmax":
            attn = SoftmaxAttention(cfg.dim, cfg.heads)
        else:
            local = {}
            if decoder:
                local = dict(
                    conv_kernel_size=cfg.conv_kernel_size,
                    kv_gate=cfg.kv_gate,
                    n_cond=cfg.num_cond_tokens,
                    grid_hw=cfg.grid,
                )
            normalization = "subtraction" if kind == "inline" else "division"
            attn = LinaAttention(cfg.dim, cfg.heads, normalization=normalization, **local)
        blocks.append(PostNormBlock(cfg.dim, attn, cfg.mlp_ratio))
    return nn.ModuleList(blocks)


class LinaGenerator(nn.Module):
    """Class-conditional LINA; ``forward`` returns the training loss, ``generate`` samples tokens."""

    def __init__(self, config: LinaConfig):
        super().__init__()
        cfg = self.config = config
        d = cfg.dim
        # condition: class table (+ null class) and a non-affine LayerNorm (the original's is frozen)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.class_norm = nn.LayerNorm(d, elementwise_affine=False)
        self.bov_token = nn.Parameter(torch.zeros(1, 1, d))
        rope = cfg.position == "rope"  # RoPE replaces the additive embedding (identity rows for prefixes)
        self.register_buffer("cond_pos", sincos_2d(cfg.cond_grid, d)[None] * (not rope), persistent=False)
        self.cond_blocks = _tower(cfg, cfg.cond_depth, cfg.mixer, decoder=False)
        self.cond_norm = nn.LayerNorm(d)
        # image transformer
        self.token_embed = nn.Linear(cfg.token_channels, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("image_pos", sincos_2d(cfg.grid, d)[None] * (not rope), persistent=False)
        if rope:
            head_dim, m = d // cfg.heads, cfg.num_cond_tokens
            for name, table in (
                ("cond_rope", rope_2d(head_dim, cfg.cond_grid, n_prefix=1)),
                ("image_rope", rope_2d(head_dim, cfg.grid, n_prefix=m)),
            ):
                self.register_buffer(name, torch.stack(table).float(), persistent=False)  # [2, N, hd/2]
        self.encoder_blocks = _tower(cfg, cfg.encoder_depth, cfg.mixer, decoder=False)
        self.decoder_blocks = _tower(cfg, cfg.decoder_depth, cfg.decoder_mixer, decoder=True)
        self.final_norm = nn.LayerNorm(d)
        self.head = FlowHead(cfg.token_channels, d, cfg.head_width or d, cfg.head_depth)
        for p in (self.class_embed.weight, self.bov_token, self.mask_token):
            nn.init.normal_(p, std=0.02)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    # ---------------------------------------------------------------------------------------------
    # transformer
    # ---------------------------------------------------------------------------------------------

    def condition(self, labels: Tensor) -> Tensor:
        """Class labels ``[B]`` (``num_classes`` = null) -> condition tokens ``c`` ``[B, M, D]``."""
        b, m = labels.shape[0], self.config.num_cond_tokens
        cls = self.class_norm(self.class_embed(labels))[:, None]
        h = torch.cat([cls, (self.bov_token + self.cond_pos).expand(b, -1, -1)], dim=1)
        rope = tuple(self.cond_rope) if self.config.position == "rope" else None
        for block in self.cond_blocks:
            h = block(h, n_cond=1, rope=rope)
        return self.cond_norm(h[:, -m:])

    def transformer(self, tokens: Tensor, visible_idx: Tensor, c: Tensor) -> Tensor:
        """Image transformer: tokens ``[B, L, C]``, known at ``visible_idx`` ``[B, V]`` -> ``z [B, L, D]``."""
        b, n_tok = tokens.shape[:2]
        m, d = c.shape[1], self.config.dim
        is_visible = torch.zeros(b, n_tok, dtype=torch.bool, device=tokens.device)
        is_visible.scatter_(1, visible_idx, True)
        full = torch.where(is_visible[..., None], self.token_embed(tokens), self.mask_token) + self.image_pos
        gather_idx = visible_idx[..., None].expand(-1, -1, d)
        visible = torch.gather(full, 1, gather_idx)
        h = torch.cat([c, visible], dim=1)
        enc_rope = dec_rope = None
        if self.config.position == "rope":  # per-sample rows: visible tokens come in a random order
            dec_rope = tuple(self.image_rope)
            rows = torch.cat([torch.arange(m, device=tokens.device).expand(b, -1), m + visible_idx], dim=1)
            enc_rope = tuple(t[rows] for t in self.image_rope)
        for block in self.encoder_blocks:
            h = block(h, n_cond=m, rope=enc_rope)
        c, visible = h[:, :m], h[:, m:]
        full = full.scatter(1, gather_idx, visible)  # masked positions keep mask token + position
        h = torch.cat([c, full], dim=1)
        for block in self.decoder_blocks:
            h = block(h, n_cond=m, grid_hw=self.config.grid, rope=dec_rope)
        return self.final_norm(h)[:, m:]

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def drop_labels(self, labels: Tensor) -> Tensor:
        return drop_labels(labels, self.config.label_dropout, self.null_class)

    def sample_mask(self, batch: int, device) -> tuple[Tensor, Tensor]:
        """Random order per sample; returns ``(visible_idx [B, V], masked [B, L] bool)``.

        With a per-batch ratio every sample keeps the same number ``V`` of visible tokens (the original);
        per-sample ratios keep ``V`` = the smallest count and mask the extra visible ones (so the encoder
        sees a rectangular batch).
        """
        cfg = self.config
        n_tok = cfg.num_tokens
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

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Flow-matching loss averaged over masked tokens (and ``loss_repeat`` noise draws)."""
        cfg = self.config
        if tokens.dim() != 3 or tokens.shape[1:] != (cfg.num_tokens, cfg.token_channels):
            raise ValueError(
                f"expected tokens [B, {cfg.num_tokens}, {cfg.token_channels}], got {tuple(tokens.shape)}"
            )
        if self.training:
            labels = self.drop_labels(labels)
        visible_idx, masked = self.sample_mask(tokens.shape[0], tokens.device)
        z = self.transformer(tokens, visible_idx, self.condition(labels))
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
        labels: Tensor,
        *,
        steps: int = 64,
        flow_steps: int = 25,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample tokens ``[B, L, C]`` for class ``labels``.

        ``steps`` autoregressive steps unmask ``m_k − m_{k+1}`` tokens each (cosine schedule) in one
        random order per sample; each step integrates the flow ODE with ``flow_steps`` Euler steps. CFG
        (``cfg`` ≠ 1) doubles the batch with the null class and mixes the velocities
        ``v_u + w_k (v_c − v_u)``; ``cfg_schedule`` is ``linear`` (``w_k`` ramps 1 → cfg) or ``constant``.
        With ``cfg = 1`` only the conditional branch runs.
        """
        config = self.config
        b, n_tok, dev = labels.shape[0], config.num_tokens, labels.device
        counts = cosine_mask_counts(n_tok, steps)
        guided = cfg != 1.0
        all_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        c = self.condition(all_labels)
        order = torch.rand(b, n_tok, device=dev, generator=generator).argsort(dim=1)
        tokens = torch.zeros(b, n_tok, config.token_channels, device=dev, dtype=c.dtype)
        for k in range(steps):
            known, after = n_tok - counts[k], n_tok - counts[k + 1]
            if after == known:
                continue
            visible_idx = order[:, :known]
            rows = torch.cat([tokens, tokens]) if guided else tokens
            z = self.transformer(rows, torch.cat([visible_idx] * (2 if guided else 1)), c)
            new_idx = order[:, known:after]
            z_new = torch.gather(
                z, 1, torch.cat([new_idx] * (2 if guided else 1))[..., None].expand(-1, -1, z.shape[-1])
            )
            w = cfg_scale(cfg, k, steps, cfg_schedule)
            x = self._sample_tokens(z_new.flatten(0, 1), b * new_idx.shape[1], w, flow_steps, generator)
            tokens = tokens.scatter(
                1, new_idx[..., None].expand(-1, -1, tokens.shape[-1]), x.view(b, -1, x.shape[-1])
            )
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


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
