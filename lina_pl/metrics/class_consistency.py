"""Class consistency: the share of generated images that a classifier trained on real images assigns to
the class they were generated for (a weight-free stand-in for conditional FID on small data).

The classifier is an RBF SVM on 8×8 area-downsampled grey levels — on scikit-learn's digits it scores
about 98% on held-out real digits, which is the ceiling a generator can be compared with.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def features(images: np.ndarray, size: int = 8) -> np.ndarray:
    """uint8 ``[N, H, W, C]`` -> ``[N, size·size·C]`` floats in [0, 1] (area downsampling)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return F.adaptive_avg_pool2d(x, size).flatten(1).numpy()


def fit_classifier(images: np.ndarray, labels: np.ndarray):
    from sklearn.svm import SVC

    return SVC(gamma="scale", C=10.0).fit(features(images), labels)


def class_consistency(classifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``images`` classified as their ``labels``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return float((classifier.predict(features(images)) == np.asarray(labels)).mean())
