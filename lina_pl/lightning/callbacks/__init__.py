"""Callbacks that run on every rank: EMA weights, sample grids, throughput."""

from lina_pl.lightning.callbacks.ema import EMA, EMA_KEY
from lina_pl.lightning.callbacks.sample_grid import SampleGrid
from lina_pl.lightning.callbacks.throughput import Throughput

__all__ = ["EMA", "EMA_KEY", "SampleGrid", "Throughput"]
