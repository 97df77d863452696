"""Lightning's ``ThroughputMonitor`` with our batch layout built in, so a YAML config can name it."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ThroughputMonitor


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a data batch (every batch carries ``latent``)."""
    return len(batch["latent"])


class Throughput(ThroughputMonitor):
    """Logs samples/s and batches/s per device and in total (``train|…`` scalars), averaged over
    ``window_size`` steps.

    Args:
        window_size: steps averaged per reading.
    """

    def __init__(self, window_size: int = 20):
        super().__init__(batch_size_fn=batch_size, window_size=window_size)
