"""Generators (LINA masked-AR) and the preset registry."""

from lina_pl.models.lina import LinaConfig, LinaGenerator
from lina_pl.models.registry import PRESETS, create_model

__all__ = ["PRESETS", "LinaConfig", "LinaGenerator", "create_model"]
