"""LightningDataModule over the shards written by ``lina data build``.

Training reads an endless, seeded, per-rank stream (``lina_pl.data.stream``) and cuts it into epochs of
exactly ``samples_per_epoch // (batch_size · world_size)`` batches on every rank, so DDP/FSDP ranks always
agree on the step count; resuming from a checkpoint continues the stream with exactly the batches the
uninterrupted run would have seen. Validation is a small in-memory set split over ranks like
``DistributedSampler`` does (per image size), so ranks see equal batch counts even when the val shards do not
divide evenly.

Damage (``lina_pl.data.reader``): every shard is checked against the manifest's checksum when opened and
its samples read are compared with the manifest's count. Training skips what was lost with a warning naming
the shard, counts it exactly (``skipped_samples``, logged to TensorBoard, summarised at the end of fit), and
stops with an error when a full pass over the shards yields no sample. Validation and ``real_images`` refuse a
damaged split (a score on part of it would silently differ from every other run's).

Batches are dicts. ``"latent"``: ``[B, c, h, w]`` float32 or ``[B, h, w]`` int64 (pixels in ``[-1, 1]`` for
PNG shards, a posterior sample ``(z − latent_shift)·latent_scale`` of the image or its flip for VAE shards,
or the codes of the image or its flip for code shards). Then the condition: ``"label"`` (int64 ``[B]``) for
class data; ``"text"`` (``list[str]``) for text data, plus, when the shards cache text features,
``"text_emb"`` (float32 ``[B, T, E]``, zero-padded to the batch's longest caption) and ``"text_mask"`` (bool
``[B, T]``, True on caption tokens). When the shards hold several image sizes (aspect buckets), every batch
holds one size.
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, StackDataset

from lina_pl.data import shards
from lina_pl.data.reader import Examples, LossCounter, ShardError, pad_text_features, read_shard
from lina_pl.data.stream import EpochLoader, TrainStream


def collate(examples: list[dict]) -> dict:
    """Items of ``val_dataset`` (tensors) of one latent shape -> a validation batch."""
    first = examples[0]
    batch = {"latent": torch.stack([e["latent"] for e in examples])}
    if "label" in first:
        batch["label"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.int64)
    if "text" in first:
        batch["text"] = [e["text"] for e in examples]
    if "text_emb" in first:
        batch["text_emb"], batch["text_mask"] = pad_text_features([e["text_emb"] for e in examples])
    return batch


class ShapeBatchSampler(DistributedSampler):
    """Validation batches for one rank, as lists of indices, each of one latent shape.

    Per shape, in order of first appearance: ``DistributedSampler``'s split (shuffle off; padded by repeating
    samples so that every rank gets the same count), cut into batches of ``batch_size`` (the last one of each
    shape may be smaller). So every rank runs the same number of batches, and with one shape the batches are
    exactly those of ``DataLoader(batch_size=…, sampler=DistributedSampler(…))``. Being a
    ``DistributedSampler``, Lightning leaves it in place (it would otherwise inject its own).
    """

    def __init__(self, dataset, shapes: list[tuple], batch_size: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        groups: dict[tuple, list[int]] = {}
        for index, shape in enumerate(shapes):
            groups.setdefault(tuple(shape), []).append(index)
        self.batches: list[list[int]] = []
        for members in groups.values():
            padded = -(-len(members) // num_replicas) * num_replicas
            mine = (members * -(-padded // len(members)))[:padded][rank::num_replicas]
            self.batches += [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Batches(torch.utils.data.Dataset):
    """A map-style dataset indexed by a list of indices, giving their collated batch."""

    def __init__(self, dataset: StackDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> dict:
        return collate(self.dataset.__getitems__(indices))


def _as_is(batch: dict) -> dict:
    return batch


def _weak_call(method: Callable[[], int | None]) -> Callable[[], int | None]:
    """``method()`` through a weak reference to its object, so the loader holding it forms no reference
    cycle with the DataModule (a cycle keeps dropped loaders, and their worker processes, alive until a
    garbage-collection pass)."""
    ref = weakref.WeakMethod(method)
    return lambda: None if ref() is None else ref()()


class ShardDataModule(L.LightningDataModule):
    """Batches from a ``lina data build`` directory: PNG pixels, cached VAE moments or codes, conditioned on
    class labels or captions (``condition``), in one or several image sizes (aspect buckets)."""

    def __init__(
        self,
        root: str,
        batch_size: int = 64,
        num_workers: int = 2,
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        latent_scale: float | None = None,
        latent_shift: float | None = None,
        val_batch_size: int | None = None,
        val_samples: int | None = None,
        image_flip: bool | None = None,
    ):
        """
        Args:
            root: directory written by ``lina data build`` (holds manifest.json and the .tar shards).
            batch_size: training samples per batch on each rank.
            num_workers: DataLoader worker processes decoding the training stream (0: in the main process).
            samples_per_epoch: training samples per epoch over all ranks (None: the train split's size).
            shuffle_buffer: samples shuffled together: each worker reads shards in groups holding at least
                this many samples and shuffles each group as a whole (a worker holds about two groups of
                decoded samples in memory).
            seed: seed of the shard order, the shuffles, the flips and the posterior noise.
            latent_scale: multiplies VAE latents after the shift (None: the manifest's
                ``codec.scaling_factor``, the VAE's, e.g. 0.18215; 1.0 when it records none).
            latent_shift: subtracted from VAE latents before scaling (None: the manifest's
                ``codec.shift_factor``; 0.0 when it records none).
            val_batch_size: validation samples per batch on each rank (None: batch_size).
            val_samples: read only the first this many validation samples into memory (None: all; set it
                for large PNG validation splits, which are held as float tensors).
            image_flip: train on the horizontally flipped image half the time: PNG images flipped on the
                fly, or the stored flip of VAE / code shards. None: on for VAE and code shards of class data
                (the MAR recipe), off for PNG shards (digits are not mirror-symmetric; set it for ImageNet)
                and for text data (captions may say left or right).
        """
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.manifest = shards.load_manifest(root)
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers = num_workers
        train_count = self.manifest["counts"].get("train", 0)
        self.samples_per_epoch = train_count if samples_per_epoch is None else samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        codec = self.manifest["codec"] or {}
        self.latent_scale = float(codec.get("scaling_factor", 1.0) if latent_scale is None else latent_scale)
        self.latent_shift = float(codec.get("shift_factor", 0.0) if latent_shift is None else latent_shift)
        self.val_samples = val_samples
        self.image_flip = image_flip
        self._losses = LossCounter(list(self.manifest["shards"].get("train") or []))
        self._val_dataset: StackDataset | None = None
        self._train_loader: EpochLoader | None = None
        self._train_identity: dict = {}
        self._stream_state: dict | None = None

    @property
    def condition(self) -> str:
        """``"class"`` (batches carry ``label``) or ``"text"`` (``text``, and ``text_emb`` + ``text_mask``
        when the shards cache features)."""
        return self.manifest["condition"]

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for text data)."""
        return self.manifest["num_classes"]

    @property
    def text_encoder(self) -> dict | None:
        """The encoder that made the cached ``text_emb`` (``{path, kind, max_length, feature_dim}``), or None
        when the shards hold no features (class data, or captions only: encode them online)."""
        return self.manifest["text_encoder"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixel height and width of the images the shards were made from (the most common size)."""
        return tuple(self.manifest["resolution"])

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Every image size ``(H, W)`` in the shards, the most common first."""
        return [tuple(size) for size in self.manifest["resolutions"]]

    @property
    def channels(self) -> int:
        """Image channels (1 for grayscale, 3 for RGB), whatever the shards store."""
        return self.manifest["channels"]

    @property
    def format(self) -> str:
        """``"image.png"`` or ``"latent.npy"``."""
        return self.manifest["format"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape ``(c, h, w)`` (``(h, w)`` for codes) of one ``batch["latent"]`` item of ``image_size``."""
        return tuple(self.manifest["latent_shape"])

    @property
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """The latent shape of each of ``image_sizes``."""
        return [tuple(shape) for shape in self.manifest["latent_shapes"]]

    @property
    def skipped_samples(self) -> int:
        """Training samples lost so far (the manifest's count minus the samples read, per shard read), in any
        process; what ``teardown`` summarises at the end of fit."""
        return self._losses.lost

    @property
    def damaged_shards(self) -> list[tuple[str, int, int]]:
        """``(shard name, samples lost, reads)`` of every training shard that lost samples so far."""
        return self._losses.damaged()

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _examples(self) -> Examples:
        return Examples(self.manifest, self.latent_scale, self.latent_shift, image_flip=self.image_flip)

    def _fit_position(self) -> int | None:
        """Training batches whose step ran, over the whole run (restored with a checkpoint), while fitting."""
        trainer = self.trainer
        if trainer is None or getattr(getattr(trainer, "state", None), "fn", None) != "fit":
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.total.processed

    def _shape_counts(self, entries: list[shards.ShardEntry], examples: Examples) -> np.ndarray:
        """Per train shard, its sample count per latent shape: from the manifest, or (older manifests that
        cannot tell) by reading every shard once."""
        if all(entry.shapes is not None for entry in entries):
            return np.array([entry.shapes for entry in entries], dtype=np.int64)
        warnings.warn(
            f"{self.root}: the manifest has no per-shard counts (an older build); reading all "
            f"{len(entries)} train shards once to count them (rebuild the shards to skip this)",
            UserWarning,
            stacklevel=3,
        )
        counts = np.zeros((len(entries), len(examples.shapes)), dtype=np.int64)
        for i, entry in enumerate(entries):
            for item in read_shard(entry, examples).items:
                counts[i, item["shape"]] += 1
        return counts

    def _stream_identity(self, world_size: int, group_shards: int, entries: list) -> dict:
        """What the training stream depends on besides the batch count (a resume checks it)."""
        files = [(e.name, e.samples, e.sha256) for e in entries]
        return {
            "seed": self.seed,
            "world_size": world_size,
            "streams_per_rank": max(1, self.num_workers),
            "batch_size": self.batch_size,
            "group_shards": group_shards,
            "shards": hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16],
        }

    def train_dataloader(self) -> EpochLoader:
        rank, world_size = self._rank_and_world_size()
        batches = self.samples_per_epoch // (self.batch_size * world_size)
        if batches < 1:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is less than one global batch "
                f"(batch_size {self.batch_size} × world size {world_size})"
            )
        entries = shards.shard_entries(self.root, self.manifest, "train")
        examples = self._examples()
        counts = self._shape_counts(entries, examples)
        group_shards = max(1, -(-self.shuffle_buffer // max(1, int(counts.sum(1).max()))))
        stream = TrainStream(
            self.root,
            entries,
            counts,
            examples,
            self._losses,
            batch_size=self.batch_size,
            group_shards=group_shards,
            seed=self.seed,
            rank=rank,
        )
        if self._train_loader is not None:
            self._train_loader.close()
        loader = EpochLoader(stream, self.num_workers, batches, position=_weak_call(self._fit_position))
        self._train_loader = loader
        self._train_identity = self._stream_identity(world_size, group_shards, entries)
        if self._stream_state is not None:
            self._resume(self._stream_state)
        return loader

    def _resume(self, state: dict) -> None:
        saved = {k: v for k, v in state.items() if k != "batches"}
        if saved != self._train_identity:
            changed = ", ".join(
                f"{k} {saved.get(k)} -> {v}" for k, v in self._train_identity.items() if saved.get(k) != v
            )
            warnings.warn(
                f"the checkpoint's training stream differs from this run's ({changed}): it cannot continue "
                f"exactly, so it continues at batch {state['batches']} of this run's stream",
                UserWarning,
                stacklevel=3,
            )
        self._train_loader.load_state_dict(state)

    def state_dict(self) -> dict:
        """The training stream's position (batches consumed) and what the stream depends on."""
        if self._train_loader is None:
            return {}
        return {"train_stream": {**self._train_identity, **self._train_loader.state_dict()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self._stream_state = state_dict.get("train_stream")
        if self._train_loader is not None and self._stream_state is not None:
            self._resume(self._stream_state)

    def teardown(self, stage: str) -> None:
        """At the end of fit: stop the workers and report what the training data lost."""
        if stage != "fit" or self._train_loader is None:
            return
        self._train_loader.close()
        if self._losses.lost:
            warnings.warn(self._losses.summary(), RuntimeWarning, stacklevel=2)
        else:
            rank_zero_info(self._losses.summary())

    def _load_split(self, split: str, limit: int | None = None) -> StackDataset:
        """Read a split (its first ``limit`` samples) into memory, in shard order; damage is an error."""
        entries = shards.shard_entries(self.root, self.manifest, split)
        examples = Examples(self.manifest, self.latent_scale, self.latent_shift)
        items, damaged, complete = [], [], True
        for i, entry in enumerate(entries):
            read = read_shard(entry, examples)
            items += read.items
            if read.lost or read.damage:
                damaged.append(read)
            if limit is not None and len(items) >= limit:
                complete = i == len(entries) - 1
                break
        expected = self.manifest["counts"].get(split, 0)
        if damaged or (complete and len(items) != expected):
            details = "; ".join(read.describe() for read in damaged[:3]) or "the shards hold other counts"
            raise ShardError(
                f"the {split!r} split of {self.root} is damaged: {len(items)} of {expected} samples readable "
                f"({details}); check it with `lina data verify {self.root}` and rebuild the shards"
            )
        items = items[:limit]
        latents: list = [None] * len(items)
        by_shape: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_shape.setdefault(item["shape"], []).append(i)
        for members in by_shape.values():
            batch = examples.batch([items[i] for i in members])
            for j, i in enumerate(members):
                latents[i] = batch["latent"][j]
        columns = {"latent": torch.stack(latents) if len(by_shape) == 1 else latents}
        if self.condition == "class":
            columns["label"] = torch.tensor([item["label"] for item in items], dtype=torch.int64)
        else:
            columns["text"] = [item["text"] for item in items]
            if self.text_encoder is not None:
                columns["text_emb"] = [torch.from_numpy(i["text_emb"].astype(np.float32)) for i in items]
        return StackDataset(**columns)

    @property
    def val_dataset(self) -> StackDataset:
        """The validation split in memory (read once): items ``{"latent": [c, h, w], "label": int64}``, or
        ``{"latent", "text": str[, "text_emb": float32 [L, E]]}`` for text data. ``latent`` is one stacked
        tensor when all samples share a shape, else a list."""
        if self._val_dataset is None:
            self._val_dataset = self._load_split("val", self.val_samples)
        return self._val_dataset

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        dataset = self.val_dataset
        shapes = [latent.shape for latent in dataset.datasets["latent"]]
        batches = ShapeBatchSampler(dataset, shapes, self.val_batch_size, num_replicas=world_size, rank=rank)
        # the sampler yields whole batches: batch_size=None hands each index list to _Batches as is
        return DataLoader(_Batches(dataset), batch_size=None, sampler=batches, collate_fn=_as_is)

    def real_images(self, split: str = "val") -> tuple[np.ndarray, np.ndarray | list[str]]:
        """uint8 images ``[N, H, W, C]`` of a split (PNG shards of one image size), for metrics, and their
        conditions: int64 labels ``[N]`` for class data, the captions (``list[str]``) for text data.

        The whole split is held in memory: meant for validation sets and small data such as digits.
        """
        if self.format != shards.IMAGE:
            raise ValueError(
                f"real_images needs image.png shards; {self.root} holds {self.format} (encoded, not pixels)"
            )
        dataset = self.val_dataset if split == "val" else self._load_split(split)
        pixels = dataset.datasets["latent"]
        if not isinstance(pixels, torch.Tensor):
            raise ValueError(
                f"real_images needs images of one size; the {split!r} split of {self.root} holds "
                f"{sorted({tuple(p.shape[1:]) for p in pixels})} (aspect buckets)"
            )
        images = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        conditions = dataset.datasets["label" if self.condition == "class" else "text"]
        return images.permute(0, 2, 3, 1).numpy(), (
            conditions.numpy() if self.condition == "class" else list(conditions)
        )
