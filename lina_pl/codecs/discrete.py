"""The discrete tokenizer interface raster AR models train on: images <-> codebook indices in raster order."""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from lina_pl.codecs.base import TokenCodec


class DiscreteTokenizer(TokenCodec):
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` <-> codes ``[B, h·w]`` (int64, raster order) on an ``h×w`` grid.

    Implementations: :class:`~lina_pl.codecs.kmeans.KMeansTokenizer` (fitted on the shards, no weights) and
    :class:`~lina_pl.codecs.llamagen_vq.LlamaGenVQTokenizer` (LlamaGen's VQ-16 from a local checkpoint).
    """

    kind = "discrete"
    #: the file the tokenizer was loaded from (None: built in memory)
    path: str | None = None
    #: number of codes, image channels, and pixels per token side
    codebook_size: int
    channels: int
    downsample: int

    @property
    def stride(self) -> int:
        return self.downsample

    def describe(self) -> dict:
        """What a shard manifest records about this tokenizer (code shards are checked against it); the
        codebook's hash tells apart two tokenizers of one name and size, e.g. two k-means fits."""
        keys = ("name", "path", "codebook_size", "downsample")
        vectors = self.code_vectors().detach().to("cpu", torch.float32).contiguous()
        return {k: getattr(self, k) for k in keys} | {
            "codebook_sha256": hashlib.sha256(vectors.numpy().tobytes()).hexdigest()
        }

    @abstractmethod
    def code_vectors(self) -> Tensor:
        """The codebook ``[codebook_size, d]``."""

    def generator_fields(self) -> dict[str, Any]:
        return {"vocab_size": self.codebook_size}

    def batch_grid(self, latent: Tensor) -> tuple[int, int]:
        return self.grid(latent.shape[-2:]) if latent.is_floating_point() else tuple(latent.shape[-2:])

    def batch_tokens(self, latent: Tensor) -> Tensor:
        """PNG batches are tokenized here; code shards already hold the codes ``[B, h, w]``."""
        return self.encode(latent) if latent.is_floating_point() else latent.flatten(1)

    @abstractmethod
    def encode(self, images: Tensor) -> Tensor:
        """Images -> codes ``[B, h·w]``."""

    @abstractmethod
    def decode(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """Codes ``[B, h·w]`` -> images ``[B, C, h·f, w·f]`` in ``[-1, 1]`` (clamped)."""

    def tokens_to_images(self, tokens: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        return self.decode(tokens, grid_hw)
