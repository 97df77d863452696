"""Per-token flow-matching head (MAR's "diffusion loss" MLP with AdaLN) and its Euler sampler.

Flow matching as in NOVA/LINA: ``x_σ = σ·ε + (1 − σ)·x₀``, the head predicts the velocity ``ε − x₀``;
``σ`` is logit-normal (``⌊sigmoid(u)·1000⌋ / 1000``, optionally shifted); the timestep fed to the head is
``σ·1000``. Sampling integrates ``dx/dσ = v`` with Euler steps from ``σ = 1`` (noise) to ``σ = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int = 256, base: float = 10000.0) -> Tensor:
    """Sinusoidal ``[cos, sin]`` embedding of (float) timesteps ``[M] -> [M, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Timestep shift ``s·σ / (1 + (s − 1)·σ)`` (identity for ``s = 1``)."""
    return sigma if shift == 1.0 else shift * sigma / (1 + (shift - 1) * sigma)


class AdaLNBlock(nn.Module):
    """Residual MLP block modulated by the condition: ``h += gate ⊙ LN(MLP(LN₀(h)(1 + scale) + shift))``."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.out_norm = nn.LayerNorm(width)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(F.silu(c)).chunk(3, dim=-1)
        return h + gate * self.out_norm(self.mlp(self.norm(h) * (1 + scale) + shift))


class FlowHead(nn.Module):
    """Velocity of one token given its noisy value, σ, and the transformer's output ``z`` at that position.

    Zero-initialised modulations and output layer (DiT/MAR), so training starts from a zero velocity.
    """

    def __init__(self, token_channels: int, cond_dim: int, width: int, depth: int = 6):
        super().__init__()
        self.input_proj = nn.Linear(token_channels, width)
        self.cond_proj = nn.Sequential(nn.Linear(cond_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.time_proj = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, token_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.zeros_(self.input_proj.bias)
        for layer in self.time_proj:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for layer in [*(b.modulation for b in self.blocks), self.final_modulation, self.out]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, sigma: Tensor, z: Tensor) -> Tensor:
        c = self.cond_proj(z) + self.time_proj(timestep_embedding(sigma * 1000.0).to(z.dtype))
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(F.silu(c)).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)


def sample_training_sigma(n: int, device, *, shift: float = 1.0, generator=None) -> Tensor:
    """Logit-normal ``σ`` on the 1000-step grid ``{0, …, 999}/1000`` (NOVA's ``⌊sigmoid(u)·1000⌋``)."""
    u = torch.randn(n, device=device, generator=generator)
    return shift_sigma(torch.floor(torch.sigmoid(u) * 1000.0) / 1000.0, shift)


def flow_matching_loss(head: FlowHead, x0: Tensor, z: Tensor, *, shift: float = 1.0) -> Tensor:
    """Per-token loss ``mean_c (v̂ − (ε − x₀))²`` at a random σ: ``[M, C], [M, D] -> [M]``."""
    sigma = sample_training_sigma(x0.shape[0], x0.device, shift=shift)
    noise = torch.randn_like(x0)
    s = sigma[:, None].to(x0.dtype)
    prediction = head(s * noise + (1 - s) * x0, sigma, z)
    return (prediction.float() - (noise - x0).float()).pow(2).mean(dim=-1)


def euler_sigmas(steps: int, *, shift: float = 1.0, device=None) -> Tensor:
    """``steps`` values from 1 down to 0.001 (linear, then shifted), followed by a final 0."""
    sigmas = shift_sigma(torch.linspace(1.0, 0.001, steps, device=device), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


Velocity = Callable[[Tensor, Tensor], Tensor]


def euler_sample(velocity: Velocity, noise: Tensor, steps: int, *, shift: float = 1.0) -> Tensor:
    """Integrate ``dx/dσ = v(x, σ)`` from ``σ = 1`` (``x = noise``) to 0 with ``steps`` Euler steps."""
    sigmas = euler_sigmas(steps, shift=shift, device=noise.device)
    x = noise
    for i in range(steps):
        sigma = sigmas[i].expand(x.shape[0])
        x = x + velocity(x, sigma) * (sigmas[i + 1] - sigmas[i])
    return x
