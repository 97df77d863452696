"""The codec interface and the latent <-> token reshapes shared by every codec."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor


def patchify(latent: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)·(W/p), p·p·C]`` tokens in raster order (channels last in a token)."""
    b, c, h, w = latent.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent {h}×{w} is not divisible by the patch size {p}")
    x = latent.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, grid_hw: tuple[int, int], patch_size: int) -> Tensor:
    """Inverse of :func:`patchify`: ``[B, H·W, p·p·C]`` -> ``[B, C, H·p, W·p]``."""
    b, n, d = tokens.shape
    gh, gw = grid_hw
    p = patch_size
    if n != gh * gw or d % (p * p):
        raise ValueError(f"tokens {tuple(tokens.shape)} do not fit a {gh}×{gw} grid of {p}×{p} patches")
    c = d // (p * p)
    x = tokens.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, gh * p, gw * p)


class Codec(ABC):
    """Images in ``[-1, 1]`` <-> scaled continuous latents; tokens are ``patch_size``² latent patches."""

    #: channels of the latent, spatial downsampling from pixels to latent, latent patch size per token
    latent_channels: int
    downsample: int
    patch_size: int

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> scaled latents ``[B, c, H/f, W/f]``."""

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in ``[-1, 1]`` (clamped)."""

    @property
    def token_channels(self) -> int:
        return self.latent_channels * self.patch_size**2

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image size."""
        f = self.downsample * self.patch_size
        h, w = image_hw
        if h % f or w % f:
            raise ValueError(f"image {h}×{w} is not divisible by the codec's total stride {f}")
        return h // f, w // f

    def to_tokens(self, latents: Tensor) -> Tensor:
        return patchify(latents, self.patch_size)

    def from_tokens(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return unpatchify(tokens, grid_hw, self.patch_size)

    @torch.no_grad()
    def tokens_to_images(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.decode(self.from_tokens(tokens, grid_hw))
