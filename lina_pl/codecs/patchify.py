"""The weight-free codec: pixels are the latent, tokens are pixel patches (exact, instant)."""

from __future__ import annotations

from torch import Tensor

from lina_pl.codecs.base import Codec


class PatchifyCodec(Codec):
    """Identity latent (``[-1, 1]`` pixels), ``patch_size``×``patch_size`` pixel patches as tokens.

    Used by the digits demo and the tests: no weights, no information loss.
    """

    name = "patchify"
    downsample = 1

    def __init__(self, channels: int = 1, patch_size: int = 2):
        if channels < 1 or patch_size < 1:
            raise ValueError(
                f"patchify needs channels ≥ 1 and patch_size ≥ 1, got {channels} and {patch_size}"
            )
        self.latent_channels = channels
        self.patch_size = patch_size

    @property
    def channels(self) -> int:
        return self.latent_channels

    def encode(self, images: Tensor) -> Tensor:
        if images.shape[1] != self.latent_channels:
            raise ValueError(f"expected {self.latent_channels}-channel images, got {tuple(images.shape)}")
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1.0, 1.0)
