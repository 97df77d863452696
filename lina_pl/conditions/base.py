"""The condition seam: what a generator is conditioned on, as prefix tokens, with its null for CFG.

A generator never looks at labels or prompts itself. It hands the batch to its condition module, which reads
the fields it knows (``label``; later ``text`` / ``text_emb``), returns prefix tokens ``[B, P, D]`` and, in
training, replaces rows by the null condition with probability ``dropout`` so one network learns both the
conditional and the unconditional model that classifier-free guidance mixes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn


class Condition(nn.Module, ABC):
    """Batch fields -> condition tokens ``[B, num_tokens, dim]``; ``null(n)`` gives the CFG null rows."""

    #: the batch keys this condition reads (a batch without them is an error naming them)
    keys: tuple[str, ...]
    #: prefix tokens per sample (1 for a class, the padded prompt length for text)
    num_tokens: int

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"condition dropout must be in [0, 1), got {dropout}")
        self.dim, self.dropout = dim, dropout

    def check(self, batch: Mapping[str, Any]) -> None:
        missing = [k for k in self.keys if k not in batch]
        if missing:
            raise ValueError(
                f"the batch has no {', '.join(missing)} (fields: {', '.join(sorted(batch))}); "
                f"a {type(self).__name__} needs {', '.join(self.keys)}"
            )

    @abstractmethod
    def forward(self, batch: Mapping[str, Any]) -> Tensor:
        """Condition tokens for the batch; in training mode rows drop to the null condition at ``dropout``."""

    @abstractmethod
    def null(self, batch_size: int) -> Tensor:
        """The null condition's tokens ``[batch_size, num_tokens, dim]`` (the unconditional CFG branch)."""

    @abstractmethod
    def batch_size(self, batch: Mapping[str, Any]) -> int:
        """Number of samples the condition fields describe."""

    @abstractmethod
    def display_batch(self, values: Sequence[Any], repeat: int) -> dict[str, Any]:
        """A condition batch for human-chosen ``values`` (classes, prompts), each repeated ``repeat`` times:
        what sample grids and ``lina sample`` generate from."""

    @abstractmethod
    def default_display_values(self) -> list[Any]:
        """Values a sample grid shows when none are configured."""
