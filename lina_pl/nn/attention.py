"""Token mixers as modules: LINA (division / InLine subtraction), softmax, and the causal linear mixers.

Every mixer maps ``x [B, N, D] -> [B, N, D]`` and takes the sequence layout as keywords: ``n_cond`` prefix
(condition / class) tokens followed by an ``H×W`` image-token grid in raster order (``grid_hw``).

Causal mixers (LASAD, GLA, TNL, linear+RoPE, causal softmax) also expose
``step(x, state, position, ...) -> (y, state)``: ``x`` holds the tokens at absolute positions
``position, position+1, …``, ``state`` is what the previous call returned (``None`` at the start), so a
prefill followed by one-token steps equals one full forward. Positions are absolute, hence the LASAD
spatial mask and RoPE are the same in training and decoding.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lina_pl.nn import functional as LF
from lina_pl.nn.locality import DepthwiseConvGrid, KVGate, check_layout
from lina_pl.nn.position import apply_rope, rope_2d


@functools.lru_cache(maxsize=64)
def _rope_table(head_dim: int, grid_hw: tuple[int, int], n_cond: int, prefix: str, base: float):
    """Cached 2-D RoPE tables (decoding asks for the same table at every step)."""
    return rope_2d(head_dim, tuple(grid_hw), n_prefix=n_cond, prefix=prefix, base=base)


def _rope_rows(table, start: int, length: int) -> tuple[Tensor, Tensor]:
    cos, sin = table
    if start + length > cos.shape[0]:
        raise ValueError(
            f"positions {start}..{start + length - 1} lie beyond the {cos.shape[0]}-token layout"
        )
    return cos[start : start + length], sin[start : start + length]


RopeTables = tuple[Tensor, Tensor] | None


def _split_heads(x: Tensor, heads: int) -> Tensor:
    return x.reshape(*x.shape[:2], heads, -1)


def _merge_heads(x: Tensor) -> Tensor:
    return x.reshape(*x.shape[:2], -1)


def _check_heads(dim: int, num_heads: int) -> int:
    if dim % num_heads:
        raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
    return dim // num_heads


# --------------------------------------------------------------------------------------------------
# Bidirectional mixers (LINA generator)
# --------------------------------------------------------------------------------------------------


class LinaAttention(nn.Module):
    """LINA attention: fused qkv (bias), ReLU-kernel linear attention, output projection.

    Encoder form: ``conv_kernel_size=0, kv_gate=None`` (any length, e.g. the visible tokens only).
    Decoder form: ``conv_kernel_size=5`` adds a depthwise conv of the *block input* over the image grid
    to the attention output before the projection, and ``kv_gate`` ("absolute" as in the original, or
    "grid") scales φ(K) and V per head and position; both need ``n_cond`` and ``grid_hw``.
    ``normalization="subtraction"`` gives InLine attention (the paper's baseline).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        normalization: LF.Normalization = "division",
        qkv_bias: bool = True,
        conv_kernel_size: int = 0,
        kv_gate: str | None = None,
        n_cond: int = 0,
        grid_hw: tuple[int, int] | None = None,
        eps: float = 1e-6,
    ):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads, self.normalization, self.eps = num_heads, normalization, eps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.conv = DepthwiseConvGrid(dim, conv_kernel_size) if conv_kernel_size else None
        if kv_gate is not None and grid_hw is None:
            raise ValueError("a KV gate needs the token layout: pass n_cond and grid_hw")
        self.kv_gate = KVGate(num_heads, n_cond, grid_hw, kv_gate) if kv_gate is not None else None

    def forward(
        self, x: Tensor, *, n_cond: int = 0, grid_hw: tuple[int, int] | None = None, rope: RopeTables = None
    ) -> Tensor:
        """``rope``: optional ``(cos, sin)`` tables rotating q and k *before* the feature map (LINA's
        "linear3", the stable RoPE variant; identity rows for condition tokens)."""
        local = self.conv is not None or self.kv_gate is not None
        if local:
            if grid_hw is None:
                raise ValueError("the decoder form (conv / KV gate) needs grid_hw")
            check_layout(x, n_cond, grid_hw)
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        key_gate, value_gate = self.kv_gate(n_cond, grid_hw) if self.kv_gate is not None else (None, None)
        out = LF.linear_attention(
            q, k, v, normalization=self.normalization, key_gate=key_gate, value_gate=value_gate, eps=self.eps
        )
        out = _merge_heads(out)
        if self.conv is not None:
            out = out + self.conv(x, n_cond, grid_hw).to(out.dtype)
        return self.proj(out)


class SoftmaxAttention(nn.Module):
    """Softmax attention through SDPA; bidirectional (NOVA) or causal with a KV cache (LlamaGen).

    ``rope="2d"`` applies LlamaGen's 2-D RoPE to q and k; prefix tokens get ``prefix_rope`` rows
    ("zero" is LlamaGen exactly, "identity" leaves them unrotated).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        rope: str | None = None,
        prefix_rope: str = "zero",
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        if rope not in (None, "2d"):
            raise ValueError(f"rope must be None or '2d', got {rope!r}")
        self.num_heads, self.causal = num_heads, causal
        self.rope, self.prefix_rope, self.rope_base = rope, prefix_rope, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x: Tensor, start: int, n_cond: int, grid_hw) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rope is not None:
            if grid_hw is None:
                raise ValueError("2-D RoPE needs grid_hw")
            table = _rope_table(self.head_dim, tuple(grid_hw), n_cond, self.prefix_rope, self.rope_base)
            cos, sin = _rope_rows(table, start, x.shape[1])
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self, x: Tensor, *, n_cond: int = 0, grid_hw: tuple[int, int] | None = None, rope: RopeTables = None
    ) -> Tensor:
        """``rope``: explicit ``(cos, sin)`` tables (e.g. per-sample for gathered tokens); otherwise the
        module's own ``rope="2d"`` layout, if set."""
        if rope is not None:
            q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        else:
            q, k, v = self._qkv(x, 0, n_cond, grid_hw)
        return self.proj(_merge_heads(LF.softmax_attention(q, k, v, causal=self.causal)))

    def step(self, x: Tensor, state: KVCache | None, position: int, *, n_cond: int = 1, grid_hw=None):
        """Causal decoding with a KV cache: returns ``(y, cache)``."""
        if not self.causal:
            raise RuntimeError("step() is for causal attention; this module is bidirectional")
        q, k, v = self._qkv(x, position, n_cond, grid_hw)
        cache = KVCache.empty_like(k) if state is None else state
        if cache.length != position:
            raise ValueError(f"KV cache holds {cache.length} tokens but position is {position}")
        keys, values = cache.append(k, v)
        return self.proj(_merge_heads(LF.softmax_attention(q, keys, values, causal=True))), cache


@dataclass
class KVCache:
    """Preallocated key/value cache ``[B, capacity, H, D]`` that doubles when full (amortised O(1) append)."""

    keys: Tensor
    values: Tensor
    length: int = 0

    @classmethod
    def empty_like(cls, k: Tensor, capacity: int = 256) -> KVCache:
        shape = (k.shape[0], capacity, *k.shape[2:])
        return cls(k.new_empty(shape), k.new_empty(shape), 0)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[1]
        if end > self.keys.shape[1]:
            capacity = max(end, 2 * self.keys.shape[1])
            grow = (0, 0, 0, 0, 0, capacity - self.keys.shape[1])
            self.keys, self.values = F.pad(self.keys, grow), F.pad(self.values, grow)
        self.keys[:, self.length : end] = k
        self.values[:, self.length : end] = v
        self.length = end
        return self.keys[:, :end], self.values[:, :end]


# --------------------------------------------------------------------------------------------------
# Causal linear mixers (LASADGen and its baselines)
# --------------------------------------------------------------------------------------------------


class CausalLinearMixer(nn.Module, ABC):
    """Shared plumbing: ``forward`` is ``step`` from position 0 with no state, keeping only the output."""

    def forward(self, x: Tensor, *, n_cond: int = 1, grid_hw: tuple[int, int] | None = None, **kw: Any):
        return self.step(x, None, 0, n_cond=n_cond, grid_hw=grid_hw, **kw)[0]

    @abstractmethod
    def step(self, x: Tensor, state, position: int, *, n_cond: int = 1, grid_hw=None, **kw: Any):
        """Process tokens at absolute positions ``position…``; return ``(y, state)``."""


def _spatial_decay(log_decay: Tensor, mode: str, position_rule, start: int, n_cond: int, grid_hw) -> Tensor:
    """Apply LASAD's spatial-aware decay (unless ``mode`` is "off") to tokens at ``start, start+1, …``."""
    if mode == "off":
        return log_decay
    if grid_hw is None:
        raise ValueError("spatial-aware decay needs grid_hw (its width is the raster row length)")
    # LASAD counts positions with exactly one prefix token at 0; shift for other prefix lengths.
    return LF.spatial_aware_log_decay(
        log_decay, grid_hw[1], start=start - (n_cond - 1), mode=mode, position=position_rule
    )


class LasadAttention(CausalLinearMixer):
    """LASAD: HGRN2 token mixer with spatial-aware decay (``reference/lasad.md`` §2).

    ``q = SiLU(W_q x)``, ``log λ = log(β + (1−β)σ(W_f x))`` (β: this layer's lower bound, passed to
    forward), ``k = 1 − λ`` from the *unmasked* λ, ``v = W_i x``; the log-decay is then changed at one
    position per raster row (``sad_mode`` keep/reset/off, ``sad_position``), gated linear attention,
    RMSNorm over all heads, ``W_o``. No biases, no output gate, no RoPE.
    """

    def __init__(
        self,
        dim: int,
        *,
        expand_ratio: int = 64,
        num_heads: int | None = None,
        sad_mode: str = "keep",
        sad_position: LF.SadPosition = "row_last",
        scale: float | None = None,
        norm_eps: float = 1e-5,
        backend: LF.Backend = "auto",
    ):
        super().__init__()
        if sad_mode not in ("keep", "reset", "off"):
            raise ValueError(f"sad_mode must be 'keep', 'reset' or 'off', got {sad_mode!r}")
        self.num_heads = num_heads or dim // expand_ratio
        _check_heads(dim, self.num_heads)
        self.key_dim = self.num_heads * expand_ratio
        self.sad_mode, self.sad_position, self.scale, self.backend = sad_mode, sad_position, scale, backend
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.f_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.i_proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def log_decays(
        self, x: Tensor, position: int = 0, *, n_cond=1, grid_hw=None, lower_bound: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The forget gate ``log λ`` ``[B, T, H, K]`` of inputs ``x`` at absolute positions ``position…``
        (it also makes the keys) and the log-decay the state uses, after the spatial-aware mask. Public so
        that the decay pattern of a trained model can be looked at (the inspection notebook)."""
        gate = _split_heads(LF.lower_bounded_log_sigmoid(self.f_proj(x), lower_bound), self.num_heads)
        return gate, _spatial_decay(gate, self.sad_mode, self.sad_position, position, n_cond, grid_hw)

    def step(self, x, state, position, *, n_cond=1, grid_hw=None, lower_bound: Tensor | None = None):
        h = self.num_heads
        q = _split_heads(F.silu(self.q_proj(x)), h)
        gate, log_decay = self.log_decays(
            x, position, n_cond=n_cond, grid_hw=grid_hw, lower_bound=lower_bound
        )
        v = _split_heads(self.i_proj(x), h)
        k = (1.0 - gate.exp()).to(v.dtype)
        o, state = LF.gated_linear_attention(
            q,
            k,
            v,
            log_decay,
            scale=self.scale,
            initial_state=state,
            output_final_state=True,
            backend=self.backend,
        )
        o = LF.rms_norm(_merge_heads(o), self.norm.weight, self.norm.eps)
        return self.o_proj(o), state


class GlaAttention(CausalLinearMixer):
    """GLA (fla ``GatedLinearAttention`` defaults): low-rank data-dependent decay ``σ(·)^(1/16)``,
    per-head RMSNorm and a swish output gate. ``sad_mode`` applies LASAD's mask to the decay (GLA+SAD)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        *,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        norm_eps: float = 1e-5,
        sad_mode: str = "off",
        sad_position: LF.SadPosition = "row_last",
        backend: LF.Backend = "auto",
    ):
        super().__init__()
        self.num_heads = num_heads
        key_dim, value_dim = int(dim * expand_k), int(dim * expand_v)
        _check_heads(key_dim, num_heads)
        self.head_v_dim = _check_heads(value_dim, num_heads)
        self.normalizer, self.sad_mode, self.sad_position, self.backend = (
            gate_logit_normalizer,
            sad_mode,
            sad_position,
            backend,
        )
        self.q_proj = nn.Linear(dim, key_dim, bias=False)
        self.k_proj = nn.Linear(dim, key_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)
        self.g_proj = nn.Linear(dim, value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, key_dim)
        )
        self.g_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, dim, bias=False)

    def step(self, x, state, position, *, n_cond=1, grid_hw=None):
        h = self.num_heads
        q, k, v = (_split_heads(p(x), h) for p in (self.q_proj, self.k_proj, self.v_proj))
        gate_logits = self.gk_proj(x)
        log_decay = _split_heads(
            F.logsigmoid(gate_logits.to(LF.accumulation_dtype(x.dtype))) / self.normalizer, h
        )
        log_decay = _spatial_decay(log_decay, self.sad_mode, self.sad_position, position, n_cond, grid_hw)
        o, state = LF.gated_linear_attention(
            q, k, v, log_decay, initial_state=state, output_final_state=True, backend=self.backend
        )
        o = LF.rms_norm(o, self.g_norm.weight, self.g_norm.eps)
        return self.o_proj(_merge_heads(o) * F.silu(self.g_proj(x))), state


class TnlAttention(CausalLinearMixer):
    """TNL / Lightning Attention: SiLU q and k, a fixed per-head decay (``tnl_log_decay``), and the output
    ``W_o(u ⊙ RMSNorm(o))`` with ``u = W_u x``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        layer_idx: int = 0,
        num_layers: int = 1,
        decay: str = "lightning",
        norm_eps: float = 1e-5,
        backend: LF.Backend = "auto",
    ):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads, self.backend = num_heads, backend
        self.register_buffer("log_decay", LF.tnl_log_decay(num_heads, layer_idx, num_layers, decay).float())
        self.qkvu = nn.Linear(dim, 4 * dim, bias=False)
        self.norm = nn.RMSNorm(dim, eps=norm_eps)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def step(self, x, state, position, *, n_cond=1, grid_hw=None):
        h = self.num_heads
        q, k, v, u = self.qkvu(x).chunk(4, dim=-1)
        q, k, v = _split_heads(F.silu(q), h), _split_heads(F.silu(k), h), _split_heads(v, h)
        log_decay = self.log_decay.view(1, 1, h, 1).expand(*k.shape).to(LF.accumulation_dtype(x.dtype))
        o, state = LF.gated_linear_attention(
            q, k, v, log_decay, initial_state=state, output_final_state=True, backend=self.backend
        )
        o = LF.rms_norm(_merge_heads(o), self.norm.weight, self.norm.eps)
        return self.o_proj(u * o), state


class LinearRopeAttention(CausalLinearMixer):
    """ "LinearAttn w/ RoPE" baseline: ``φ = elu + 1``; LlamaGen's 2-D RoPE on the features in the
    numerator only (the denominator stays positive); identity rotation for prefix tokens, because a
    zero-rotated class key would carry no signal under linear attention."""

    def __init__(self, dim: int, num_heads: int, *, eps: float = 1e-6, rope_base: float = 10000.0):
        super().__init__()
        self.head_dim = _check_heads(dim, num_heads)
        self.num_heads, self.eps, self.rope_base = num_heads, eps, rope_base
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def step(self, x, state, position, *, n_cond=1, grid_hw=None):
        if grid_hw is None:
            raise ValueError("2-D RoPE needs grid_hw")
        q, k, v = (_split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        fq, fk = LF.elu_feature_map(q), LF.elu_feature_map(k)
        table = _rope_table(self.head_dim, tuple(grid_hw), n_cond, "identity", self.rope_base)
        cos, sin = _rope_rows(table, position, x.shape[1])
        out, state = LF.causal_linear_attention(
            fq,
            fk,
            v,
            q_rotated=apply_rope(fq, cos, sin),
            k_rotated=apply_rope(fk, cos, sin),
            eps=self.eps,
            state=state,
        )
        return self.proj(_merge_heads(out)), state


# --------------------------------------------------------------------------------------------------
# The one mixer registry: both generator families and the benchmarks build mixers through it
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixerSpec:
    """How to build a mixer from ``(dim, num_heads, **options)`` and which sequence models it serves:
    ``bidirectional`` mixers fit LINA's towers, ``causal`` ones (with ``step``) fit raster models."""

    build: Callable[..., nn.Module]
    bidirectional: bool
    causal: bool


def _lasad(dim: int, num_heads: int, *, expand_ratio: int | None = None, **options: Any) -> LasadAttention:
    """LASAD's heads follow its key expansion (Table 1); without one, ``num_heads`` sets it."""
    return LasadAttention(
        dim, expand_ratio=dim // num_heads if expand_ratio is None else expand_ratio, **options
    )


MIXERS: dict[str, MixerSpec] = {
    "lina": MixerSpec(LinaAttention, bidirectional=True, causal=False),
    "inline": MixerSpec(
        functools.partial(LinaAttention, normalization="subtraction"), bidirectional=True, causal=False
    ),
    "softmax": MixerSpec(SoftmaxAttention, bidirectional=True, causal=True),  # causal=True for raster models
    "lasad": MixerSpec(_lasad, bidirectional=False, causal=True),
    "gla": MixerSpec(GlaAttention, bidirectional=False, causal=True),
    "tnl": MixerSpec(TnlAttention, bidirectional=False, causal=True),
    "linear_rope": MixerSpec(LinearRopeAttention, bidirectional=False, causal=True),
}
MIXER_NAMES = tuple(MIXERS)


def mixer_names(*, bidirectional: bool = False, causal: bool = False) -> tuple[str, ...]:
    """Registry names serving bidirectional (LINA) or causal (raster) sequence models."""
    return tuple(n for n, s in MIXERS.items() if (bidirectional and s.bidirectional) or (causal and s.causal))


def create_mixer(name: str, dim: int, num_heads: int, **options: Any) -> nn.Module:
    """Build a token mixer by registry name (``MIXER_NAMES``) with its module options."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose from {', '.join(MIXER_NAMES)}")
    return MIXERS[name].build(dim, num_heads, **options)
