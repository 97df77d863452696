"""Warm-starting a generator from another run's checkpoint: the T2I resolution curriculum (256 → 512 →
1024 px) and fine-tuning. Every tensor whose shape matches is copied; KV gates of another resolution are
resized (``grid`` gates, by interpolation) or reset to 1 (``absolute`` gates — the original behaviour — or
any gate with ``gates="reset"``); the rest keeps its fresh initialisation and is listed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lina_pl.io import load_torch
from lina_pl.lightning.callbacks.ema import EMA_KEY
from lina_pl.nn.locality import KVGate, resize_log_gate

GATE_MODES = ("resize", "reset")


def source_weights(path: str | Path, use_ema: bool = True) -> dict[str, Tensor]:
    """Generator weights of a lina_pl checkpoint: its EMA when it has one (and ``use_ema``), else the live
    weights, keyed by generator parameter names."""
    from lina_pl.lightning.module import check_format

    checkpoint = load_torch(path, "init_from checkpoint")
    check_format(checkpoint, str(path))
    live = {
        k.removeprefix("generator."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("generator.")
    }
    ema = checkpoint.get(EMA_KEY) if use_ema else None
    return live | (ema or {})


@torch.no_grad()
def transfer_weights(
    generator: nn.Module, source: dict[str, Tensor], gates: str = "resize"
) -> dict[str, list]:
    """Load ``source`` into ``generator`` as far as shapes allow; returns what was ``copied``, ``resized``,
    ``reset`` (gates set to 1), ``kept`` (shape mismatch: fresh init) and ``missing`` (not in the source)."""
    if gates not in GATE_MODES:
        raise ValueError(f"gates must be one of {GATE_MODES}, got {gates!r}")
    report: dict[str, list] = {"copied": [], "resized": [], "reset": [], "kept": [], "missing": []}
    gate_modules = {name: m for name, m in generator.named_modules() if isinstance(m, KVGate)}
    done: set[str] = set()
    for prefix, gate in gate_modules.items():
        names = [f"{prefix}.{n}" for n, _ in gate.named_parameters()]
        if all(
            n in source and source[n].shape == p.shape for n, p in zip(names, gate.parameters(), strict=True)
        ):
            continue  # same resolution: copied below like any tensor
        done.update(names)
        if gate.form == "grid" and gates == "resize" and all(n in source for n in names):
            for grid_name, cond_name in (("key", "key_cond"), ("value", "value_cond")):
                grid, cond = resize_log_gate(
                    source[f"{prefix}.{grid_name}"],
                    source[f"{prefix}.{cond_name}"],
                    gate.n_cond,
                    gate.grid_hw,
                )
                getattr(gate, grid_name).copy_(grid)
                getattr(gate, cond_name).copy_(cond)
            report["resized"].extend(names)
        else:  # absolute gates are tied to token indices: back to 1 (log-gate 0 for grid gates)
            for p in gate.parameters():
                p.fill_(1.0 if gate.form == "absolute" else 0.0)
            report["reset"].extend(names)
    target = generator.state_dict()
    for name, tensor in target.items():
        if name in done:
            continue
        if name not in source:
            report["missing"].append(name)
        elif source[name].shape != tensor.shape:
            report["kept"].append(name)
        else:
            tensor.copy_(source[name])
            report["copied"].append(name)
    return report
