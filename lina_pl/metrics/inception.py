"""The ``inception`` feature network: torch-fidelity's FID Inception-v3, from a local weights file.

Why torch-fidelity's network: it is the TensorFlow FID Inception ported bit for bit (the one torchmetrics
wraps), with TensorFlow's bilinear resize to 299×299, so its statistics are comparable with published FIDs
and with ADM's reference batches. It is an optional extra (``pip install 'lina_pl[inception]'``, clusters
only: it pulls torchvision, which replaces a CPU torch with a CUDA build) and never downloads anything here:
the weights are read from a file (download them once, on a machine with internet, from
:data:`WEIGHTS_URL`).

Features: ``pool`` = the 2048-d ``pool_3`` activations (FID, KID, precision/recall), ``logits`` = the
1008 unbiased logits (Inception Score, as torchmetrics and torch-fidelity compute it), ``spatial`` = the
first 7 channels of ``Mixed_6d.branch1x1`` (TensorFlow's ``mixed_6/conv``, 17×17), flattened
height-width-channel like ADM's evaluator (sFID; 2023 values).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from lina_pl.metrics.features import FeatureNetwork, Features

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
#: channels of the 17×17 ``mixed_6/conv`` map kept for sFID (ADM's evaluator)
SPATIAL_CHANNELS = 7


def default_weights() -> Path:
    """Where torch-fidelity caches the weights: ``$TORCH_HOME/hub/checkpoints/`` (torch.hub's directory)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


class InceptionFeatures(FeatureNetwork):
    """torch-fidelity's ``FeatureExtractorInceptionV3`` with ``pool_3``, unbiased logits and sFID maps."""

    name = "inception"

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        path = Path(weights) if weights is not None else default_weights()
        if not path.is_file():
            raise FileNotFoundError(
                f"Inception weights not found: {path}; download {WEIGHTS_URL} on a machine with internet "
                "and pass its path (--inception-weights), or use --features digits"
            )
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as err:
            raise ImportError(
                f"the inception features need torch-fidelity ({err}); install it with "
                "`pip install 'lina_pl[inception]'` (on a CUDA machine: it pulls torchvision)"
            ) from err
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        self.key = f"inception-{digest.hexdigest()[:16]}"
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )
        self.num_features = 2048
        self._spatial: Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)
        self.eval().requires_grad_(False)

    def _keep_spatial(self, module, inputs, output: Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)

    def forward(self, images: Tensor) -> Features:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return Features(pool, logits, spatial)
