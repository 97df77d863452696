"""The contract every generator family keeps, so the LightningModule, ``lina sample`` and the metrics
treat LINA (masked AR, continuous tokens) and the raster family (next-token AR, discrete codes) alike.

- ``loss(batch) -> Tensor``: ``batch["tokens"]`` (``[B, N, C]`` floats or ``[B, N]`` codes) plus the
  fields the generator's condition reads (``label``; later ``text`` / ``text_emb``).
- ``generate(condition, options) -> tokens``: ``condition`` is a batch of condition fields, ``options`` an
  instance of the family's frozen ``Sampling`` dataclass (its fields are the family's sampling knobs).
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lina_pl.conditions import Condition


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """Options shared by every family: the classifier-free guidance scale (1 = off)."""

    cfg: float = 1.0

    def __post_init__(self):
        if not math.isfinite(self.cfg):
            raise ValueError(f"cfg must be a finite number, got {self.cfg}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, family: str, **values: Any) -> SamplingOptions:
        """Build from plain values; a name this family does not use is an error listing the ones it does."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"{family} does not use the sampling option(s) {', '.join(unknown)}; "
                f"its options are {', '.join(cls.names())}"
            )
        return cls(**values)


class Generator(nn.Module, ABC):
    """Base of both families: a config dataclass, a condition module, and the two contract methods."""

    #: the family's sampling options and whether it models continuous tokens or discrete codes
    Sampling: ClassVar[type[SamplingOptions]]
    token_kind: ClassVar[str]
    #: family name used in messages and checkpoints ("lina", "raster")
    family: ClassVar[str]

    def __init__(self, config: Any, condition: Condition):
        super().__init__()
        if condition.dim != config.dim:
            raise ValueError(f"condition width {condition.dim} differs from the generator's {config.dim}")
        self.config = config
        self.condition = condition
        #: recompute each block's activations in the backward pass: less memory, about 1/3 more compute
        self.activation_checkpointing = False

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        """The units FSDP2 shards one by one: the repeated transformer blocks (each runs through
        ``run_block``) and LINA's flow head."""

    def run_block(self, block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``block(*args, **kwargs)``, under activation checkpointing when it is on and gradients flow
        (torch's non-reentrant checkpoint restores the RNG state, so the math is unchanged)."""
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    @abstractmethod
    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """The training objective on one batch (``batch["tokens"]`` + condition fields)."""

    @abstractmethod
    def generate(
        self,
        condition: Mapping[str, Any],
        options: SamplingOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        grid: tuple[int, int] | None = None,
    ) -> Tensor:
        """Sample tokens on ``grid`` (None: the config's) for a batch of condition fields
        (``options=None``: the family's defaults)."""

    def conditions_with_null(self, condition: Mapping[str, Any], guided: bool) -> tuple[Tensor, int]:
        """Condition tokens ``[B, P, D]``, with the null rows appended (``[2B, P, D]``) when ``guided``."""
        c = self.condition(condition)
        b = c.shape[0]
        return (torch.cat([c, self.condition.null(b).to(c.dtype)]) if guided else c), b

    def sampling_options(self, options: SamplingOptions | None) -> SamplingOptions:
        if options is None:
            return self.Sampling()
        if not isinstance(options, self.Sampling):
            raise TypeError(
                f"{self.family} samples with {self.Sampling.__name__}, got {type(options).__name__}"
            )
        return options


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
