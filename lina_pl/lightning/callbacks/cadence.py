"""The cadence shared by the callbacks that generate at validations (sample grids, sample metrics)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class EveryNValidations(Callback):
    """Base of callbacks acting at every ``every_n_validations``-th validation; sanity checks do not count,
    and the count is saved in checkpoints so a resumed run keeps the cadence."""

    def __init__(self, every_n_validations: int = 1):
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be ≥ 1, got {every_n_validations}")
        self.every_n_validations = every_n_validations
        self._validations = 0

    def due(self, trainer: L.Trainer) -> bool:
        """Count this validation; True when it is one to act on."""
        if trainer.sanity_checking:
            return False
        self._validations += 1
        return self._validations % self.every_n_validations == 0

    def state_dict(self) -> dict[str, Any]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._validations = state_dict["validations"]
