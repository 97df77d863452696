"""Loading a trained module from a Lightning checkpoint for sampling, evaluation and notebooks."""

from __future__ import annotations

from pathlib import Path

import torch

from lina_pl.lightning.callbacks.ema import EMA_KEY
from lina_pl.lightning.module import GeneratorModule, check_format


def load_module(
    path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True
) -> GeneratorModule:
    """The ``GeneratorModule`` saved in ``path`` in eval mode, with the EMA weights loaded into its generator
    when ``use_ema`` and the run kept an EMA (otherwise the live weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    check_format(checkpoint, str(path))
    # built from the dict already in memory: Lightning's load_from_checkpoint would read the file again
    arguments = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = GeneratorModule(**arguments)
    module.configure_model()
    module.load_state_dict(checkpoint["state_dict"])
    ema = checkpoint.get(EMA_KEY)
    if use_ema and ema is not None:
        missing, unexpected = module.generator.load_state_dict(ema, strict=False)
        parameters = {n for n, _ in module.generator.named_parameters()}
        if unexpected or parameters & set(missing):
            raise ValueError(f"{path}: its EMA weights do not match the generator ({unexpected or missing})")
    return module.eval().to(device)
