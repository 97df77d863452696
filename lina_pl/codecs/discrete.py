"""The discrete tokenizer interface raster AR models train on: images <-> codebook indices in raster order."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class DiscreteTokenizer(ABC):
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` <-> codes ``[B, h·w]`` (int64, raster order) on an ``h×w`` grid.

    Implementations: :class:`~lina_pl.codecs.kmeans.KMeansTokenizer` (fitted on the shards, no weights) and
    :class:`~lina_pl.codecs.llamagen_vq.LlamaGenVQTokenizer` (LlamaGen's VQ-16 from a local checkpoint).
    """

    #: the ``create_tokenizer`` name, and the file the tokenizer was loaded from (None: built in memory)
    name: str
    path: str | None = None
    #: number of codes, image channels, and pixels per token side
    codebook_size: int
    channels: int
    downsample: int

    def describe(self) -> dict:
        """What a shard manifest records about this tokenizer (code shards are checked against it)."""
        keys = ("name", "path", "codebook_size", "downsample")
        return {k: getattr(self, k) for k in keys}

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
