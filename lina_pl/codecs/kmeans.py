"""A small learned discrete tokenizer: k-means over pixel patches, fitted on the training shards.

It stands in for LlamaGen's VQ-16 in the demo and the tests, so raster models train and sample without
any pretrained weights: a code is the index of the nearest centroid of a ``p×p`` patch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lina_pl.codecs.base import patchify, unpatchify
from lina_pl.codecs.discrete import DiscreteTokenizer
from lina_pl.io import save_npz


class KMeansTokenizer(DiscreteTokenizer):
    """Images in ``[-1, 1]`` ``[B, C, H, W]`` <-> codes ``[B, (H/p)·(W/p)]`` in raster order."""

    name = "kmeans"

    def __init__(self, codebook: Tensor, patch_size: int, channels: int):
        codebook = torch.as_tensor(codebook)
        if codebook.dim() != 2 or codebook.shape[1] != patch_size * patch_size * channels:
            raise ValueError(
                f"codebook {tuple(codebook.shape)} does not hold {patch_size}×{patch_size}×{channels} patches"
            )
        self.codebook, self.patch_size, self.channels = codebook.float(), patch_size, channels

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def code_vectors(self) -> Tensor:
        return self.codebook

    def embedded_options(self) -> dict:
        return {"codebook": self.codebook.clone(), "patch_size": self.patch_size, "channels": self.channels}

    @property
    def downsample(self) -> int:
        return self.patch_size

    def encode(self, images: Tensor) -> Tensor:
        patches = patchify(images.float(), self.patch_size)  # [B, N, p·p·C]
        distances = torch.cdist(patches, self.codebook.to(patches.device)[None])
        return distances.argmin(dim=-1)

    def decode(self, codes: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        patches = self.codebook.to(codes.device)[codes]
        return unpatchify(patches, grid_hw, self.patch_size).clamp(-1, 1)

    @classmethod
    def fit(
        cls, images: Tensor, codebook_size: int, patch_size: int = 2, iters: int = 25, seed: int = 0
    ) -> KMeansTokenizer:
        """Lloyd's k-means (k-means++ seeding) on every patch of ``images``; empty clusters are re-seeded."""
        gen = torch.Generator().manual_seed(seed)
        x = patchify(images.float(), patch_size).flatten(0, 1)
        if len(x) < codebook_size:
            raise ValueError(f"{len(x)} patches cannot fit {codebook_size} centroids")
        centroids = x[torch.randint(len(x), (1,), generator=gen)]
        for _ in range(codebook_size - 1):  # k-means++: far points are likelier seeds
            d2 = torch.cdist(x, centroids).min(dim=1).values.square()
            centroids = torch.cat([centroids, x[torch.multinomial(d2 + 1e-12, 1, generator=gen)]])
        for _ in range(iters):
            assign = torch.cdist(x, centroids).argmin(dim=1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=codebook_size).float()
            empty = counts == 0
            centroids = torch.where(
                empty[:, None],
                x[torch.randint(len(x), (codebook_size,), generator=gen)],
                sums / counts.clamp_min(1)[:, None],
            )
        return cls(centroids, patch_size, images.shape[1])

    def save(self, path: str | Path) -> Path:
        return save_npz(
            path, codebook=self.codebook.numpy(), patch_size=self.patch_size, channels=self.channels
        )

    @classmethod
    def load(cls, path: str | Path) -> KMeansTokenizer:
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path} (fit one with `lina tokenizer fit`)")
        with np.load(path) as f:
            tokenizer = cls(torch.from_numpy(f["codebook"]), int(f["patch_size"]), int(f["channels"]))
        tokenizer.path = str(Path(path).resolve())
        return tokenizer
