"""The LightningModule (any generator, codec and condition), its callbacks, the FSDP2 strategy, and the
LightningCLI."""

from lina_pl.lightning.callbacks import EMA, Evaluation, SampleGrid, Throughput
from lina_pl.lightning.module import GeneratorModule
from lina_pl.lightning.strategies import FSDP2Strategy

__all__ = ["EMA", "Evaluation", "FSDP2Strategy", "GeneratorModule", "SampleGrid", "Throughput"]
