"""Generators (LINA masked AR, raster AR), their contract and the preset registry."""

from lina_pl.models.generator import Generator, SamplingOptions, count_parameters
from lina_pl.models.lina import LinaConfig, LinaGenerator, LinaSampling
from lina_pl.models.raster import RasterConfig, RasterGenerator, RasterSampling
from lina_pl.models.registry import FAMILIES, PRESETS, Preset, create_model, preset

__all__ = [
    "FAMILIES",
    "PRESETS",
    "Generator",
    "LinaConfig",
    "LinaGenerator",
    "LinaSampling",
    "Preset",
    "RasterConfig",
    "RasterGenerator",
    "RasterSampling",
    "SamplingOptions",
    "count_parameters",
    "create_model",
    "preset",
]
