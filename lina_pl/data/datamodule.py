"""LightningDataModule over the shards written by ``lina data build``.

Training reads an endless, seeded, per-rank resampled stream and cuts it into epochs of exactly
``samples_per_epoch // (batch_size · world_size)`` batches on every rank, so DDP/FSDP ranks always agree
on the step count. Validation is a small in-memory set split by ``DistributedSampler``, so ranks see equal
batch counts even when the val shards do not divide evenly. A bad sample or a truncated shard is skipped
with a warning naming it, and counted, instead of ending a long run.

Batches are ``{"latent": [B, c, h, w] float32 or [B, h, w] int64, "label": int64 [B]}``: pixels in
``[-1, 1]`` for PNG shards, a posterior sample ``(z − latent_shift)·latent_scale`` of the image or its flip
for VAE shards, or the codes of the image or its flip for code shards.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import warnings

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
    """Decoded sample -> ``(latent, label)``, checking shape and label against the manifest.

    ``train=True`` draws a posterior sample of the image or its flip (VAE shards), picks the codes of the
    image or its flip (code shards), and flips PNG images half the time when ``image_flip`` is set;
    ``train=False`` uses the posterior mean, the codes or the pixels of the image itself, so validation is
    deterministic.
    """

    def __init__(self, manifest: dict, scale: float, shift: float, train: bool, image_flip: bool = False):
        self.format = manifest["format"]
        self.shape = tuple(manifest["latent_shape"])
        self.num_classes = manifest["num_classes"]
        self.scale, self.shift, self.train, self.image_flip = scale, shift, train, image_flip

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        key = sample.get("__key__")
        fields = shards.FORMATS[self.format]
        missing = [f for f in ["cls", *fields] if f not in sample]
        if missing:
            raise ValueError(f"sample {key!r} lacks {', '.join(missing)}")
        label = int(sample["cls"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {key!r} has label {label}, outside [0, {self.num_classes})")
        flip = self.train and bool(torch.rand(()) < 0.5)  # training: the image or its mirror image
        if self.format == shards.IMAGE:
            latent = image_to_tensor(sample[shards.IMAGE])
            if flip and self.image_flip:
                latent = latent.flip(-1)
        elif self.format == shards.CODES:  # int64 codes [h, w]
            latent = torch.from_numpy(sample[shards.CODES_FLIP if flip else shards.CODES]).long()
        else:
            moments = torch.from_numpy(sample[shards.LATENT_FLIP if flip else shards.LATENT]).float()
            c, h, w = self.shape
            if moments.shape != (2 * c, h, w):
                raise ValueError(
                    f"sample {key!r} has moments {tuple(moments.shape)}, expected {(2 * c, h, w)}"
                )
            if self.train:
                latent = sample_posterior(moments[None], self.scale, self.shift)[0]
            else:
                latent = (moments[:c] - self.shift) * self.scale
        if latent.shape != self.shape:
            raise ValueError(f"sample {key!r} has shape {tuple(latent.shape)}, expected {self.shape}")
        return latent, label


def collate(examples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    latents, labels = zip(*examples, strict=True)
    return {"latent": torch.stack(latents), "label": torch.tensor(labels, dtype=torch.int64)}


def _shard_seed(rank: int) -> int:
    """Seed of ``ResampledShards`` per (rank, worker), from the trainer's rank rather than the environment."""
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (0 if info is None else info.id)


class ShardDataModule(L.LightningDataModule):
    """Class-conditional batches from a ``lina data build`` directory (PNG pixels or cached VAE moments)."""

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
        image_flip: bool = False,
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
            image_flip: PNG shards: flip training images horizontally half the time (ImageNet recipes;
                leave it off for digits, whose classes are not mirror-symmetric).
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
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def class_names(self) -> list[str]:
        return self.manifest["class_names"]

    @property
    def image_size(self) -> tuple[int, int]:
        """Pixel height and width of the images the shards were made from."""
        return tuple(self.manifest["resolution"])

    @property
    def channels(self) -> int:
        """Image channels (1 for grayscale, 3 for RGB), whatever the shards store."""
        return self.manifest["channels"]

    @property
    def format(self) -> str:
        """``"image.png"`` or ``"latent.npy"``."""
        return self.manifest["format"]

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape ``(c, h, w)`` of one ``batch["latent"]`` item."""
        return tuple(self.manifest["latent_shape"])

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
            wds.batched(self.batch_size, collation_fn=collate, partial=False),
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
        batch = collate(examples)
        return StackDataset(latent=batch["latent"], label=batch["label"])

    @property
    def val_dataset(self) -> StackDataset:
        """The validation split in memory (read once): items ``{"latent": [c, h, w], "label": int64}``."""
        if self._val_dataset is None:
            self._val_dataset = self._load_split("val", self.val_samples)
        return self._val_dataset

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank_and_world_size()
        sampler = None
        if world_size > 1:
            # pads by repeating samples so every rank runs the same number of steps
            sampler = DistributedSampler(
                self.val_dataset, num_replicas=world_size, rank=rank, shuffle=False, drop_last=False
            )
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, sampler=sampler, shuffle=False)

    def real_images(self, split: str = "val") -> tuple[np.ndarray, np.ndarray]:
        """uint8 images ``[N, H, W, C]`` and int64 labels ``[N]`` of a split (PNG shards only), for metrics.

        The whole split is held in memory: meant for validation sets and small data such as digits.
        """
        if self.format != shards.IMAGE:
            raise ValueError(
                f"real_images needs image.png shards; {self.root} holds {self.format} (encoded, not pixels)"
            )
        dataset = self.val_dataset if split == "val" else self._load_split(split)
        pixels = dataset.datasets["latent"]
        images = ((pixels + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return images.permute(0, 2, 3, 1).numpy(), dataset.datasets["label"].numpy()
