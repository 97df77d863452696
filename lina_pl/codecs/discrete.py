"""The discrete tokenizer interface raster AR models train on: images <-> codebook indices in raster order."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class DiscreteTokenizer(ABC):
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` <-> codes ``[B, h·w]`` (int64, raster order) on an ``h×w`` grid.

    Implementations: :class:`~lina_pl.codecs.kmeans.KMeansTokenizer` (fitted on the shards, no weights) and
    :class:`~lina_pl.codecs.llamagen_vq.LlamaGenVQTokenizer` (LlamaGen's VQ-16 from a local checkpoint).
    """

    #: number of codes, image channels, and pixels per token side
    codebook_size: int
    channels: int
    downsample: int

    @abstractmethod
    def describe(self) -> dict:
        """What a shard manifest records about this tokenizer (name, file, codebook size, stride)."""

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images -> codes ``[B, h·w]``."""

    @abstractmethod
    def decode(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Codes ``[B, h·w]`` -> images ``[B, C, h·f, w·f]`` in ``[-1, 1]`` (clamped)."""

    def grid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """Token grid of an image size."""
        h, w = image_hw
        f = self.downsample
        if h % f or w % f:
            raise ValueError(f"image {h}×{w} is not divisible by the tokenizer's downsampling {f}")
        return h // f, w // f
