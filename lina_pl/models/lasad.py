"""Raster (next-token) autoregressive generator: LlamaGen's GPT with a pluggable token mixer.

``mixer="lasad"`` is LASADGen (HGRN2 mixer with spatial-aware decay, ``reference/lasad.md`` §2);
``softmax`` is LlamaGen (2-D RoPE, KV cache); ``gla``, ``tnl``, ``linear_rope`` and ``hybrid`` are the
paper's baselines. Sequence: ``[class token, x_1 … x_{N−1}]`` predicts ``x_1 … x_N`` over a discrete
codebook. Decoding runs one token at a time with each layer's recurrent state (or KV cache), at absolute
positions, so the spatial mask and RoPE match training exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lina_pl.nn import functional as LF
from lina_pl.nn.attention import (
    GlaAttention,
    LasadAttention,
    LinearRopeAttention,
    SoftmaxAttention,
    TnlAttention,
)
from lina_pl.nn.blocks import PreNormBlock
from lina_pl.sampling import drop_labels, sample_logits

RASTER_MIXERS = ("lasad", "gla", "tnl", "linear_rope", "softmax", "hybrid")


@dataclass
class RasterConfig:
    """Every option that changes the math; presets live in :mod:`lina_pl.models.registry`."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    vocab_size: int = 16384
    grid: tuple[int, int] = (16, 16)
    num_classes: int = 1000
    mixer: str = "lasad"  # lasad | gla | tnl | linear_rope | softmax | hybrid
    hybrid_linear: str = (
        "linear_rope"  # the linear mixer of "hybrid" (Table 2: within the LinearAttn framework)
    )
    hybrid_softmax_layers: list[int] | None = None  # softmax layers of "hybrid"; default: [depth // 2]
    sad_mode: str = "keep"  # LASAD: keep (λ = 1, Eq. 12) | reset (λ = 0) | off
    sad_position: str = "row_last"  # row_last | row_second_last | row_first
    expand_ratio: int = 64  # LASAD key dim per head (Table 1's head counts)
    lower_bounds: bool = True  # HGRN2 per-layer forget-gate lower bounds
    gla_sad: bool = False  # GLA + SAD (Table 4)
    tnl_decay: str = "lightning"  # lightning | alibi
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    norm_eps: float = 1e-5
    prefix_rope: str = "zero"  # softmax layers: LlamaGen's zero rows for the class token, or "identity"
    backend: str = "auto"  # gated linear attention kernels: auto | torch | fla
    softmax_layers: list[int] = field(init=False, default_factory=list)

    def __post_init__(self):
        self.grid = tuple(self.grid)
        if self.sad_mode is False:  # YAML 1.1 reads a bare `off` as false
            self.sad_mode = "off"
        if self.mixer not in RASTER_MIXERS:
            raise ValueError(f"mixer must be one of {RASTER_MIXERS}, got {self.mixer!r}")
        if self.mixer == "softmax":
            self.softmax_layers = list(range(self.depth))
        elif self.mixer == "hybrid":
            self.softmax_layers = list(self.hybrid_softmax_layers or [self.depth // 2])
        bad = [i for i in self.softmax_layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"softmax layers {bad} outside 0..{self.depth - 1}")

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def layer_mixer(self, i: int) -> str:
        if i in self.softmax_layers:
            return "softmax"
        return self.hybrid_linear if self.mixer == "hybrid" else self.mixer


def create_raster_mixer(cfg: RasterConfig, layer_idx: int) -> nn.Module:
    """The causal token mixer of layer ``layer_idx`` (``hybrid`` mixes softmax and linear layers)."""
    kind, d = cfg.layer_mixer(layer_idx), cfg.dim
    if kind == "softmax":
        return SoftmaxAttention(
            d, cfg.heads, causal=True, qkv_bias=False, proj_bias=False, rope="2d", prefix_rope=cfg.prefix_rope
        )
    if kind == "lasad":
        return LasadAttention(
            d,
            expand_ratio=cfg.expand_ratio,
            sad_mode=cfg.sad_mode,
            sad_position=cfg.sad_position,
            norm_eps=cfg.norm_eps,
            backend=cfg.backend,
        )
    if kind == "gla":
        sad_mode = cfg.sad_mode if cfg.gla_sad else "off"
        return GlaAttention(
            d, cfg.heads, sad_mode=sad_mode, sad_position=cfg.sad_position, backend=cfg.backend
        )
    if kind == "tnl":
        return TnlAttention(
            d, cfg.heads, layer_idx=layer_idx, num_layers=cfg.depth, decay=cfg.tnl_decay, backend=cfg.backend
        )
    return LinearRopeAttention(d, cfg.heads)


class RasterGenerator(nn.Module):
    """Class-conditional raster AR model; ``forward`` gives next-token logits, ``generate`` samples codes."""

    def __init__(self, config: RasterConfig):
        super().__init__()
        cfg = self.config = config
        d = cfg.dim
        self.cls_embedding = nn.Embedding(cfg.num_classes + 1, d)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, d)
        self.token_dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(
            PreNormBlock(
                d,
                create_raster_mixer(cfg, i),
                ffn_dropout=cfg.ffn_dropout,
                resid_dropout=cfg.resid_dropout,
                norm_eps=cfg.norm_eps,
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.output = nn.Linear(d, cfg.vocab_size, bias=False)
        lasad_layers = [layer.attn for layer in self.layers if isinstance(layer.attn, LasadAttention)]
        if lasad_layers and cfg.lower_bounds:
            self.lower_bounds = nn.Parameter(torch.zeros(cfg.depth, lasad_layers[0].key_dim))
        else:
            self.register_parameter("lower_bounds", None)
        self.initialize_weights()

    #: HGRN2's lower bounds are pulled toward uniform by weight decay; keep them out (lasad.md §2.5)
    no_weight_decay_params = ("lower_bounds",)

    def initialize_weights(self) -> None:
        """LlamaGen: every Linear and Embedding N(0, 0.02), zero output head."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.output.weight)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def _lower_bounds(self) -> list[Tensor | None]:
        if self.lower_bounds is None:
            return [None] * self.config.depth
        bounds = LF.hgrn2_lower_bounds(self.lower_bounds)
        return [None if i == 0 else bounds[i] for i in range(self.config.depth)]  # β₀ = 0: no bound

    def step(
        self,
        x: Tensor,
        states: list | None,
        position: int,
        keep_state: bool = True,
        bounds: list | None = None,
    ) -> tuple[Tensor, list]:
        """Run embedded inputs ``x [B, T, D]`` at absolute positions ``position…``; returns logits, states.

        ``bounds``: precomputed HGRN2 lower bounds (decoding reuses them for every token)."""
        states = states or [None] * self.config.depth
        bounds = self._lower_bounds() if bounds is None else bounds
        new_states = []
        layout = {"n_cond": 1, "grid_hw": self.config.grid}
        for layer, state, bound in zip(self.layers, states, bounds, strict=True):
            extra = {} if bound is None else {"lower_bound": bound}
            if keep_state:  # decoding: recurrent state or KV cache, at absolute positions
                x, state = layer.step(x, state, position, **layout, **extra)
            else:  # training: the whole sequence from position 0, no cache
                x = layer(x, **layout, **extra)
            new_states.append(state)
        return self.output(LF.rms_norm(x, self.norm.weight, self.norm.eps)).float(), new_states

    def embed(self, labels: Tensor | None, codes: Tensor | None) -> Tensor:
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels)[:, None])
        if codes is not None:
            parts.append(self.tok_embeddings(codes))
        return torch.cat(parts, dim=1)

    def drop_labels(self, labels: Tensor) -> Tensor:
        return drop_labels(labels, self.config.class_dropout, self.null_class)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, N, vocab]`` for codes ``[B, N]`` (input ``[cls, x_1 … x_{N−1}]``)."""
        n = self.config.num_tokens
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes [B, {n}], got {tuple(codes.shape)}")
        if self.training:
            labels = self.drop_labels(labels)
        x = self.token_dropout(self.embed(labels, codes[:, :-1]))
        return self.step(x, None, 0, keep_state=False)[0]

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        *,
        cfg: float = 1.0,
        cfg_interval: int = -1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        on_token: Callable[[int, list], None] | None = None,
    ) -> Tensor:
        """Sample codes ``[B, N]``: prefill the class token, then one token per step with the recurrent
        state / KV cache. CFG mixes logits ``u + s·(c − u)`` (batch doubled with the null class) until
        ``cfg_interval`` tokens (−1: always); then temperature, top-k, top-p. ``on_token(i, states)`` is
        called after token i is sampled (progress bars, benchmarks)."""
        b, n = labels.shape[0], self.config.num_tokens
        guided = cfg != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        bounds = self._lower_bounds()
        logits, states = self.step(self.embed(rows, None), None, 0, bounds=bounds)
        codes = torch.empty(b, n, dtype=torch.long, device=labels.device)  # one buffer: no per-token tensors
        for i in range(n):
            last = logits[:, -1]
            if guided:
                cond, uncond = last[:b], last[b:]
                last = uncond + cfg * (cond - uncond) if (cfg_interval < 0 or i < cfg_interval) else cond
            code = sample_logits(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            codes[:, i] = code
            if on_token is not None:
                on_token(i, states)
            if i + 1 < n:
                inp = torch.cat([code, code]) if guided else code
                logits, states = self.step(self.embed(None, inp[:, None]), states, i + 1, bounds=bounds)
        return codes
