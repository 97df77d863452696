"""Reference statistics: the features of real images that samples are compared against, computed once.

A reference is read from one of (:func:`load_reference`):

* a shard directory (``lina data build``): the real images of one split, through
  :meth:`ShardDataModule.real_images` (held in memory: digits, validation splits);
* an images ``.npz`` (``arr_0``: uint8 N×H×W×C, ADM's convention);
* a statistics ``.npz`` this module wrote (see below), e.g. copied to a cluster;
* an ADM reference batch holding ``mu`` / ``sigma`` (and ``mu_s`` / ``sigma_s``): used as they are for FID
  (and sFID); KID and precision/recall need features, so they read the batch's ``arr_0`` when it has one.

Features of shards and image files are cached in ``<cache_dir>/reference/`` under the feature network's
key and the source's identity (shards: path, split and manifest; files: path, size and modification time),
written atomically. A statistics file holds ``feature_network`` (the network's key), ``source``,
``features`` (float32 ``[N, D]``), ``mu`` / ``sigma`` and, when the network has spatial features,
``mu_s`` / ``sigma_s``.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lina_pl.io import save_npz
from lina_pl.metrics.features import FeatureNetwork, cache_dir, extract_features
from lina_pl.metrics.generative import FeatureStats


@dataclass
class Reference:
    """Real-image features: ``stats`` for FID, ``features`` ``[N, D]`` for KID and precision/recall (None
    for statistics-only ADM batches), ``spatial`` statistics for sFID (None when unavailable)."""

    source: str
    stats: FeatureStats
    features: Tensor | None = None
    spatial: FeatureStats | None = None
    #: the statistics file it was read from or cached to (None: ADM statistics, used as they are)
    path: Path | None = None


def _open_npz(path: Path, what: str):
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = np.load(path)
    except (ValueError, zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"{what} {path} is not a readable .npz archive ({err})") from err
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{what} {path} is not an .npz archive (a single array); save it with np.savez")
    return data


def check_images(images: np.ndarray, path: str | Path) -> np.ndarray:
    """``images`` if they are what ``lina sample`` writes (uint8 N×H×W×C, C = 1 or 3, N ≥ 1), else a
    ValueError naming ``path`` and the problem."""
    if images.dtype != np.uint8:
        raise ValueError(f"{path}: arr_0 must be uint8 images in 0..255, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"{path}: arr_0 must be N×H×W×C images with C = 1 or 3, got shape {list(images.shape)}"
        )
    if len(images) == 0:
        raise ValueError(f"{path} holds no images")
    return images


def read_images_npz(path: str | Path, what: str = "images file") -> np.ndarray:
    """``arr_0`` of an ``.npz`` (uint8 N×H×W×C, C = 1 or 3, as ``lina sample`` writes it)."""
    path = Path(path)
    with _open_npz(path, what) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 (it holds: {', '.join(data.files) or 'nothing'})")
        try:
            images = data["arr_0"]
        except ValueError as err:  # an object array, refused without allow_pickle
            raise ValueError(f"{path}: arr_0 must be uint8 images, not pickled objects") from err
    return check_images(images, path)


def _stats(data, mu: str, sigma: str, path: Path) -> FeatureStats:
    m, s = np.asarray(data[mu], dtype=np.float64), np.asarray(data[sigma], dtype=np.float64)
    if m.ndim != 1 or s.shape != (len(m), len(m)):
        raise ValueError(
            f"{path}: {mu} must be [D] and {sigma} [D, D], got {list(m.shape)} and {list(s.shape)}"
        )
    return FeatureStats(torch.from_numpy(m), torch.from_numpy(s))


def _compute(images: np.ndarray, net: FeatureNetwork, source: str, batch_size: int) -> Reference:
    features = extract_features(net, images, batch_size)
    spatial = None if features.spatial is None else FeatureStats.of(features.spatial).cpu()
    return Reference(source, FeatureStats.of(features.pool).cpu(), features.pool.float().cpu(), spatial)


def _save(reference: Reference, path: Path, key: str) -> None:
    arrays = {
        "feature_network": np.str_(key),
        "source": np.str_(reference.source),
        "features": reference.features.numpy(),
        "mu": reference.stats.mu.numpy(),
        "sigma": reference.stats.sigma.numpy(),
    }
    if reference.spatial is not None:
        arrays |= {"mu_s": reference.spatial.mu.numpy(), "sigma_s": reference.spatial.sigma.numpy()}
    save_npz(path, **arrays)
    reference.path = path


def _read_stats_file(data, path: Path, net: FeatureNetwork) -> Reference:
    missing = {"source", "features", "mu", "sigma"} - set(data.files)
    if missing:
        raise ValueError(f"statistics file {path} lacks {', '.join(sorted(missing))}; recompute it")
    key = str(data["feature_network"])
    if key != net.key:
        raise ValueError(
            f"{path} holds statistics of feature network {key}, not of {net.key} "
            "(other weights or another --features); point --ref at the real images instead"
        )
    spatial = _stats(data, "mu_s", "sigma_s", path) if "mu_s" in data.files else None
    features = torch.from_numpy(np.asarray(data["features"], dtype=np.float32))
    return Reference(str(data["source"]), _stats(data, "mu", "sigma", path), features, spatial, path)


def _read_adm_stats(data, path: Path, net: FeatureNetwork) -> Reference:
    """An ADM reference batch's ``mu`` / ``sigma`` (and ``mu_s`` / ``sigma_s``), as they are."""
    stats = _stats(data, "mu", "sigma", path)
    if stats.mu.numel() != net.num_features:
        raise ValueError(
            f"{path} holds {stats.mu.numel()}-d statistics but the {net.name} features have "
            f"{net.num_features} dimensions (ADM reference batches need --features inception)"
        )
    spatial = _stats(data, "mu_s", "sigma_s", path) if {"mu_s", "sigma_s"} <= set(data.files) else None
    return Reference(f"{path} (mu/sigma)", stats, spatial=spatial)


def _cached(net: FeatureNetwork, identity: str, source: str, images, batch_size: int) -> Reference:
    """The reference of ``images()`` (called only on a cache miss), cached under ``identity``."""
    digest = hashlib.sha256(f"{net.key}\n{identity}".encode()).hexdigest()[:16]
    path = cache_dir() / "reference" / f"{net.key}-{digest}.npz"
    if path.is_file():
        with _open_npz(path, "cached reference statistics") as data:
            return _read_stats_file(data, path, net)
    reference = _compute(images(), net, source, batch_size)
    _save(reference, path, net.key)
    return reference


def load_reference(
    ref: str | Path,
    net: FeatureNetwork,
    *,
    split: str = "train",
    need_features: bool = True,
    batch_size: int = 256,
) -> Reference:
    """The reference ``ref`` (a shard directory, or an images / statistics / ADM ``.npz``, see the module
    docstring) in ``net``'s features. ``split``: the shard split. ``need_features``: whether KID or
    precision/recall will run (then an ADM statistics batch must also hold ``arr_0``)."""
    path = Path(ref)
    if path.is_dir():
        from lina_pl.data import shards
        from lina_pl.data.datamodule import ShardDataModule

        shards.load_manifest(path)  # a missing or broken manifest is a clear error here
        manifest = hashlib.sha256((path / shards.MANIFEST).read_bytes()).hexdigest()
        identity = f"shards\n{path.resolve()}\n{split}\n{manifest}"
        return _cached(
            net,
            identity,
            f"{path} ({split})",
            lambda: ShardDataModule(str(path)).real_images(split)[0],
            batch_size,
        )
    with _open_npz(path, "reference") as data:
        files = set(data.files)
        if "feature_network" in files:
            return _read_stats_file(data, path, net)
        adm = _read_adm_stats(data, path, net) if {"mu", "sigma"} <= files else None
    if "arr_0" not in files:
        if adm is None:
            raise ValueError(
                f"{path} holds neither images (arr_0) nor statistics (mu, sigma), but: "
                f"{', '.join(sorted(files)) or 'nothing'}"
            )
        return adm
    if adm is not None and not need_features:
        return adm
    stat = path.stat()
    computed = _cached(
        net,
        f"images\n{path.resolve()}\n{stat.st_size}\n{stat.st_mtime_ns}",
        str(path),
        lambda: read_images_npz(path, "reference"),
        batch_size,
    )
    if adm is None:
        return computed
    adm.features = computed.features  # ADM's mu/sigma for FID, features of its arr_0 for KID and P/R
    return adm
