"""LightningModules (one per generator family) and the LightningCLI entry point."""

from lina_pl.lightning.c2i import LinaC2I
from lina_pl.lightning.raster import RasterC2I

__all__ = ["LinaC2I", "RasterC2I"]
