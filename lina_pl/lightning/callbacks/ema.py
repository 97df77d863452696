"""EMA of the generator's weights as a callback, kept in fp32 whatever the training precision.

Why not Lightning's ``WeightAveraging``: it deep-copies the whole LightningModule (frozen codecs and text
encoders included) into an ``AveragedModel`` in the parameters' own dtype, so under DeepSpeed's bf16
weights the EMA becomes bf16 (at decay 0.99 a bf16 EMA barely moves), and it builds that copy outside the
strategy, so it cannot stay sharded under FSDP2 / ZeRO-3. Here the EMA is one fp32 tensor per generator
parameter, made from the parameter itself (a sharded parameter gives a sharded copy), updated every
``every_n_steps`` optimizer steps, swapped into the generator for validation (so the val loss and the
sample grid use it), and stored in the checkpoint as ``ema_state_dict``, which ``lina sample`` loads.

Under FSDP2 the EMA tensors are DTensors sharded like the weights. A sharded (distributed) checkpoint
stores them beside the weights as ``state_dict["ema_state_dict.<name>"]``, so each rank writes and reads its
own shard (on any number of ranks); a full checkpoint gathers them. DeepSpeed ZeRO-3 partitions parameters
outside torch's view (an EMA of its placeholders would be wrong), so the EMA refuses it; ZeRO-2 is fine.
"""

from __future__ import annotations

from pathlib import Path
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
        self._sharded_checkpoint: Path | None = None  # a distributed checkpoint to read the EMA shards from
        self._last_step = -1
        self._swapped = False

    def _parameters(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        """The generator's parameters, sharded again first under FSDP2: a forward without a backward (the
        sample grid, the val loss) leaves the root's parameters gathered, as plain tensors."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(pl_module.generator, FSDPModule):
            pl_module.generator.reshard()
        return dict(pl_module.generator.named_parameters())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Build the EMA now, not at fit start: FSDP2 and DeepSpeed restore a checkpoint after fit start."""
        deepspeed = getattr(getattr(trainer, "strategy", None), "config", None)
        if isinstance(deepspeed, dict) and deepspeed.get("zero_optimization", {}).get("stage") == 3:
            raise ValueError("the EMA callback does not support DeepSpeed ZeRO-3; use FSDP2 or ZeRO-2")
        params = self._parameters(pl_module)
        source = self._restored if self._restored is not None else params
        missing = sorted(set(params) - set(source))
        if missing:
            raise ValueError(f"the checkpoint's EMA lacks {missing[:4]}…; it belongs to another model")
        self.weights = {
            n: source[n].detach().to(p.device, torch.float32, copy=True) for n, p in params.items()
        }
        self._restored = None
        if self._sharded_checkpoint is not None:
            from torch.distributed.checkpoint import load

            load({"state_dict": self._sharded_keys()}, checkpoint_id=self._sharded_checkpoint)
            self._sharded_checkpoint = None

    def _sharded_keys(self) -> dict[str, torch.Tensor]:
        return {f"{EMA_KEY}.{n}": w for n, w in self.weights.items()}

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
        sharded = any(hasattr(w, "full_tensor") for w in self.weights.values())
        if sharded and getattr(trainer.strategy, "_save_distributed_checkpoint", False):
            checkpoint["state_dict"].update(self._sharded_keys())  # written shard by shard with the weights
            return
        # full tensors (gathering a DTensor is a collective: every rank runs this hook)
        checkpoint[EMA_KEY] = {
            n: (w.full_tensor() if hasattr(w, "full_tensor") else w.detach()).clone()
            for n, w in self.weights.items()
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._restored = checkpoint.get(EMA_KEY)
        path = Path(trainer.ckpt_path) if trainer.ckpt_path else None
        if self._restored is None and path is not None and path.is_dir():
            self._sharded_checkpoint = path

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
