"""Text encoders (frozen, local Hugging Face models) that turn prompts into per-token features."""

from lina_pl.text.encoder import (
    KINDS,
    MINILM_ALIAS,
    TextEncoder,
    detect_kind,
    minilm_path,
    resolve_encoder_path,
    shared_text_encoder,
)

__all__ = [
    "KINDS",
    "MINILM_ALIAS",
    "TextEncoder",
    "detect_kind",
    "minilm_path",
    "resolve_encoder_path",
    "shared_text_encoder",
]
