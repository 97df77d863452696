"""Preset table and ``create_model(name, **overrides)``.

Paper presets reproduce the trainable parameter counts of ``reference/lina.md`` §1.2 (final
"kvscale1" models: 362.35M / 643.30M / ≈1445.4M for MAR KL-16 tokens at 256 px) and of
``reference/lasad.md`` §2.5 / §3.1 (LlamaGen B/L/XL/XXL 110.9M / 342.9M / 774.7M / 1.41B; LASAD within 1%).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lina_pl.models.lasad import RasterConfig, RasterGenerator
from lina_pl.models.lina import LinaConfig, LinaGenerator

_IMAGENET_256 = dict(token_channels=16, grid=(16, 16), cond_grid=(8, 8), num_classes=1000)

PRESETS: dict[str, tuple[type[nn.Module], type, dict[str, Any]]] = {
    "lina_c2i_d48w768": (LinaGenerator, LinaConfig, dict(dim=768, heads=12, **_IMAGENET_256)),
    "lina_c2i_d48w1024": (LinaGenerator, LinaConfig, dict(dim=1024, heads=16, **_IMAGENET_256)),
    "lina_c2i_d48w1536": (LinaGenerator, LinaConfig, dict(dim=1536, heads=16, **_IMAGENET_256)),
    # tiny models for the digits demo (~1M parameters) and for tests (seconds on a CPU)
    "lina_c2i_demo": (
        LinaGenerator,
        LinaConfig,
        dict(
            dim=96,
            heads=4,
            cond_depth=2,
            encoder_depth=2,
            decoder_depth=2,
            head_depth=3,
            head_width=128,
            token_channels=4,
            grid=(8, 8),
            cond_grid=(4, 4),
            num_classes=10,
            loss_repeat=4,
        ),
    ),
    "lina_c2i_tiny": (
        LinaGenerator,
        LinaConfig,
        dict(
            dim=32,
            heads=2,
            cond_depth=1,
            encoder_depth=1,
            decoder_depth=1,
            head_depth=2,
            token_channels=4,
            grid=(4, 4),
            cond_grid=(2, 2),
            num_classes=10,
            loss_repeat=2,
        ),
    ),
}


_RASTER_SIZES = {"b": (12, 768, 12), "l": (24, 1024, 16), "xl": (36, 1280, 20), "xxl": (48, 1536, 24)}
for _size, (_depth, _dim, _heads) in _RASTER_SIZES.items():
    for _family, _mixer in (("lasad", "lasad"), ("llamagen", "softmax")):
        PRESETS[f"{_family}_{_size}"] = (
            RasterGenerator,
            RasterConfig,
            dict(depth=_depth, dim=_dim, heads=_heads, mixer=_mixer),
        )
for _family, _mixer in (("lasad", "lasad"), ("llamagen", "softmax")):
    PRESETS[f"{_family}_tiny"] = (
        RasterGenerator,
        RasterConfig,
        dict(
            depth=2,
            dim=32,
            heads=2,
            expand_ratio=16,
            vocab_size=64,
            grid=(4, 4),
            num_classes=10,
            mixer=_mixer,
        ),
    )


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset, with any config field overridden (e.g. ``grid=(8, 8)``, ``decoder_mixer="inline"``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(sorted(PRESETS))}")
    model_cls, config_cls, preset = PRESETS[name]
    return model_cls(config_cls(**(preset | overrides)))
