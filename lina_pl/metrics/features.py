"""Feature networks for FID, KID, IS, precision/recall and sFID, and the one way images reach them.

Every metric compares *features* of images, so the network is pluggable (:func:`feature_network`):

* ``inception``: torch-fidelity's FID Inception-v3 (:mod:`lina_pl.metrics.inception`), for natural images;
* ``digits``: a small CNN trained on scikit-learn's real digits (:mod:`lina_pl.metrics.digits_net`), for the
  digits demo and digit scenes, where Inception features mean little.

A network takes a batch of uint8 ``[N, C, H, W]`` images on its device and returns :class:`Features`.
:func:`extract_features` is the entry point for everything else: it accepts uint8 NHWC arrays (the
``samples.npz`` layout) and uint8 or ``[-1, 1]`` float NCHW tensors (what a codec decodes), quantises floats
to uint8 exactly as ``lina sample`` does (so a metric computed during training equals the one computed on
the saved samples) and runs the network in batches without gradients.

A feature network is never meant to be an attribute of a LightningModule: that would put its weights into
every checkpoint. Keep it in a callback or a local variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

#: environment variable naming the cache directory (digits-net weights, reference statistics)
CACHE_ENV = "LINA_CACHE_DIR"
#: feature networks :func:`feature_network` builds
NETWORKS = ("digits", "inception")
#: float images may stray this far outside [-1, 1] (rounding in half precision) before they are refused
FLOAT_TOLERANCE = 0.05


def cache_dir() -> Path:
    """``$LINA_CACHE_DIR``, else ``$XDG_CACHE_HOME/lina_pl``, else ``~/.cache/lina_pl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lina_pl"


@dataclass
class Features:
    """What a feature network gives for a batch: ``pool`` ``[N, D]`` (FID, KID, precision/recall),
    ``logits`` ``[N, K]`` (Inception Score) and, where the network has them, ``spatial`` ``[N, S]``
    (sFID: a slice of a mid-level feature map, flattened)."""

    pool: Tensor
    logits: Tensor
    spatial: Tensor | None = None

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        spatial = None if parts[0].spatial is None else torch.cat([p.spatial for p in parts])
        return Features(torch.cat([p.pool for p in parts]), torch.cat([p.logits for p in parts]), spatial)


class FeatureNetwork(nn.Module):
    """A frozen network from uint8 ``[N, C, H, W]`` images (C = 1 or 3, any size) to :class:`Features`.

    ``key`` identifies the weights: reference statistics are cached under it, so features of different
    networks are never mixed.
    """

    name: str
    key: str
    num_features: int

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True) -> FeatureNetwork:
        """Always in eval mode: batch norm and dropout never change what a feature is."""
        return super().train(False)


def feature_network(name: str, *, inception_weights: str | Path | None = None) -> FeatureNetwork:
    """The feature network ``name`` (one of :data:`NETWORKS`) on the CPU; move it with ``.to(device)``.

    ``inception_weights``: the Inception weights file (default: where torch-fidelity caches it).
    """
    if name == "digits":
        from lina_pl.metrics.digits_net import load_digits_net

        return load_digits_net()
    if name == "inception":
        from lina_pl.metrics.inception import InceptionFeatures

        return InceptionFeatures(inception_weights)
    raise ValueError(f"unknown feature network {name!r}; choose from {', '.join(NETWORKS)}")


def to_uint8_nchw(images: np.ndarray | Tensor) -> Tensor:
    """uint8 ``[N, H, W, C]`` arrays, uint8 ``[N, C, H, W]`` tensors or ``[-1, 1]`` float ``[N, C, H, W]``
    tensors -> uint8 ``[N, C, H, W]`` tensor (on the input's device), C = 1 or 3."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 N×H×W×C in 0..255, got {images.dtype}; "
                "pass [-1, 1] floats as N×C×H×W torch tensors"
            )
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(f"image arrays must be N×H×W×C with C = 1 or 3, got shape {list(images.shape)}")
        writable = images if images.flags.writeable else images.copy()  # torch warns about read-only arrays
        return torch.from_numpy(np.ascontiguousarray(writable)).permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image tensors must be N×C×H×W with C = 1 or 3, got shape {list(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"image tensors must be uint8 or [-1, 1] floats, got {images.dtype}")
    lo, hi = images.aminmax()
    if not (lo >= -1 - FLOAT_TOLERANCE and hi <= 1 + FLOAT_TOLERANCE):  # also refuses NaN
        raise ValueError(
            f"float images must lie in [-1, 1] (as codecs decode them), got values in [{lo:.3g}, {hi:.3g}]; "
            "pass 0..255 images as uint8"
        )
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def extract_features(net: FeatureNetwork, images: np.ndarray | Tensor, batch_size: int = 256) -> Features:
    """:class:`Features` of ``images`` (see :func:`to_uint8_nchw`) on ``net``'s device, ``batch_size``
    images at a time."""
    if len(images) == 0:
        raise ValueError("no images to compute features of")
    device = net.device
    parts = [
        net(to_uint8_nchw(images[i : i + batch_size]).to(device)) for i in range(0, len(images), batch_size)
    ]
    return Features.cat(parts)
