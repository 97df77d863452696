"""Small helpers shared by the tests."""

import torch


def randn(*shape, dtype=torch.float64, device="cpu", requires_grad=False):
    return torch.randn(*shape, dtype=dtype, device=device, requires_grad=requires_grad)


def log_decay(*shape, strength=1.0, dtype=torch.float64, device="cpu"):
    """Random log-decays ≤ 0 (``logsigmoid`` of normal logits, scaled by ``strength``)."""
    return torch.nn.functional.logsigmoid(torch.randn(*shape, dtype=dtype, device=device)) * strength


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def rel_rms(a, b):
    """‖a − b‖₂ / ‖b‖₂ (fla's tolerance measure)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
