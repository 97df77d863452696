"""A KL autoencoder from a local diffusers directory as a codec (SD VAE, converted MAR KL-16, tiny test VAEs).

Latents are sampled from the diagonal-Gaussian posterior and normalised as ``(z − shift)·scale`` so the
generator sees roughly unit-variance tokens; shards cache the posterior moments instead of one sample, so
training can draw fresh noise (and a random flip) every epoch, as MAR does.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lina_pl.codecs.base import Codec

#: diffusers clamps the posterior log-variance to this range before taking exp
LOGVAR_RANGE = (-30.0, 20.0)


def sample_posterior(
    moments: Tensor, scale: float = 1.0, shift: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """``[B, 2c, h, w]`` moments (mean ‖ logvar) -> ``(mean + σ·ε − shift)·scale``, ``[B, c, h, w]``."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * noise - shift) * scale


class DiffusersVAECodec(Codec):
    """``diffusers.AutoencoderKL`` loaded from ``path`` (never downloaded); images in ``[-1, 1]``.

    ``scaling_factor``/``shift_factor`` default to the VAE config's values, then to 1.0/0.0; pass them
    explicitly when the config's values are not the ones the latents were normalised with (e.g. 0.2325 for
    MAR's KL-16). ``patch_size`` is 1 for stride-16 VAEs (MAR KL-16) and 2 for stride-8 ones (SD, SDXL).
    """

    name = "diffusers"

    def __init__(
        self,
        path: str,
        patch_size: int = 1,
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        device: str | torch.device = "cpu",
    ):
        from diffusers import AutoencoderKL

        if not Path(path, "config.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a diffusers AutoencoderKL directory (no config.json); "
                "save one with `AutoencoderKL.save_pretrained(dir)`"
            )
        self.path = str(path)
        self.vae = AutoencoderKL.from_pretrained(self.path, local_files_only=True).to(device).eval()
        self.vae.requires_grad_(False)
        config = self.vae.config
        self._channels = config.in_channels
        self.latent_channels = config.latent_channels
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self.patch_size = patch_size
        self.scaling_factor = _first_set(scaling_factor, config.get("scaling_factor"), 1.0)
        self.shift_factor = _first_set(shift_factor, config.get("shift_factor"), 0.0)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def device(self) -> torch.device:
        return self.vae.device

    def describe(self) -> dict:
        """What a shard manifest records about this codec."""
        return {
            "name": "diffusers",
            "path": str(Path(self.path).resolve()),
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
        }

    @torch.no_grad()
    def moments(self, images: Tensor) -> Tensor:
        """Images ``[B, C, H, W]`` in ``[-1, 1]`` -> posterior mean ‖ logvar, ``[B, 2c, H/f, W/f]``."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return torch.cat([posterior.mean, posterior.logvar], dim=1)

    def sample(self, moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One scaled latent drawn from the posterior given by ``moments``."""
        return sample_posterior(moments, self.scaling_factor, self.shift_factor, generator)

    def encode(self, images: Tensor) -> Tensor:
        return self.sample(self.moments(images))

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        z = latents.to(self.device, self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.clamp(-1.0, 1.0)


def _first_set(*values: float | None) -> float:
    return float(next(v for v in values if v is not None))
