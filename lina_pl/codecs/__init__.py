"""Codecs map images to generator tokens and back, behind one interface (:class:`TokenCodec`).

Continuous codecs (LINA): ``patchify`` needs no weights (pixels are the latent); ``diffusers`` wraps an
AutoencoderKL loaded from a local directory; tokens are ``p×p`` patches of the latent grid. Discrete
tokenizers (raster models): ``kmeans`` (fitted on the shards, ``lina tokenizer fit``) and ``llamagen_vq``
(LlamaGen's VQ-16 from a local checkpoint). All work on float images in ``[-1, 1]``, ``[B, C, H, W]``.
"""

from typing import Any

from lina_pl.codecs.base import Codec, TokenCodec, patchify, unpatchify
from lina_pl.codecs.discrete import DiscreteTokenizer
from lina_pl.codecs.patchify import PatchifyCodec

CODECS = ("patchify", "diffusers", "kmeans", "llamagen_vq")


def create_codec(name: str, **options: Any) -> TokenCodec:
    """Build a codec from plain config values (so checkpoints store a name and options, never weights).

    ``patchify``: ``channels``, ``patch_size``. ``diffusers``: ``path`` (a local AutoencoderKL directory),
    ``patch_size``, ``scaling_factor``, ``shift_factor``, ``device``. ``kmeans``: ``path`` (an .npz from
    ``lina tokenizer fit``), or ``codebook``, ``patch_size``, ``channels`` (what a checkpoint keeps of it).
    ``llamagen_vq``: ``path`` (a LlamaGen VQ checkpoint such as ``vq_ds16_c2i.pt``), ``l2_norm``, ``device``.
    """
    if name == "patchify":
        return PatchifyCodec(**options)
    if name == "diffusers":
        from lina_pl.codecs.diffusers_vae import DiffusersVAECodec  # needs the optional diffusers

        return DiffusersVAECodec(**options)
    if name == "kmeans":
        from lina_pl.codecs.kmeans import KMeansTokenizer

        if set(options) == {"codebook", "patch_size", "channels"}:
            return KMeansTokenizer(**options)
        if set(options) != {"path"}:
            raise ValueError(f"the kmeans tokenizer takes exactly one option, path; got {sorted(options)}")
        return KMeansTokenizer.load(options["path"])
    if name == "llamagen_vq":
        from lina_pl.codecs.llamagen_vq import LlamaGenVQTokenizer

        return LlamaGenVQTokenizer(**options)
    raise ValueError(f"unknown codec {name!r}; choose from {', '.join(CODECS)}")


__all__ = [
    "CODECS",
    "Codec",
    "DiscreteTokenizer",
    "PatchifyCodec",
    "TokenCodec",
    "create_codec",
    "patchify",
    "unpatchify",
]
