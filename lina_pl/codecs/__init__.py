"""Codecs map images to continuous latents and back; tokens are ``p×p`` patches of the latent grid.

``patchify`` needs no weights (pixels are the latent); ``diffusers`` wraps an AutoencoderKL loaded from a
local directory. Every codec works on float images in ``[-1, 1]``, ``[B, C, H, W]``.
"""

from typing import Any

from lina_pl.codecs.base import Codec, patchify, unpatchify
from lina_pl.codecs.patchify import PatchifyCodec

CODECS = ("patchify", "diffusers")


def create_codec(name: str, **options: Any) -> Codec:
    """Build a codec from plain config values (so checkpoints store a name and options, never weights).

    ``patchify``: ``channels``, ``patch_size``. ``diffusers``: ``path`` (a local AutoencoderKL directory),
    ``patch_size``, ``scaling_factor``, ``shift_factor``, ``device``.
    """
    if name == "patchify":
        return PatchifyCodec(**options)
    if name == "diffusers":
        from lina_pl.codecs.diffusers_vae import DiffusersVAECodec  # needs the optional diffusers

        return DiffusersVAECodec(**options)
    raise ValueError(f"unknown codec {name!r}; choose from {CODECS}")


__all__ = ["CODECS", "Codec", "PatchifyCodec", "create_codec", "patchify", "unpatchify"]
