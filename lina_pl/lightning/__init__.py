"""LightningModules and the LightningCLI entry point."""

from lina_pl.lightning.c2i import LinaC2I

__all__ = ["LinaC2I"]
