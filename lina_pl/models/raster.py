"""Raster (next-token) autoregressive generator: LlamaGen's GPT with a pluggable token mixer.

``mixer="lasad"`` is LASADGen (HGRN2 mixer with spatial-aware decay, ``reference/lasad.md`` §2);
``softmax`` is LlamaGen (2-D RoPE, KV cache); ``gla``, ``tnl``, ``linear_rope`` and ``hybrid`` are the
paper's baselines. Sequence: ``[condition prefix (one class token), x_1 … x_{N−1}]`` predicts
``x_1 … x_N`` over a discrete codebook. Decoding runs one token at a time with each layer's recurrent
state (or KV cache), at absolute positions, so the spatial mask and RoPE match training exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lina_pl.conditions import Condition
from lina_pl.models.generator import Generator, SamplingOptions
from lina_pl.nn import functional as LF
from lina_pl.nn.attention import LasadAttention, create_mixer, mixer_names
from lina_pl.nn.blocks import PreNormBlock
from lina_pl.sampling import sample_logits

#: causal mixers of the registry, plus "hybrid" (softmax at ``hybrid_softmax_layers``, else ``hybrid_linear``)
RASTER_MIXERS = (*mixer_names(causal=True), "hybrid")


@dataclass(frozen=True)
class RasterSampling(SamplingOptions):
    """Raster sampling knobs: CFG on logits (until ``cfg_interval`` tokens; −1 = always), then
    temperature, top-k (0 = all codes) and top-p (1 = off)."""

    cfg_interval: int = -1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k ≥ 0 and 0 < top_p ≤ 1, got {self.top_k} and {self.top_p}")


@dataclass
class RasterConfig:
    """Every option that changes the math; presets live in :mod:`lina_pl.models.registry`."""

    dim: int = 768
    depth: int = 12
    heads: int = 12
    vocab_size: int = 16384
    grid: tuple[int, int] = (16, 16)
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
    kind = cfg.layer_mixer(layer_idx)
    options: dict[str, Any] = {
        "softmax": dict(causal=True, qkv_bias=False, proj_bias=False, rope="2d", prefix_rope=cfg.prefix_rope),
        "lasad": dict(
            expand_ratio=cfg.expand_ratio,
            sad_mode=cfg.sad_mode,
            sad_position=cfg.sad_position,
            norm_eps=cfg.norm_eps,
            backend=cfg.backend,
        ),
        "gla": dict(
            sad_mode=cfg.sad_mode if cfg.gla_sad else "off",
            sad_position=cfg.sad_position,
            backend=cfg.backend,
        ),
        "tnl": dict(layer_idx=layer_idx, num_layers=cfg.depth, decay=cfg.tnl_decay, backend=cfg.backend),
        "linear_rope": {},
    }[kind]
    return create_mixer(kind, cfg.dim, cfg.heads, **options)


class RasterGenerator(Generator):
    """Raster AR model for any condition; ``loss`` is next-code cross-entropy, ``generate`` samples codes
    with :class:`RasterSampling` through each layer's recurrent state or KV cache."""

    Sampling = RasterSampling
    token_kind = "discrete"
    family = "raster"

    def __init__(self, config: RasterConfig, condition: Condition):
        super().__init__(config, condition)
        cfg = config
        d = cfg.dim
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

    def blocks(self) -> list[nn.Module]:
        return list(self.layers)

    #: HGRN2's lower bounds are pulled toward uniform by weight decay; keep them out (lasad.md §2.5)
    no_weight_decay_params = ("lower_bounds",)

    def initialize_weights(self) -> None:
        """LlamaGen: every Linear and Embedding N(0, 0.02) (the condition's class table too), zero head."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.output.weight)

    def _lower_bounds(self) -> list[Tensor | None]:
        """Each layer's HGRN2 forget-gate bound: β₀ = 0 (none) and None for layers that are not LASAD."""
        if self.lower_bounds is None:
            return [None] * self.config.depth
        bounds = LF.hgrn2_lower_bounds(self.lower_bounds)
        return [
            bounds[i] if i > 0 and isinstance(layer.attn, LasadAttention) else None
            for i, layer in enumerate(self.layers)
        ]

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
        layout = {"n_cond": self.condition.num_tokens, "grid_hw": self.config.grid}
        for layer, state, bound in zip(self.layers, states, bounds, strict=True):
            extra = {} if bound is None else {"lower_bound": bound}
            if keep_state:  # decoding: recurrent state or KV cache, at absolute positions
                x, state = layer.step(x, state, position, **layout, **extra)
            else:  # training: the whole sequence from position 0, no cache
                x = self.run_block(layer, x, **layout, **extra)
            new_states.append(state)
        return self.output(LF.rms_norm(x, self.norm.weight, self.norm.eps)).float(), new_states

    def logits(self, codes: Tensor, condition: Mapping[str, Any]) -> Tensor:
        """Teacher-forced logits ``[B, N, vocab]`` for codes ``[B, N]`` (input ``[prefix, x_1 … x_{N−1}]``);
        in training the condition drops to the null condition at its dropout rate."""
        n = self.config.num_tokens
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"expected codes [B, {n}], got {tuple(codes.shape)}")
        prefix = self.condition(condition)
        x = self.token_dropout(torch.cat([prefix, self.tok_embeddings(codes[:, :-1])], dim=1))
        return self.step(x, None, 0, keep_state=False)[0]

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Cross-entropy of every next code; ``batch["tokens"]`` holds the codes ``[B, N]``."""
        codes = batch["tokens"]
        logits = self.logits(codes, batch)
        return F.cross_entropy(logits.flatten(0, 1), codes.flatten())

    @torch.no_grad()
    def generate(
        self,
        condition: Mapping[str, Any],
        options: RasterSampling | None = None,
        *,
        generator: torch.Generator | None = None,
        grid: tuple[int, int] | None = None,
        on_token: Callable[[int, list], None] | None = None,
    ) -> Tensor:
        """Sample codes ``[B, N]``: prefill the condition prefix, then one token per step with the recurrent
        state / KV cache. CFG mixes logits ``u + s·(c − u)`` (batch doubled with the null condition) until
        ``cfg_interval`` tokens (−1: always); then temperature, top-k, top-p. ``on_token(i, states)`` is
        called after token i is sampled (progress bars, benchmarks). ``grid`` must be the config's: a raster
        model's positions (RoPE, spatial decay) are tied to the grid it was trained on."""
        if grid is not None and tuple(grid) != tuple(self.config.grid):
            raise ValueError(f"a raster model generates on its {self.config.grid} grid, not {tuple(grid)}")
        opts = self.sampling_options(options)
        n = self.config.num_tokens
        guided = opts.cfg != 1.0
        prefix, b = self.conditions_with_null(condition, guided)
        bounds = self._lower_bounds()
        logits, states = self.step(prefix, None, 0, bounds=bounds)
        p = prefix.shape[1]
        codes = torch.empty(b, n, dtype=torch.long, device=prefix.device)  # one buffer: no per-token tensors
        for i in range(n):
            last = logits[:, -1]
            if guided:
                cond, uncond = last[:b], last[b:]
                use_cfg = opts.cfg_interval < 0 or i < opts.cfg_interval
                last = uncond + opts.cfg * (cond - uncond) if use_cfg else cond
            code = sample_logits(
                last, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, generator=generator
            )
            codes[:, i] = code
            if on_token is not None:
                on_token(i, states)
            if i + 1 < n:
                inp = torch.cat([code, code]) if guided else code
                logits, states = self.step(self.tok_embeddings(inp[:, None]), states, p + i, bounds=bounds)
        return codes
