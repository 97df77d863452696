"""The training stream: endless, seeded per rank, and resumable at any batch from the batch count alone.

Each rank reads ``V = max(1, num_workers)`` virtual streams, one per DataLoader worker, interleaved batch by
batch (the DataLoader's in-order round robin): batch ``j`` of a rank is batch ``j // V`` of virtual stream
``j % V``. A virtual stream reads the shards in passes, each pass a seeded permutation of them, in groups of
shards holding at least ``shuffle_buffer`` samples; each group is shuffled as a whole.

Where every example sits (pass, group, slot) and which latent shape it has is fixed by the manifest's
per-shard counts and the seeds, never by the data: a sample lost to damage is counted and reported, and its
slot is filled with a copy of another good sample of its shape (of the group, or of the next group that has
one). So the position after ``n`` batches is arithmetic (``Layout.locate``): resuming at batch ``k`` re-reads
only the groups around it and continues with exactly the batches the uninterrupted run would have seen, on
every rank, without per-rank or per-worker state in the checkpoint. The batch count comes from the trainer
(batches whose step ran), so prefetched batches never shift the stream. Every random draw of a batch (flip,
posterior noise) comes from a generator seeded by (seed, rank, virtual stream, batch index).
"""

from __future__ import annotations

import signal
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lina_pl.data.reader import Examples, LossCounter, ShardError, read_shard
from lina_pl.data.shards import ShardEntry

#: seed purposes (first seed word after the stream key)
_ORDER, _SHAPES, _FILL, _BATCH = range(4)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM and SIGINT to the training process: a signal sent to the whole process
    group (as SLURM and Ctrl-C do) would otherwise kill them mid-batch, and torch would raise in the training
    process before the preemption callback has saved the run."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Layout:
    """The slots of one virtual stream, from per-shard shape counts ``[shards, shapes]`` alone (no data)."""

    def __init__(self, shape_counts: np.ndarray, group_shards: int, batch_size: int, key: tuple[int, ...]):
        self.shape_counts = np.asarray(shape_counts, dtype=np.int64)
        self.totals = self.shape_counts.sum(0)  # slots per shape in one pass
        if not self.totals.any():
            raise ValueError("the manifest lists no training samples")
        self.group_shards, self.batch_size, self.key = group_shards, batch_size, key
        self.groups = -(-len(self.shape_counts) // group_shards)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def rng(self, purpose: int, *parts: int) -> np.random.Generator:
        return np.random.default_rng([*self.key, purpose, *parts])

    def _cached(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = make()
            if len(self._cache) > 16:
                self._cache.popitem(last=False)
        return self._cache[key]

    def shards(self, p: int, g: int) -> np.ndarray:
        """Shard indices of group ``g`` of pass ``p``."""
        order = self._cached(("order", p), lambda: self.rng(_ORDER, p).permutation(len(self.shape_counts)))
        return order[g * self.group_shards : (g + 1) * self.group_shards]

    def counts(self, p: int, g: int) -> np.ndarray:
        return self.shape_counts[self.shards(p, g)].sum(0)

    def slot_shapes(self, p: int, g: int) -> np.ndarray:
        """The latent-shape index of every slot of a group: a seeded shuffle of its shape counts."""

        def make() -> np.ndarray:
            shapes = np.repeat(np.arange(len(self.totals)), self.counts(p, g))
            return self.rng(_SHAPES, p, g).permutation(shapes)

        return self._cached(("shapes", p, g), make)

    def next(self, p: int, g: int) -> tuple[int, int]:
        return (p, g + 1) if g + 1 < self.groups else (p + 1, 0)

    def _previous(self, p: int, g: int) -> tuple[int, int]:
        return (p, g - 1) if g > 0 else (p - 1, self.groups - 1)

    def _emitted(self, seen: np.ndarray) -> int:
        """Batches emitted once ``seen`` slots of each shape were read (one pending list per shape)."""
        return int((seen // self.batch_size).sum())

    def locate(self, n: int) -> tuple[tuple[int, int, int], list[list[tuple[int, int, int]]]]:
        """``((pass, group, slot) of the first unread slot, per shape the slots read but not yet batched)``
        after the stream's first ``n`` batches."""
        pending: list[list[tuple[int, int, int]]] = [[] for _ in self.totals]
        if n == 0:
            return (0, 0, 0), pending
        lo, hi = 0, 1  # the pass: emitted(lo passes) < n <= emitted(hi passes)
        while self._emitted(hi * self.totals) < n:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self._emitted(mid * self.totals) < n else (lo, mid)
        p, g, seen = lo, 0, lo * self.totals
        while self._emitted(seen + self.counts(p, g)) < n:
            seen, g = seen + self.counts(p, g), g + 1
        emitted, shapes, end = self._emitted(seen), self.slot_shapes(p, g), 0
        while emitted < n:
            seen[shapes[end]] += 1
            emitted += seen[shapes[end]] % self.batch_size == 0
            end += 1
        position, need, (q, h) = (p, g, end), seen % self.batch_size, (p, g)
        while need.any() and q >= 0:  # per shape b, the newest need[b] slots of b before the position
            group_shapes = self.slot_shapes(q, h)
            for i in range(end - 1, -1, -1):
                b = group_shapes[i]
                if need[b]:
                    pending[b].insert(0, (q, h, i))
                    need[b] -= 1
            q, h = self._previous(q, h)
            end = len(self.slot_shapes(q, h)) if q >= 0 else 0
        return position, pending


@dataclass(frozen=True)
class StreamFailure:
    """Sent through the DataLoader instead of a batch when the stream cannot go on (raised in the main
    process as a one-line ``ShardError``, not as a worker traceback)."""

    message: str


class _Groups:
    """One virtual stream's reads: the good items of a group (shards read, verified, losses counted) and the
    group's slot contents with lost samples filled. Keeps the two most recent groups (the one being batched
    and the next, which may lend samples), so a worker holds about two groups of decoded samples."""

    def __init__(self, stream: TrainStream, layout: Layout):
        self.stream, self.layout = stream, layout
        self._good: OrderedDict[tuple[int, int], list[list[dict]]] = OrderedDict()
        self._content: OrderedDict[tuple[int, int], list[dict]] = OrderedDict()

    def good(self, p: int, g: int) -> list[list[dict]]:
        """Per latent shape, the good items of the group's shards in file order."""
        if (p, g) not in self._good:
            per_shape: list[list[dict]] = [[] for _ in self.layout.totals]
            for index in self.layout.shards(p, g):
                read = read_shard(self.stream.entries[index], self.stream.examples)
                self.stream.losses.add(int(index), read)
                if read.lost or read.damage:
                    warnings.warn(f"skipping damaged data: {read.describe()}", RuntimeWarning, stacklevel=2)
                for item in read.items:
                    per_shape[item["shape"]].append(item)
            self._good[(p, g)] = per_shape
            if len(self._good) > 2:
                self._good.popitem(last=False)
        return self._good[(p, g)]

    def content(self, p: int, g: int) -> list[dict]:
        """The item of every slot of the group."""
        if (p, g) not in self._content:
            counts, rng, per_shape = self.layout.counts(p, g), self.layout.rng(_FILL, p, g), []
            for b, items in enumerate(self.good(p, g)):
                items = items[: counts[b]]
                if len(items) < counts[b]:
                    pool = items or self._borrow(p, g, b)
                    items = items + [pool[i] for i in rng.integers(len(pool), size=counts[b] - len(items))]
                per_shape.append(iter([items[i] for i in rng.permutation(len(items))]))
            self._content[(p, g)] = [next(per_shape[b]) for b in self.layout.slot_shapes(p, g)]
            if len(self._content) > 2:
                self._content.popitem(last=False)
        return self._content[(p, g)]

    def _borrow(self, p: int, g: int, b: int) -> list[dict]:
        """Good items of shape ``b`` from the next groups: the rest of this pass, then all of the next one."""
        q, h = p, g
        for _ in range(2 * self.layout.groups):
            q, h = self.layout.next(q, h)
            if self.good(q, h)[b]:
                return self.good(q, h)[b]
            if q == p + 1 and h == self.layout.groups - 1:
                break
        shape = self.stream.examples.shapes[b]
        raise ShardError(
            f"a full pass over the {len(self.stream.entries)} training shards in "
            f"{self.stream.root} yielded no readable sample"
            + (f" of latent shape {shape}" if len(self.layout.totals) > 1 else "")
            + f" ({self.stream.losses.lost} samples lost in {self.stream.losses.reads} shard reads; see the "
            f"warnings, or run `lina data verify {self.stream.root}`)"
        )


class TrainStream(IterableDataset):
    """Batches of one rank, starting after its first ``start`` batches (set before each DataLoader iterator
    is created). In a DataLoader worker ``w`` of ``W`` it yields virtual stream ``(w + start) % W``, whose
    batch comes next in the round robin."""

    def __init__(
        self,
        root: str,
        entries: list[ShardEntry],
        shape_counts: np.ndarray,
        examples: Examples,
        losses: LossCounter,
        *,
        batch_size: int,
        group_shards: int,
        seed: int,
        rank: int,
    ):
        super().__init__()
        self.root, self.entries, self.shape_counts = root, entries, shape_counts
        self.examples, self.losses = examples, losses
        self.batch_size, self.group_shards, self.seed, self.rank = batch_size, group_shards, seed, rank
        self.start = 0

    def __iter__(self) -> Iterator[dict | StreamFailure]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        virtual = (worker + self.start) % workers
        try:
            yield from self.batches(virtual, max(0, (self.start - virtual + workers - 1) // workers))
        except ShardError as exn:
            yield StreamFailure(str(exn))

    def layout(self, virtual: int) -> Layout:
        return Layout(self.shape_counts, self.group_shards, self.batch_size, (self.seed, self.rank, virtual))

    def batches(self, virtual: int, n: int) -> Iterator[dict]:
        """Virtual stream ``virtual`` from its batch ``n`` on."""
        layout = self.layout(virtual)
        groups = _Groups(self, layout)
        (p, g, slot), pending = layout.locate(n)
        buckets = [[groups.content(q, h)[i] for q, h, i in positions] for positions in pending]
        while True:
            content, shapes = groups.content(p, g), layout.slot_shapes(p, g)
            for i in range(slot, len(shapes)):
                bucket = buckets[shapes[i]]
                bucket.append(content[i])
                if len(bucket) == self.batch_size:
                    seed = int(layout.rng(_BATCH, n).integers(2**62))
                    yield self.examples.batch(bucket, torch.Generator().manual_seed(seed))
                    bucket.clear()
                    n += 1
            (p, g), slot = layout.next(p, g), 0


class EpochLoader:
    """The training loader: epochs of ``len(self)`` batches cut from one endless ``TrainStream``.

    Each epoch continues the stream where the batches consumed so far end: ``position()`` (the trainer's
    count of batches whose step ran) when given and known, else the batches this loader handed out (or
    ``load_state_dict``'s count). When the running iterator is elsewhere (a resume, or an epoch cut short) the
    stream restarts at that batch. Stateful, so Lightning also treats it as resumable mid-epoch.
    """

    def __init__(
        self,
        stream: TrainStream,
        num_workers: int,
        batches: int,
        position: Callable[[], int | None] | None = None,
    ):
        self.stream, self.num_workers, self.batches, self.position = stream, num_workers, batches, position
        self._handed = 0  # batches handed out (or loaded by load_state_dict)
        self._iterator: Iterator | None = None
        self._at = 0  # the running iterator's position in the stream

    def __len__(self) -> int:
        return self.batches

    def consumed(self) -> int:
        """Batches of the stream consumed so far."""
        known = self.position() if self.position is not None else None
        return self._handed if known is None else known

    def __iter__(self) -> Iterator[dict]:
        start = self.consumed()
        if self._iterator is None or self._at != start:
            self.close()
            self.stream.start = start
            loader = DataLoader(
                self.stream, batch_size=None, num_workers=self.num_workers, worker_init_fn=ignore_stop_signals
            )
            self._iterator = iter(loader)
            self._at = start
        for _ in range(self.batches):
            batch = next(self._iterator)
            if isinstance(batch, StreamFailure):
                self.close()
                raise ShardError(batch.message)
            self._at += 1
            self._handed = self._at
            yield batch

    def close(self) -> None:
        """Stop the worker processes (the next epoch starts new ones where the stream stands)."""
        self._iterator = None

    def state_dict(self) -> dict:
        return {"batches": self.consumed()}

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self._handed = int(state["batches"])
