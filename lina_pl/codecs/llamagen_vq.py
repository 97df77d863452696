"""LlamaGen's VQ tokenizer (VQ-16 of LASADGen / LlamaGen, ``reference/lasad.md`` §3.2), from a local file.

A taming-style conv encoder/decoder (GroupNorm(32), swish, self-attention at the lowest resolution and in
the middle) around a vector quantiser whose codes are l2-normalised. The module and parameter names follow
the checkpoint layout (``encoder.conv_blocks.{i}.res.{j}.conv1`` …, ``quantize.embedding``), so LlamaGen's
released ``vq_ds16_c2i.pt`` (``{"model": state_dict}``) loads as is; the architecture is read from the
shapes in the checkpoint, so VQ-8 and VQ-16 (and tiny test models) need no extra options.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lina_pl.codecs.discrete import DiscreteTokenizer

#: buffers of the training code that inference does not need (codebook usage statistics)
IGNORED_KEYS = ("quantize.codebook_used",)


@dataclass(frozen=True)
class VQConfig:
    """LlamaGen's ``VQ_16`` by default: 16384 codes of dim 8, ch_mult (1, 1, 2, 2, 4), z 256, ×16 down."""

    codebook_size: int = 16384
    codebook_dim: int = 8
    l2_norm: bool = True
    channels: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    image_channels: int = 3

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], l2_norm: bool = True) -> VQConfig:
        """Read the architecture from parameter shapes (``l2_norm`` is not stored in a checkpoint)."""
        try:
            codebook_size, codebook_dim = state["quantize.embedding.weight"].shape
            channels, image_channels = state["encoder.conv_in.weight"].shape[:2]
            z_channels = state["encoder.conv_out.weight"].shape[0]
            levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.conv_blocks."))
            res = {k.split(".")[4] for k in state if k.startswith("encoder.conv_blocks.0.res.")}
            ch_mult = tuple(
                state[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // channels
                for i in range(levels)
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"not a LlamaGen VQ state dict (missing or odd key: {err})") from None
        return cls(
            codebook_size, codebook_dim, l2_norm, channels, ch_mult, len(res), z_channels, image_channels
        )


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """``x + conv(swish(norm(conv(swish(norm(x))))))``, a 1×1 shortcut when the width changes."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head softmax self-attention over all pixels, with 1×1-conv projections and a residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (proj(n).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # [B, HW, C]
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv after padding one zero row/column at the bottom/right (taming's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[ResnetBlock], attend: bool, resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.res = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(AttnBlock(b.conv2.out_channels) for b in blocks) if attend else nn.ModuleList()
    if resample is not None:
        level.add_module(name, resample)
    return level


def _middle(channels: int) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)]
    )


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.res):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _head(norm: nn.GroupNorm, conv: nn.Conv2d, h: Tensor) -> Tensor:
    return conv(F.silu(norm(h)))


class Encoder(nn.Module):
    """Image -> ``z_channels`` features at 1/2^(levels−1) resolution."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.channels
        for i, c_out in enumerate(widths):
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            self.conv_blocks.append(
                _level(blocks, i == last, Downsample(c_out) if i < last else None, "downsample")
            )
            c_in = c_out
        self.mid = _middle(c_in)
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return _head(self.norm_out, self.conv_out, h)


class Decoder(nn.Module):
    """``z_channels`` features -> image; levels run from the lowest resolution up."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in reversed(cfg.ch_mult)]
        last = len(widths) - 1
        c_in = widths[0]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = _middle(c_in)
        self.conv_blocks = nn.ModuleList()
        for i, c_out in enumerate(widths):
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            self.conv_blocks.append(_level(blocks, i == 0, Upsample(c_out) if i < last else None, "upsample"))
            c_in = c_out
        self.norm_out, self.conv_out = _norm(c_in), nn.Conv2d(c_in, cfg.image_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return _head(self.norm_out, self.conv_out, h)


class VectorQuantizer(nn.Module):
    """Nearest code by Euclidean distance; with ``l2_norm`` both features and codes are unit vectors."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def indices(self, z: Tensor) -> Tensor:
        """Features ``[B, d, h, w]`` -> code indices ``[B, h·w]`` (raster order)."""
        flat = z.flatten(2).transpose(1, 2)  # [B, hw, d]
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        return torch.cdist(flat, self.codebook()[None]).argmin(dim=-1)

    def lookup(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Indices ``[B, h·w]`` -> code vectors ``[B, d, h, w]``."""
        b = codes.shape[0]
        return self.codebook()[codes].transpose(1, 2).reshape(b, -1, *grid_hw)


class VQModel(nn.Module):
    """Encoder → 1×1 ``quant_conv`` → quantiser; code vectors → 1×1 ``post_quant_conv`` → decoder."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def encode(self, images: Tensor) -> Tensor:
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    def decode(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes, grid_hw)))


def load_vq_state(path: str | Path) -> dict[str, Tensor]:
    """The weights of a LlamaGen VQ checkpoint: ``{"model": …}``, ``{"ema": …}`` or a bare state dict."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"VQ checkpoint not found: {path} (download vq_ds16_c2i.pt to a local path)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt.get("ema", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict")
    return {k: v for k, v in state.items() if k not in IGNORED_KEYS}


class LlamaGenVQTokenizer(DiscreteTokenizer):
    """A frozen :class:`VQModel` as a discrete tokenizer; runs in fp32 (no autocast) on the images' device.

    Args:
        path: a LlamaGen VQ checkpoint (e.g. ``vq_ds16_c2i.pt``); the architecture comes from its shapes.
        l2_norm: l2-normalised codes (True for every released LlamaGen VQ).
        device: where the tokenizer starts; it follows the device of the images it is given.
    """

    name = "llamagen_vq"

    def __init__(self, path: str | Path, l2_norm: bool = True, device: str | torch.device = "cpu"):
        state = load_vq_state(path)
        self.path = str(Path(path).resolve())
        self.config = VQConfig.from_state_dict(state, l2_norm)
        self.model = VQModel(self.config)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match the LlamaGen VQ layout {asdict(self.config)}: "
                f"missing {missing[:4]}, unexpected {unexpected[:4]}"
            )
        self.model.requires_grad_(False).eval().to(device)
        self.codebook_size = self.config.codebook_size
        self.channels = self.config.image_channels
        self.downsample = self.config.downsample

    def code_vectors(self) -> Tensor:
        return self.model.quantize.embedding.weight

    def _on(self, device: torch.device) -> VQModel:
        if self.model.quant_conv.weight.device != device:
            self.model.to(device)
        return self.model

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return self._on(images.device).encode(images.float())

    @torch.no_grad()
    def decode(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        with torch.autocast(codes.device.type, enabled=False):
            return self._on(codes.device).decode(codes, grid_hw).clamp(-1.0, 1.0)
