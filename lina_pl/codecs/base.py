"""The codec interfaces and the latent <-> token reshapes shared by every codec.

:class:`TokenCodec` is what the LightningModule needs of any codec, continuous or discrete: the token grid of
an image size, the tokens of a batch, images from tokens, and the config fields a generator takes from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor


def patchify(latent: Tensor, patch_size: int) -> Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)·(W/p), p·p·C]`` tokens in raster order (channels last in a token)."""
    b, c, h, w = latent.shape
    p = patch_size
    if p < 1:
        raise ValueError(f"the patch size must be ≥ 1, got {p}")
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


class TokenCodec(ABC):
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` <-> generator tokens on an ``h×w`` grid (raster order)."""

    #: "continuous" (LINA: latent patches) or "discrete" (raster models: codebook indices)
    kind: ClassVar[str]
    #: the ``create_codec`` name, and the number of image channels the codec takes
    name: str
    channels: int

    @property
    @abstractmethod
    def stride(self) -> int:
        """Pixels per token side."""

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid for an image size."""
        h, w = image_hw
        f = self.stride
        if h % f or w % f:
            raise ValueError(f"image {h}×{w} is not divisible by the {self.name} codec's stride {f}")
        return h // f, w // f

    @abstractmethod
    def batch_tokens(self, latent: Tensor) -> Tensor:
        """A batch's ``latent`` field (pixels, latents or codes, as the shards store them) -> tokens."""

    @abstractmethod
    def batch_grid(self, latent: Tensor) -> tuple[int, int]:
        """The token grid of a batch's ``latent`` field (batches of several sizes train one model)."""

    @abstractmethod
    def tokens_to_images(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Generated tokens -> images in ``[-1, 1]``."""

    @abstractmethod
    def generator_fields(self) -> dict[str, Any]:
        """Generator config fields this codec fixes (token channels or vocabulary size)."""

    def embedded_options(self) -> dict[str, Any] | None:
        """``create_codec`` options that rebuild this codec without its file, small enough to keep in every
        checkpoint (so sampling needs no tokenizer file beside it). None: weight-free, or too large (a VAE, a
        VQ model: loaded from their path)."""
        return None


class Codec(TokenCodec):
    """Images in ``[-1, 1]`` <-> scaled continuous latents; tokens are ``patch_size``² latent patches."""

    kind = "continuous"
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

    @property
    def stride(self) -> int:
        return self.downsample * self.patch_size

    def generator_fields(self) -> dict[str, Any]:
        return {"token_channels": self.token_channels}

    def batch_grid(self, latent: Tensor) -> tuple[int, int]:
        h, w = latent.shape[-2:]
        return h // self.patch_size, w // self.patch_size

    def batch_tokens(self, latent: Tensor) -> Tensor:
        """Scaled latents (pixels for patchify) ``[B, c, h, w]`` -> patch tokens ``[B, N, p·p·c]``."""
        if not latent.is_floating_point():
            raise ValueError(
                f"the {self.name} codec needs pixel or latent shards, got integer codes; "
                "LINA trains on image.png or latent.npy shards (lina data build --codec diffusers)"
            )
        return patchify(latent, self.patch_size)

    @torch.no_grad()
    def tokens_to_images(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.decode(unpatchify(tokens, grid_hw, self.patch_size))
