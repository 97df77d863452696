"""``lina fit | validate``: LightningCLI over the GeneratorModule and any DataModule.

The model section of a config holds the module's arguments directly; the data module is picked with
``class_path``/``init_args``. Configs may use OmegaConf interpolation resolved on the merged config
(``omegaconf+``) and are saved with each run. Data-derived sizes (image size, channels, classes) flow into
the model through links, so a config never repeats them.

Every fit also gets two callbacks, configured under their own keys: ``preemption`` (SIGTERM / SIGUSR1 /
Ctrl-C write ``last.ckpt`` and exit 128 + signum) and ``non_finite`` (a NaN or ±inf loss stops the run, or
skips the step), and writes its checkpoints atomically. A bad option is one error, not a page of usage.
A ``--ckpt_path`` resumes with the config's values (``--model.lr`` fine-tunes), and must hold the same model.
"""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lina_pl.lightning.callbacks import NonFiniteGuard, Preemption
from lina_pl.lightning.checkpoint import AtomicCheckpointIO, check_resume
from lina_pl.lightning.module import GeneratorModule


class LinaCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only the loops this package implements (training and validation)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in (
            ("data.image_size", "model.image_size"),
            ("data.channels", "model.image_channels"),
            ("data.num_classes", "model.num_classes"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")

    def _parse_ckpt_path(self) -> None:
        """Why overridden: Lightning merges the ``--ckpt_path`` checkpoint's hyper-parameters over the parsed
        config, so an explicit ``--model.lr`` or a whole other config silently lose to the checkpoint (and
        the saved config says so). Here the config wins, and a checkpoint of another model is refused."""
        subcommand = self.config.get("subcommand")
        path = subcommand and self.config[subcommand].get("ckpt_path")
        if path:
            check_resume(path, self.config[subcommand].model)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The trainer, writing checkpoints atomically unless the config picked its own CheckpointIO."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def build_cli(args: list[str] | None, run: bool = True) -> LinaCLI:
    """The CLI object; ``run=False`` gives ``cli.model``, ``cli.datamodule``, ``cli.trainer`` (notebooks)."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LinaCLI(
        GeneratorModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # parse errors raise, so that `lina` reports them in one line (lina_pl.errors)
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "exit_on_error": False,
            **{subcommand: {"exit_on_error": False} for subcommand in LinaCLI.subcommands()},
        },
        args=args,
        run=run,
    )


def main(argv: list[str]) -> int:
    # LightningCLI warns when given args while sys.argv holds the same command line
    build_cli(None if argv == sys.argv[1:] else argv)
    return 0
