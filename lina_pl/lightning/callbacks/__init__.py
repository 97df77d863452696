"""Callbacks that run on every rank: EMA weights, sample grids, sample metrics (FID, KID, IS,
precision/recall), throughput; and the two every `lina fit` gets: saving on a stop signal (Preemption) and
stopping on a non-finite loss (NonFiniteGuard)."""

from lina_pl.lightning.callbacks.ema import EMA, EMA_KEY
from lina_pl.lightning.callbacks.evaluation import Evaluation
from lina_pl.lightning.callbacks.non_finite import NonFiniteGuard
from lina_pl.lightning.callbacks.preemption import Preemption
from lina_pl.lightning.callbacks.sample_grid import SampleGrid
from lina_pl.lightning.callbacks.throughput import Throughput

__all__ = ["EMA", "EMA_KEY", "Evaluation", "NonFiniteGuard", "Preemption", "SampleGrid", "Throughput"]
