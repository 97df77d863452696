"""Codecs map images to continuous latents and back; tokens are ``p×p`` patches of the latent grid.

``patchify`` needs no weights (pixels are the latent); ``diffusers`` wraps an AutoencoderKL loaded from a
local directory. Every codec works on float images in ``[-1, 1]``, ``[B, C, H, W]``.
"""

from lina_pl.codecs.base import Codec, patchify, unpatchify
from lina_pl.codecs.patchify import PatchifyCodec

__all__ = ["Codec", "PatchifyCodec", "patchify", "unpatchify"]
