"""A tiny raster fit on one fixed global batch under a chosen strategy, run by ``tests/test_scale.py``.

Why a script: Lightning's DDP and ModelParallel launchers start the other ranks by re-running the command
line, which must be a program, not a pytest session. Every rank reads its own rows of the same global
batch of 8 (split over ranks, then over accumulated micro-batches), and dropout is off, so the loss is
deterministic and every strategy must end at the same weights.

    python tests/distributed_fit.py OUT --strategy single|ddp|fsdp2|deepspeed_stage_2 --devices N \
        --steps S [--accumulate K] [--activation-checkpointing] [--resume CKPT] [--accelerator gpu]

Writes ``OUT/last.ckpt`` (a file, or a sharded directory under FSDP2) and, on rank 0, ``OUT/final.pt``:
the generator's full weights, its EMA, the loss of every step and each rank's random draw at the last step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lina_pl.codecs.kmeans import KMeansTokenizer
from lina_pl.lightning import EMA, GeneratorModule
from lina_pl.lightning.strategies import FSDP2Strategy

GLOBAL_BATCH = 8


class FixedBatches(L.LightningDataModule):
    """This rank's rows of one fixed global batch, cut into ``accumulate`` micro-batches, for every step."""

    def __init__(self, steps: int, accumulate: int):
        super().__init__()
        self.steps, self.accumulate = steps, accumulate

    def train_dataloader(self) -> DataLoader:
        seeded = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 64, (GLOBAL_BATCH, 4, 4), generator=seeded)
        labels = torch.arange(GLOBAL_BATCH) % 10
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_rank = GLOBAL_BATCH // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        examples = [(c, y) for c, y in zip(codes[rows], labels[rows], strict=True)] * self.steps
        return DataLoader(examples, batch_size=per_rank // self.accumulate, collate_fn=_collate)


def _collate(examples):
    codes, labels = zip(*examples, strict=True)
    return {"latent": torch.stack(codes), "label": torch.stack(labels)}


class Record(L.Callback):
    """Keeps the global batch's loss at every step and one value drawn from the global RNG right after the
    module's per-step reseed (it shows whether ranks share an RNG)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.draw = torch.rand(()).item()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean").item())


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank calls it), a plain tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--strategy", choices=("single", "ddp", "fsdp2", "deepspeed_stage_2"), default="single"
    )
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)

    tokenizer = args.out / "tokenizer.npz"
    if not tokenizer.exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        KMeansTokenizer(torch.rand(64, 4, generator=torch.Generator().manual_seed(1)), 2, 1).save(tokenizer)
    module = GeneratorModule(
        generator="lasad_tiny",
        generator_options={"token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0},
        codec="kmeans",
        codec_options={"path": str(tokenizer)},
        condition_options={"dropout": 0.0},
        image_size=(8, 8),
        num_classes=10,
        lr=1e-2,
        activation_checkpointing=args.activation_checkpointing,
    )
    if args.strategy == "fsdp2":
        strategy = FSDP2Strategy()
    else:
        strategy = {"single": "auto"}.get(args.strategy, args.strategy)
    ema, record = EMA(decay=0.5), Record()
    trainer = L.Trainer(
        accelerator=args.accelerator,
        precision=args.precision,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        accumulate_grad_batches=args.accumulate,
        callbacks=[ema, record],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    trainer.fit(module, FixedBatches(args.steps, args.accumulate), ckpt_path=args.resume)
    trainer.save_checkpoint(args.out / "last.ckpt")

    weights = {n: full(p.detach()).clone() for n, p in module.generator.named_parameters()}
    averaged = {n: full(w).clone() for n, w in ema.weights.items()}
    draws = [None] * trainer.world_size
    if trainer.world_size > 1:
        torch.distributed.all_gather_object(draws, record.draw)
    else:
        draws = [record.draw]
    if trainer.global_rank == 0:
        final = {"weights": weights, "ema": averaged, "draws": draws, "losses": record.losses}
        torch.save(final, args.out / "final.pt")


if __name__ == "__main__":
    main()
