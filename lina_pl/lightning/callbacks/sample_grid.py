"""A grid of samples for fixed conditions and seed at each validation, logged to TensorBoard.

Every rank generates (a sharded model needs all ranks in each forward pass); rank 0 logs. With the
:class:`~lina_pl.lightning.callbacks.EMA` callback the grid shows the EMA weights. Class grids are one image
(a row per class); prompt grids log one row per prompt with the prompt as the image tag, so the text stands
beside its samples in TensorBoard.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lina_pl.lightning.callbacks.cadence import EveryNValidations
from lina_pl.lightning.images import make_grid, to_uint8_nhwc


class SampleGrid(EveryNValidations):
    """One row per condition value, ``per_value`` samples each, the same seed every time (so the same
    images are tracked across validations).

    Args:
        values: condition values shown (class indices or prompts); None: the condition's defaults (the
            first 10 classes, or the text condition's display prompts).
        per_value: samples per value (grid columns).
        seed: seed of the samples.
        every_n_validations: draw at every n-th validation (sanity checks are skipped).
        options: sampling options for the grid on top of the module's defaults (e.g. ``{steps: 16}``).
    """

    def __init__(
        self,
        values: list[Any] | None = None,
        per_value: int = 4,
        seed: int = 0,
        every_n_validations: int = 1,
        options: dict[str, Any] | None = None,
    ):
        super().__init__(every_n_validations)
        if per_value < 1:
            raise ValueError(f"per_value must be ≥ 1, got {per_value}")
        self.values, self.per_value, self.seed = values, per_value, seed
        self.options = dict(options or {})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.due(trainer):
            return
        condition = pl_module.condition
        values = self.values if self.values is not None else condition.default_display_values()
        batch = condition.display_batch(values, self.per_value)
        images = pl_module.sample_images(batch, pl_module.sampling_options(**self.options), seed=self.seed)
        experiment = getattr(trainer.logger, "experiment", None)
        if not trainer.is_global_zero or not hasattr(experiment, "add_image"):
            return
        pixels = to_uint8_nhwc(images)
        if "text" not in batch:
            grid = make_grid(pixels, nrow=self.per_value, row_labels=[str(v) for v in values])
            experiment.add_image("samples/grid", grid, trainer.global_step, dataformats="HWC")
            return
        for i, prompt in enumerate(values):
            row = make_grid(pixels[i * self.per_value : (i + 1) * self.per_value], nrow=self.per_value)
            experiment.add_image(f"samples/{i:02d} {prompt}", row, trainer.global_step, dataformats="HWC")
