"""FID, sFID, KID, Inception Score and improved precision/recall, as functions of feature tensors.

The features come from any feature network (:func:`lina_pl.metrics.features.extract_features`), so the
same functions serve ``lina evaluate`` and an evaluation callback (which gathers the features of all ranks
first). FID's Fréchet distance, KID and IS are torchmetrics' own code (its ``_compute_fid``, and its KID
and IS metrics fed features through an identity "network"), imported when first used as it is slow to
import; KID and IS draw random subsets, so they run on a private random stream seeded by ``seed``
(the same features give the same value every time).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

#: improved precision/recall's neighbourhood size (Kynkäänniemi et al. 2019)
PR_K = 3
#: KID's defaults (torchmetrics', torch-fidelity's and the KID paper's)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
#: Inception Score's number of splits (the convention since Salimans et al. 2016)
IS_SPLITS = 10


@dataclass
class FeatureStats:
    """Mean ``[D]`` and (unbiased) covariance ``[D, D]`` of a feature set, in float64: all FID needs."""

    mu: Tensor
    sigma: Tensor

    @staticmethod
    def of(features: Tensor) -> FeatureStats:
        _check_features(features, "features", minimum=2)
        x = features.double()
        return FeatureStats(x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1]))

    def cpu(self) -> FeatureStats:
        return FeatureStats(self.mu.cpu(), self.sigma.cpu())


def _check_features(features: Tensor, what: str, minimum: int = 1) -> None:
    if features.ndim != 2:
        raise ValueError(f"{what} must be a [N, D] tensor, got shape {list(features.shape)}")
    if len(features) < minimum:
        raise ValueError(f"{what}: need at least {minimum} samples, got {len(features)}")


def _check_pair(real: Tensor, fake: Tensor, minimum: int) -> None:
    _check_features(real, "real features", minimum)
    _check_features(fake, "fake features", minimum)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features differ in size: {real.shape[1]} (real) vs {fake.shape[1]} (fake)")


def fid(real: Tensor | FeatureStats, fake: Tensor | FeatureStats) -> float:
    """Fréchet distance between two feature sets (``[N, D]``) or their :class:`FeatureStats`:
    ``‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)``. FID with pooled features, sFID with spatial ones."""
    from torchmetrics.image.fid import _compute_fid

    real = real if isinstance(real, FeatureStats) else FeatureStats.of(real)
    fake = fake if isinstance(fake, FeatureStats) else FeatureStats.of(fake)
    if real.mu.shape != fake.mu.shape:
        raise ValueError(f"features differ in size: {real.mu.numel()} (real) vs {fake.mu.numel()} (fake)")
    device = fake.mu.device
    mu1, sigma1 = real.mu.to(device, torch.float64), real.sigma.to(device, torch.float64)
    return float(_compute_fid(mu1, sigma1, fake.mu.double(), fake.sigma.double()))


@contextlib.contextmanager
def _quiet_and_seeded(seed: int):
    """torchmetrics draws its subsets with the global CPU generator: seed a private copy of it. Its
    warnings about holding all features in memory (they are features already) and about the spread of
    a single split are silenced."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.random.default_generator.manual_seed(seed)
        yield


def kid(
    real: Tensor, fake: Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE, seed: int = 0
) -> tuple[float, float, int]:
    """Kernel Inception Distance (unbiased MMD², cubic polynomial kernel) over ``subsets`` random subsets of
    ``min(subset_size, N_real, N_fake)`` samples a side -> ``(mean, std, subset size used)``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    _check_pair(real, fake, minimum=2)
    size = min(subset_size, len(real), len(fake))
    with _quiet_and_seeded(seed):
        metric = KernelInceptionDistance(
            feature=nn.Identity(), subsets=subsets, subset_size=size, sync_on_compute=False
        )
        metric.update(real.double(), real=True)
        metric.update(fake.double().to(real.device), real=False)
        mean, std = metric.compute()
    return float(mean), float(std), size


def inception_score(logits: Tensor, splits: int = IS_SPLITS, seed: int = 0) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) ‖ p(y)))`` of class ``logits`` ``[N, K]``, over ``splits``
    random splits -> ``(mean, std)``."""
    from torchmetrics.image.inception import InceptionScore

    _check_features(logits, "logits", minimum=splits)
    with _quiet_and_seeded(seed):
        metric = InceptionScore(feature=nn.Identity(), splits=splits, sync_on_compute=False)
        metric.update(logits.double())
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


def _knn_radii2(x: Tensor, k: int, rows: int) -> Tensor:
    """Squared distance of each point of ``x`` to its ``k``-th nearest other point of ``x``."""
    return torch.cat(
        [_dist2(x[i : i + rows], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), rows)]
    )  # k + 1: the point itself is its own nearest neighbour, at distance 0


def _dist2(a: Tensor, b: Tensor) -> Tensor:
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)).clamp_min(0)


def _coverage(points: Tensor, centres: Tensor, radii2: Tensor, rows: int) -> float:
    """Share of ``points`` inside at least one ball ``‖p − centre‖² ≤ radius²``."""
    inside = [
        (_dist2(points[i : i + rows], centres) <= radii2).any(dim=1) for i in range(0, len(points), rows)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = PR_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` against ``real`` features.

    Each set's manifold is the union of balls around its points reaching their ``k``-th nearest neighbour.
    Precision: the share of fake points inside the real manifold; recall: the share of real points inside
    the fake manifold. Own code because torchmetrics 1.9 has no generative precision/recall and
    torch-fidelity's needs VGG-16 weights. Distances in float64, ``rows`` of them at a time (memory
    O(rows·N)), so 50k × 50k runs on a GPU.
    """
    _check_pair(real, fake, minimum=k + 1)
    real, fake = real.double(), fake.double().to(real.device)
    rows = max(1, 2**25 // max(len(real), len(fake)))  # blocks of at most 256 MiB of float64 distances
    precision = _coverage(fake, real, _knn_radii2(real, k, rows), rows)
    recall = _coverage(real, fake, _knn_radii2(fake, k, rows), rows)
    return precision, recall
