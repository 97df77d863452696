"""Small helpers shared by the tests."""

import subprocess
import sys
from pathlib import Path

import lightning as L
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


def lina_error(*args, cwd):
    """Run `lina ARGS` expecting a user error: exit status 1 and no traceback; returns the error line."""
    result = subprocess.run(
        [str(LINA), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lina {args[0]}: error: "), result.stderr
    return last


def save_untrained(path, **options):
    """Write a real Lightning checkpoint of a freshly built (untrained) ``GeneratorModule``."""
    from lina_pl.lightning import GeneratorModule

    module = GeneratorModule(**options)
    module.configure_model()
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, default_root_dir=path.parent
    )
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


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
