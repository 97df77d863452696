"""EMA of the generator's weights as a callback, kept in fp32 whatever the training precision.

Why not Lightning's ``WeightAveraging``: it deep-copies the whole LightningModule (frozen codecs and text
encoders included) into an ``AveragedModel`` in the parameters' own dtype, so under DeepSpeed's bf16
weights the EMA becomes bf16 (at decay 0.99 a bf16 EMA barely moves), and it builds that copy outside the
strategy, so it cannot stay sharded under FSDP2 / ZeRO-3. Here the EMA is one fp32 tensor per generator
parameter, made from the parameter itself (a sharded parameter gives a sharded copy), updated every
``every_n_steps`` optimizer steps, swapped into the generator for validation (so the val loss and the
sample grid use it), and stored in the checkpoint as ``ema_state_dict``, which ``lina sample`` loads.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

#: checkpoint entry holding the EMA weights (generator parameter names -> fp32 tensors)
EMA_KEY = "ema_state_dict"


class EMA(Callback):
    """Exponential moving average ``e ← e + (1 − decay)(w − e)`` of the generator's parameters.

    Args:
        decay: decay per update (LINA: 0.99 every 100 steps, ≈ 0.9999 per step).
        every_n_steps: update after every this many optimizer steps.
    """

    def __init__(self, decay: float = 0.9999, every_n_steps: int = 1):
        if not 0.0 <= decay < 1.0 or every_n_steps < 1:
            raise ValueError(f"need 0 ≤ decay < 1 and every_n_steps ≥ 1, got {decay} and {every_n_steps}")
        self.decay, self.every_n_steps = decay, every_n_steps
        self.weights: dict[str, torch.Tensor] | None = None
        self._restored: dict[str, torch.Tensor] | None = None
        self._last_step = -1
        self._swapped = False

    def _parameters(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return dict(pl_module.generator.named_parameters())

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._parameters(pl_module)
        source = self._restored if self._restored is not None else params
        missing = sorted(set(params) - set(source))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {missing[:4]}…; it belongs to another model")
        self.weights = {
            n: source[n].detach().to(p.device, torch.float32, copy=True) for n, p in params.items()
        }
        self._restored = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:
            return  # no optimizer step since the last update (gradient accumulation), or not due yet
        self._last_step = step
        params = self._parameters(pl_module)
        ema = list(self.weights.values())
        live = [params[n].detach().float() for n in self.weights]
        torch._foreach_lerp_(ema, live, 1.0 - self.decay)

    @torch.no_grad()
    def _swap(self, pl_module: L.LightningModule) -> None:
        params = self._parameters(pl_module)
        for name, ema in self.weights.items():
            live = params[name].detach()
            saved = live.float().clone()
            live.copy_(ema)
            ema.copy_(saved)
        self._swapped = not self._swapped

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.weights is not None and not self._swapped:
            self._swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if self.weights is None:
            return
        if self._swapped:  # checkpoint callbacks run after on_validation_end, so this never happens
            raise RuntimeError("EMA weights are swapped in while a checkpoint is written")
        checkpoint[EMA_KEY] = {n: w.detach().clone() for n, w in self.weights.items()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._restored = checkpoint.get(EMA_KEY)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
