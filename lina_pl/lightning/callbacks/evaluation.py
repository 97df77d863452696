"""FID, KID, Inception Score and precision/recall of generated samples during training, on every rank.

Every ``every_n_validations``-th validation, :class:`Evaluation` generates ``num_samples`` images split over
the ranks (each rank its own seeds, the same seeds at every evaluation, so evaluations compare weights, not
luck), computes their features with the chosen feature network on each rank, gathers the features on every
rank (``torch.distributed.all_gather``), computes the metrics on rank 0 against the reference statistics and
logs them on every rank as ``eval/fid``, ``eval/kid``, ``eval/is``, ``eval/precision``, ``eval/recall``
(TensorBoard, and ``ModelCheckpoint(monitor="eval/fid")``).

Conditions are balanced over the whole set: global sample ``i`` gets value ``i mod K`` of the ``K`` classes
(all of the data's classes unless ``values`` names some) or prompts (``values``, required for a text
condition); rank ``r`` generates a contiguous slice of the ``num_samples`` global samples (the first
``num_samples mod world_size`` ranks one more). Every rank runs the same number of generation calls of the
same size (a rank with one sample fewer makes one extra and drops it), so a sharded model (FSDP2) stays in
step.

Weights: samples are generated in ``on_validation_epoch_end``. The :class:`~lina_pl.lightning.callbacks.EMA`
callback swaps its weights in at ``on_validation_start`` and back at ``on_validation_end``; Lightning runs a
hook of every callback before the next hook of any, so the samples use the EMA weights whatever the order of
the two callbacks in the list. The metrics are logged before ``ModelCheckpoint`` (always moved last by
Lightning) runs at ``on_validation_end``. To monitor ``eval/fid`` with ``ModelCheckpoint``, evaluate at every
validation (``every_n_validations: 1``) or give the checkpoint callback the evaluation's cadence: between
evaluations the last values stay in ``trainer.callback_metrics``.

Reference: the real images of the data module's ``reference_split`` (``trainer.datamodule.real_images``:
image shards held in memory, such as digits or a validation split), or a ``reference`` path as
:func:`lina_pl.metrics.reference.load_reference` reads it (shards, an images / statistics ``.npz`` with
features, cached on disk). Either is computed once per run, on rank 0, when the fit (or validation) starts,
so a bad reference fails before any training.

The feature network is built once per process when the run starts (rank 0 first, which trains and caches
the ``digits`` network if needed, then the others, which read the cache) and lives in this callback only:
never in the LightningModule, so never in a checkpoint or an optimizer. The callback's checkpoint state is
its validation counter.

Samples are generated without autocast, like :class:`~lina_pl.lightning.callbacks.SampleGrid` and ``lina
sample``, and quantised to uint8 like ``lina sample``, so the metrics equal those of ``lina evaluate all``
on the same samples.
"""

from __future__ import annotations

import math
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lina_pl.lightning.callbacks.cadence import EveryNValidations
from lina_pl.metrics import generative
from lina_pl.metrics.features import NETWORKS, FeatureNetwork, extract_features, feature_network
from lina_pl.metrics.generative import FeatureStats
from lina_pl.metrics.reference import Reference, load_reference

#: the logged names, in the order they are computed
METRIC_NAMES = ("eval/fid", "eval/kid", "eval/is", "eval/precision", "eval/recall")


def split_counts(total: int, world_size: int) -> list[int]:
    """``total`` samples over ``world_size`` ranks: ``total // world_size`` each, one more for the first
    ``total % world_size`` ranks."""
    if total < world_size:
        raise ValueError(
            f"Evaluation: num_samples={total} is fewer than the {world_size} ranks; every rank must generate "
            f"at least one sample, so set num_samples ≥ {world_size}"
        )
    base, extra = divmod(total, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def batch_seed(seed: int, rank: int, batch: int) -> int:
    """The seed of generation batch ``batch`` of rank ``rank``: independent streams per rank and batch."""
    return int(np.random.SeedSequence([seed, rank, batch]).generate_state(1, np.uint32)[0])


def gather_rows(local: Tensor, counts: Sequence[int]) -> Tensor:
    """All ranks' rows ``[counts[r], D]`` concatenated in rank order, on every rank.

    ``local`` is this rank's ``[max(counts), D]`` (rows past its count are padding): ``all_gather`` needs
    one shape on every rank. Without an initialised process group, ``local[:counts[0]]``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local[: counts[0]]
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def compute_metrics(
    reference: Reference,
    pool: Tensor,
    logits: Tensor,
    *,
    kid_subsets: int = generative.KID_SUBSETS,
    kid_subset_size: int = generative.KID_SUBSET_SIZE,
    is_splits: int = generative.IS_SPLITS,
    pr_k: int = generative.PR_K,
) -> dict[str, float]:
    """The :data:`METRIC_NAMES` of samples' features (``pool`` ``[N, D]``, ``logits`` ``[N, K]``) against
    ``reference`` (its ``features`` needed for KID and precision/recall)."""
    real = reference.features.to(pool.device)
    kid = generative.kid(real, pool, kid_subsets, kid_subset_size)[0]  # local: torchmetrics' sync is off
    inception_score = generative.inception_score(logits, is_splits)[0]
    precision, recall = generative.precision_recall(real, pool, pr_k)
    values = (generative.fid(reference.stats, pool), kid, inception_score, precision, recall)
    return dict(zip(METRIC_NAMES, values, strict=True))


def on_rank_zero(trainer: L.Trainer, fn: Callable[[], Any], *, share: bool = False) -> Any:
    """``fn()`` on rank 0; its result on rank 0, and on every rank with ``share`` (else None elsewhere).

    An exception on rank 0 is raised on every rank, instead of leaving the others waiting forever in their
    next collective.
    """
    result, error, sent = None, None, None
    if trainer.is_global_zero:
        try:
            result = fn()
        except Exception as err:  # raised below, once every rank knows
            error = sent = err
            try:
                pickle.dumps(err)
            except Exception:  # sent as a message, raised as itself here
                sent = RuntimeError(f"{type(err).__name__}: {err}")
    shared, shared_error = trainer.strategy.broadcast((result if share else None, sent), src=0)
    if error is not None:
        raise error
    if shared_error is not None:
        raise shared_error
    return result if trainer.is_global_zero else shared


class Evaluation(EveryNValidations):
    """FID, KID, IS and precision/recall of ``num_samples`` generated images every ``every_n_validations``
    validations (sanity checks are skipped), logged as ``eval/fid``, ``eval/kid``, ``eval/is``,
    ``eval/precision`` and ``eval/recall``.

    Args:
        num_samples: samples per evaluation over all ranks (at least the world size; the more, the less
            biased FID is: 50k for papers, a few hundred to compare runs of a demo).
        every_n_validations: evaluate at every n-th validation.
        features: the feature network: ``digits`` (the small CNN trained on real digits, for digits and
            digit scenes) or ``inception`` (the FID Inception, from ``inception_weights``).
        inception_weights: torch-fidelity's Inception weights file (default: torch.hub's checkpoints dir).
        reference: real images as ``lina evaluate --ref`` takes them (a shard directory, an images ``.npz``,
            a statistics ``.npz``); None: the data module's real images of ``reference_split``.
        reference_split: the split of the data module (or of the ``reference`` shard directory).
        values: condition values the samples cycle through (class indices or prompts); None: every class of
            a class condition (a text condition needs prompts).
        options: sampling options on top of the module's defaults (LINA: ``{steps: 8, flow_steps: 10}``;
            the paper's FID uses the defaults of its recipe).
        seed: base seed; batch ``b`` of rank ``r`` is seeded from ``(seed, r, b)`` at every evaluation.
        batch_size: samples per generation call on each rank (and per feature batch).
        kid_subsets: KID's random subsets.
        kid_subset_size: KID's subset size (capped by the sample and reference counts).
        is_splits: Inception Score splits (``num_samples`` must be at least this).
        pr_k: precision/recall's neighbourhood size.
    """

    def __init__(
        self,
        num_samples: int = 500,
        every_n_validations: int = 1,
        features: str = "digits",
        inception_weights: str | None = None,
        reference: str | None = None,
        reference_split: str = "val",
        values: list[Any] | None = None,
        options: dict[str, Any] | None = None,
        seed: int = 0,
        batch_size: int = 250,
        kid_subsets: int = generative.KID_SUBSETS,
        kid_subset_size: int = generative.KID_SUBSET_SIZE,
        is_splits: int = generative.IS_SPLITS,
        pr_k: int = generative.PR_K,
    ):
        super().__init__(every_n_validations)
        positive = {
            "batch_size": batch_size,
            "kid_subsets": kid_subsets,
            "kid_subset_size": kid_subset_size,
            "is_splits": is_splits,
            "pr_k": pr_k,
        }
        bad = [f"{name}={value}" for name, value in positive.items() if value < 1]
        if bad:
            raise ValueError(f"Evaluation: {', '.join(bad)}; these must be ≥ 1")
        needed = max(is_splits, pr_k + 1)
        if num_samples < needed:
            raise ValueError(
                f"Evaluation: num_samples={num_samples} is too few: IS needs ≥ is_splits ({is_splits}) and "
                f"precision/recall ≥ pr_k + 1 ({pr_k + 1}) samples"
            )
        if features not in NETWORKS:
            raise ValueError(f"Evaluation: unknown features {features!r}; choose from {', '.join(NETWORKS)}")
        if values is not None and (isinstance(values, str) or len(values) == 0):
            raise ValueError("Evaluation: values must be a non-empty list of class indices or prompts")
        self.num_samples = num_samples
        self.features, self.inception_weights = features, inception_weights
        self.reference, self.reference_split = reference, reference_split
        self.values = None if values is None else list(values)
        self.options, self.seed, self.batch_size = dict(options or {}), seed, batch_size
        self.kid_subsets, self.kid_subset_size = kid_subsets, kid_subset_size
        self.is_splits, self.pr_k = is_splits, pr_k
        # per process, never saved: the feature network and (rank 0) the reference features
        self._net: FeatureNetwork | None = None
        self._reference: Reference | None = None

    # -- preparation (when the fit or validation starts) ---------------------------------------------

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._prepare(trainer, pl_module)  # `lina validate` has no fit start; a no-op after the first call

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._net is not None:
            return
        # what would fail at the first evaluation fails now: too few samples for the ranks, a text condition
        # without prompts, classes the model lacks, a sampling option the family does not have
        split_counts(self.num_samples, trainer.world_size)
        values = self._condition_values(pl_module)
        try:
            pl_module.condition.display_batch(values, 1)
            pl_module.sampling_options(**self.options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Evaluation: {err}") from err

        def build() -> FeatureNetwork:
            net = feature_network(self.features, inception_weights=self.inception_weights)
            return net.to(pl_module.device)

        def build_and_load_reference() -> FeatureNetwork:
            net = build()
            self._reference = self._load_reference(trainer, net)
            return net

        start = time.perf_counter()
        # rank 0 first: it trains and caches the digits network if the cache lacks it, the others read it
        net = on_rank_zero(trainer, build_and_load_reference)
        self._net = net if trainer.is_global_zero else build()
        if self._reference is not None:
            rank_zero_info(
                f"Evaluation: {self.features} features of {len(self._reference.features)} reference images "
                f"({self._reference.source}) in {time.perf_counter() - start:.1f} s"
            )

    def _load_reference(self, trainer: L.Trainer, net: FeatureNetwork) -> Reference:
        if self.reference is not None:
            reference = load_reference(
                self.reference, net, split=self.reference_split, batch_size=self.batch_size
            )
        else:
            real_images = getattr(trainer.datamodule, "real_images", None)
            if real_images is None:
                raise ValueError(
                    "Evaluation: the data module has no real_images(); set the callback's reference to real "
                    "images (a shard directory or an images .npz)"
                )
            try:
                images = real_images(self.reference_split)[0]
            except ValueError as err:
                raise ValueError(
                    f"Evaluation: no reference images from the data module ({err}); set the callback's "
                    "reference to real images (image shards or an images .npz)"
                ) from err
            real = extract_features(net, images, self.batch_size)
            source = f"{getattr(trainer.datamodule, 'root', 'data module')} ({self.reference_split})"
            reference = Reference(source, FeatureStats.of(real.pool).cpu(), real.pool.float().cpu())
        if reference.features is None:
            raise ValueError(
                f"Evaluation: {self.reference} holds only FID statistics (mu, sigma); KID and "
                "precision/recall need reference features: give shards, an images .npz or a reference "
                "batch with arr_0"
            )
        if len(reference.features) <= self.pr_k:
            raise ValueError(
                f"Evaluation: the reference has {len(reference.features)} images; precision/recall need more "
                f"than pr_k={self.pr_k}"
            )
        return reference

    def _condition_values(self, pl_module: L.LightningModule) -> list[Any]:
        num_classes = getattr(pl_module.condition, "num_classes", None)
        if self.values is not None:
            outside = [
                v
                for v in self.values
                if num_classes is not None and not (isinstance(v, int) and 0 <= v < num_classes)
            ]
            if outside:
                raise ValueError(f"Evaluation: values {outside} are not classes 0..{num_classes - 1}")
            return self.values
        if num_classes is None:
            raise ValueError(
                f"Evaluation: a {type(pl_module.condition).__name__} needs the prompts to sample from; set "
                "the callback's values to a list of prompts"
            )
        return list(range(num_classes))

    # -- evaluation ----------------------------------------------------------------------------------

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        start = time.perf_counter()
        counts = split_counts(self.num_samples, trainer.world_size)
        pool, logits = self._local_features(trainer.global_rank, counts, pl_module)
        dims = pool.shape[1]
        gathered = gather_rows(torch.cat([pool, logits], dim=1), counts)
        if len(gathered) != self.num_samples:  # the world size Lightning reports vs the process group's
            raise RuntimeError(f"Evaluation gathered {len(gathered)} samples, expected {self.num_samples}")
        generated = time.perf_counter() - start

        def compute() -> dict[str, float]:
            return compute_metrics(
                self._reference,
                gathered[:, :dims],
                gathered[:, dims:],
                kid_subsets=self.kid_subsets,
                kid_subset_size=self.kid_subset_size,
                is_splits=self.is_splits,
                pr_k=self.pr_k,
            )

        metrics = on_rank_zero(trainer, compute, share=True)
        # the same values on every rank: the mean over ranks is the value, and every rank's ModelCheckpoint
        # sees it (sync_dist also keeps Lightning from warning about unsynced epoch-level logs)
        pl_module.log_dict(metrics, sync_dist=True)
        elapsed = time.perf_counter() - start
        rank_zero_info(
            f"Evaluation at step {trainer.global_step}: "
            + ", ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in metrics.items())
            + f"; {len(gathered)} samples in {generated:.1f} s ({len(gathered) / generated:.1f}/s), "
            f"{elapsed:.1f} s in all"
        )

    def _local_features(
        self, rank: int, counts: list[int], pl_module: L.LightningModule
    ) -> tuple[Tensor, Tensor]:
        """This rank's samples' ``pool`` and ``logits`` features, ``max(counts)`` rows (rows past its count
        are padding): every rank runs the same generation calls (a sharded model needs all ranks in each)."""
        values = self._condition_values(pl_module)
        first, count, rows = sum(counts[:rank]), counts[rank], max(counts)
        indices = list(range(first, first + count)) + [first] * (rows - count)
        options = pl_module.sampling_options(**self.options)
        condition = pl_module.condition
        pools, logits = [], []
        for b in range(math.ceil(rows / self.batch_size)):
            chunk = [
                values[i % len(values)] for i in indices[b * self.batch_size : (b + 1) * self.batch_size]
            ]
            batch = condition.display_batch(chunk, 1)
            images = pl_module.sample_images(batch, options, seed=batch_seed(self.seed, rank, b))
            features = extract_features(self._net, images, self.batch_size)
            pools.append(features.pool.float())
            logits.append(features.logits.float())
        return torch.cat(pools), torch.cat(logits)

    # -- checkpoint state ----------------------------------------------------------------------------
