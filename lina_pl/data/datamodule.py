"""LightningDataModule over the shards written by ``lina data build``.

Training reads an endless, seeded, per-rank resampled stream and cuts it into epochs of exactly
``samples_per_epoch // (batch_size · world_size)`` batches on every rank, so DDP/FSDP ranks always agree
on the step count. Validation is a small in-memory set split over ranks like ``DistributedSampler`` does
(per image size), so ranks see equal batch counts even when the val shards do not divide evenly. A bad
sample or a truncated shard is skipped with a warning naming it, and counted, instead of ending a long run.

Batches are dicts. ``"latent"``: ``[B, c, h, w]`` float32 or ``[B, h, w]`` int64 (pixels in ``[-1, 1]`` for
PNG shards, a posterior sample ``(z − latent_shift)·latent_scale`` of the image or its flip for VAE shards,
or the codes of the image or its flip for code shards). Then the condition: ``"label"`` (int64 ``[B]``) for
class data; ``"text"`` (``list[str]``) for text data, plus, when the shards cache text features,
``"text_emb"`` (float32 ``[B, T, E]``, zero-padded to the batch's longest caption) and ``"text_mask"`` (bool
``[B, T]``, True on caption tokens). When the shards hold several image sizes (aspect buckets), every batch
holds one size.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import warnings
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, DistributedSampler, StackDataset
from webdataset.autodecode import DecodingError

from lina_pl.codecs.diffusers_vae import sample_posterior
from lina_pl.data import shards
from lina_pl.data.sources import image_to_tensor


class SkipBadSamples:
    """webdataset error handler: warn with the sample key and the real cause, count, and carry on.

    The counter is a shared ``multiprocessing.Value`` so skips inside DataLoader workers are seen by the
    main process. A truncated shard counts once per failed read, not once per lost sample (that number is
    unknowable from a broken tar).
    """

    def __init__(self, counter):
        self.counter = counter

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, DecodingError):
            what = f"sample {exn.key!r} ({exn.url}), field {exn.k!r}: {exn.__cause__!r}"
        else:
            cause = f" caused by {exn.__cause__!r}" if exn.__cause__ is not None else ""
            what = f"{exn!r}{cause}"
        warnings.warn(f"skipping bad data: {what}", RuntimeWarning, stacklevel=2)
        with self.counter.get_lock():
            self.counter.value += 1
        return True


class ToExample:
    """Decoded sample -> example ``{"latent", "label"}`` (class data) or ``{"latent", "text"[, "text_emb"]}``
    (text data), checked against the manifest.

    ``train=True`` draws a posterior sample of the image or its flip (VAE shards), picks the codes of the
    image or its flip (code shards), or flips PNG images, half the time when ``image_flip`` is on (None: on
    for VAE and code shards of class data, off for PNG shards and for text data);
    ``train=False`` uses the posterior mean, the codes or the pixels of the image itself, so validation is
    deterministic. ``text_emb`` is the caption's float32 ``[L, E]`` features, read when the manifest names a
    text encoder.
    """

    def __init__(
        self, manifest: dict, scale: float, shift: float, train: bool, image_flip: bool | None = None
    ):
        manifest = shards.with_defaults(manifest)
        self.format = manifest["format"]
        self.shapes = [tuple(shape) for shape in manifest["latent_shapes"]]
        self.condition = manifest["condition"]
        self.num_classes = manifest["num_classes"]
        self.text_encoder = manifest["text_encoder"]
        if image_flip is None:
            image_flip = self.format != shards.IMAGE and self.condition == "class"
        self.scale, self.shift, self.train, self.image_flip = scale, shift, train, image_flip

    def _condition_members(self) -> list[str]:
        if self.condition == "class":
            return [shards.CLS]
        return [shards.TXT] + ([shards.TXT_EMB] if self.text_encoder is not None else [])

    def __call__(self, sample: dict) -> dict:
        key = sample.get("__key__")
        missing = [f for f in [*self._condition_members(), *shards.FORMATS[self.format]] if f not in sample]
        if missing:
            raise ValueError(f"sample {key!r} lacks {', '.join(missing)}")
        latent = self._latent(key, sample)
        if tuple(latent.shape) not in self.shapes:
            expected = self.shapes[0] if len(self.shapes) == 1 else f"one of {self.shapes}"
            raise ValueError(f"sample {key!r} has shape {tuple(latent.shape)}, expected {expected}")
        return {"latent": latent, **self._condition(key, sample)}

    def _latent(self, key: str, sample: dict) -> torch.Tensor:
        # training: the image or its mirror image (one draw per example, whether or not flips are on)
        flip = self.train and bool(torch.rand(()) < 0.5) and self.image_flip
        if self.format == shards.IMAGE:
            latent = image_to_tensor(sample[shards.IMAGE])
            return latent.flip(-1) if flip else latent
        if self.format == shards.CODES:  # int64 codes [h, w]
            return torch.from_numpy(sample[shards.CODES_FLIP if flip else shards.CODES]).long()
        moments = torch.from_numpy(sample[shards.LATENT_FLIP if flip else shards.LATENT]).float()
        c = moments.shape[0] // 2
        if moments.ndim != 3 or (c, *moments.shape[1:]) not in self.shapes or moments.shape[0] % 2:
            expected = [(2 * s[0], *s[1:]) for s in self.shapes]
            raise ValueError(
                f"sample {key!r} has moments {tuple(moments.shape)}, expected "
                f"{expected[0] if len(expected) == 1 else f'one of {expected}'}"
            )
        if self.train:
            return sample_posterior(moments[None], self.scale, self.shift)[0]
        return (moments[:c] - self.shift) * self.scale

    def _condition(self, key: str, sample: dict) -> dict:
        if self.condition == "class":
            label = int(sample[shards.CLS])
            if not 0 <= label < self.num_classes:
                raise ValueError(f"sample {key!r} has label {label}, outside [0, {self.num_classes})")
            return {"label": label}
        text = sample[shards.TXT]
        example = {"text": text.decode("utf-8") if isinstance(text, bytes) else text}
        if self.text_encoder is not None:
            emb = sample[shards.TXT_EMB]
            width, max_length = self.text_encoder["feature_dim"], self.text_encoder["max_length"]
            if emb.ndim != 2 or emb.shape[1] != width or emb.shape[0] > max_length:
                raise ValueError(
                    f"sample {key!r} has text features {emb.shape}, expected [L ≤ {max_length}, {width}]"
                )
            example["text_emb"] = torch.from_numpy(emb).float()
        return example


def pad_text_features(features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per caption ``[L_i, E]`` -> ``(float32 [B, T, E] zero-padded, bool mask [B, T])`` with ``T = max L_i``
    (at least 1, so a batch of empty captions still has a token axis)."""
    length = max(1, *(len(f) for f in features))
    emb = torch.zeros(len(features), length, features[0].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(features), length, dtype=torch.bool)
    for i, f in enumerate(features):
        emb[i, : len(f)] = f
        mask[i, : len(f)] = True
    return emb, mask


def collate(examples: list[dict]) -> dict:
    """Examples (``ToExample`` output, or items of ``val_dataset``) of one latent shape -> a batch."""
    first = examples[0]
    batch = {"latent": torch.stack([e["latent"] for e in examples])}
    if "label" in first:
        batch["label"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.int64)
    if "text" in first:
        batch["text"] = [e["text"] for e in examples]
    if "text_emb" in first:
        batch["text_emb"], batch["text_mask"] = pad_text_features([e["text_emb"] for e in examples])
    return batch


class BucketBatches:
    """Pipeline stage: examples -> full batches of one latent shape. One pending list per shape; a batch is
    emitted when its list fills (with one shape this is ``wds.batched(batch_size, partial=False)``)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def __call__(self, examples: Iterator[dict]) -> Iterator[dict]:
        pending: dict[tuple, list[dict]] = {}
        for example in examples:
            bucket = pending.setdefault(tuple(example["latent"].shape), [])
            bucket.append(example)
            if len(bucket) == self.batch_size:
                yield collate(bucket)
                bucket.clear()


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


def _shard_seed(rank: int) -> int:
    """Seed of ``ResampledShards`` per (rank, worker), from the trainer's rank rather than the environment."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (0 if info is None else info.id)


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
        latent_scale: float = 1.0,
        latent_shift: float = 0.0,
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
            shuffle_buffer: samples held in the shuffle buffer of each worker.
            seed: seed of the shard resampling and of the shuffle buffer.
            latent_scale: multiplies VAE latents after the shift (the VAE's scaling factor, e.g. 0.18215).
            latent_shift: subtracted from VAE latents before scaling (the VAE's shift factor).
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
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.samples_per_epoch = samples_per_epoch or self.manifest["counts"]["train"]
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.latent_scale = latent_scale
        self.latent_shift = latent_shift
        self.val_samples = val_samples
        self.image_flip = image_flip
        self._skipped = multiprocessing.Value("q", 0)
        self._handler = SkipBadSamples(self._skipped)
        self._val_dataset: StackDataset | None = None

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
        """Bad samples (and unreadable shard tails) skipped so far, in any process."""
        return self._skipped.value

    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _decode(self):
        """Pipeline stage: raw sample -> numpy uint8 images (``H×W`` or ``H×W×3``), int labels, npy arrays."""
        return wds.decode("l8" if self.channels == 1 else "rgb8", handler=self._handler)

    def train_dataloader(self):
        rank, world_size = self._rank_and_world_size()
        batches = self.samples_per_epoch // (self.batch_size * world_size)
        if batches < 1:
            raise ValueError(
                f"samples_per_epoch={self.samples_per_epoch} is less than one global batch "
                f"(batch_size {self.batch_size} × world size {world_size})"
            )
        urls = shards.shard_urls(self.root, self.manifest, "train")
        to_example = ToExample(
            self.manifest, self.latent_scale, self.latent_shift, train=True, image_flip=self.image_flip
        )
        pipeline = wds.DataPipeline(
            wds.ResampledShards(
                urls, seed=self.seed, deterministic=True, worker_seed=functools.partial(_shard_seed, rank)
            ),
            wds.tarfile_to_samples(handler=self._handler),
            wds.shuffle(self.shuffle_buffer, seed=self.seed),
            self._decode(),
            wds.map(to_example, handler=self._handler),
            BucketBatches(self.batch_size),
        )
        loader = wds.WebLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def _load_split(self, split: str, limit: int | None = None) -> StackDataset:
        """Read a split (its first ``limit`` samples) into memory, in shard order, deterministically."""
        urls = shards.shard_urls(self.root, self.manifest, split)
        to_example = ToExample(self.manifest, self.latent_scale, self.latent_shift, train=False)
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.tarfile_to_samples(handler=self._handler),
            self._decode(),
            wds.map(to_example, handler=self._handler),
        )
        examples = list(itertools.islice(pipeline, limit))
        if not examples:
            raise ValueError(f"no readable {split!r} samples in {self.root} (see the warnings above)")
        latents = [e["latent"] for e in examples]
        uniform = len({latent.shape for latent in latents}) == 1
        columns = {"latent": torch.stack(latents) if uniform else latents}
        if "label" in examples[0]:
            columns["label"] = torch.tensor([e["label"] for e in examples], dtype=torch.int64)
        for name in ("text", "text_emb"):
            if name in examples[0]:
                columns[name] = [e[name] for e in examples]
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
