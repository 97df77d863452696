"""Class-label condition: a learned table with one extra row, the null class, for CFG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lina_pl.conditions.base import Condition


class ClassCondition(Condition):
    """``batch["label"]`` (int64 ``[B]``) -> one token ``[B, 1, D]`` from a ``(num_classes + 1) × D`` table.

    Row ``num_classes`` is the null class. ``norm`` adds a LayerNorm without affine parameters (LINA/NOVA:
    the original's affine is frozen at identity); LlamaGen feeds the raw embedding. Labels outside
    ``0..num_classes`` are an error, never a silent lookup of a neighbouring row.
    """

    keys = ("label",)
    num_tokens = 1

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1, norm: bool = False):
        super().__init__(dim, dropout)
        if num_classes < 1:
            raise ValueError(f"num_classes must be ≥ 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        nn.init.normal_(self.table.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def labels(self, batch: Mapping[str, Any]) -> Tensor:
        self.check(batch)
        labels = torch.as_tensor(batch["label"], device=self.table.weight.device)
        if labels.dim() != 1 or labels.is_floating_point():
            raise ValueError(f"labels must be integers [B], got {labels.dtype} {tuple(labels.shape)}")
        if labels.is_cuda:  # no host sync per training step; the data and `lina sample` check on the CPU
            torch._assert_async(((labels >= 0) & (labels <= self.num_classes)).all())
        elif labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(
                f"labels must lie in 0..{self.num_classes - 1} (or {self.num_classes}, the null class); "
                f"got {labels.min().item()}..{labels.max().item()}"
            )
        return labels

    def embed(self, labels: Tensor) -> Tensor:
        return self.norm(self.table(labels))[:, None]

    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        labels = self.labels(batch)
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.embed(labels)

    def null(self, batch_size: int) -> Tensor:
        device = self.table.weight.device
        return self.embed(torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))

    def batch_size(self, batch: Mapping[str, Any]) -> int:
        self.check(batch)
        return len(batch["label"])

    def display_batch(self, values: Sequence[Any], repeat: int) -> dict[str, Any]:
        labels = torch.tensor([int(v) for v in values], dtype=torch.long).repeat_interleave(repeat)
        return {"label": labels}

    def default_display_values(self) -> list[Any]:
        return list(range(min(self.num_classes, 10)))
