"""The LightningModule (any generator, codec and condition), its callbacks, and the LightningCLI."""

from lina_pl.lightning.callbacks import EMA, SampleGrid, Throughput
from lina_pl.lightning.module import GeneratorModule

__all__ = ["EMA", "GeneratorModule", "SampleGrid", "Throughput"]
