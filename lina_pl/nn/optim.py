"""Optimizer parameter groups with explicit weight-decay exclusions.

A module opts parameters out of weight decay by listing their local names in a class attribute
``no_weight_decay_params`` (LINA's KV gates, HGRN2's lower bounds): AdamW's decay would otherwise pull
gates toward 0, where the division becomes unstable (``reference/lina.md`` §6.2).
"""

from __future__ import annotations

from torch import nn

NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters of norm layers and of those listed in ``no_weight_decay_params``."""
    names = set()
    for prefix, module in model.named_modules():
        local_names = list(getattr(module, "no_weight_decay_params", ()))
        if isinstance(module, NORM_LAYERS):
            local_names += [n for n, _ in module.named_parameters(recurse=False)]
        for local in local_names:
            if isinstance(getattr(module, local, None), nn.Parameter):
                names.add(f"{prefix}.{local}" if prefix else local)
    return names


def parameter_groups(model: nn.Module, weight_decay: float, *, decay_1d: bool = False) -> list[dict]:
    """Two AdamW groups: decayed and not decayed.

    Never decayed: norm-layer parameters and those listed in ``no_weight_decay_params``. Other
    parameters with fewer than two dimensions (biases) are decayed only with ``decay_1d=True``: off is
    LlamaGen's rule (decay ≥2-D weights), on is LINA's original recipe (everything but norms).
    """
    excluded = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in excluded or (param.dim() < 2 and not decay_1d):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
