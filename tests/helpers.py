"""Small helpers shared by the tests."""

import subprocess
import sys
from pathlib import Path

import torch

LINA = Path(sys.executable).parent / "lina"


def run_lina(*args, cwd):
    """Run the installed `lina` console script; fail the test with its output if it fails."""
    result = subprocess.run(
        [str(LINA), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 0, (
        f"lina {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    )
    return result


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
