"""``lina fit | validate``: LightningCLI over the GeneratorModule and any DataModule.

The model section of a config holds the module's arguments directly; the data module is picked with
``class_path``/``init_args``. Configs may use OmegaConf interpolation resolved on the merged config
(``omegaconf+``) and are saved with each run. Data-derived sizes (image size, channels, classes) flow into
the model through links, so a config never repeats them.
"""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

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


def build_cli(args: list[str] | None, run: bool = True) -> LinaCLI:
    """The CLI object; ``run=False`` gives ``cli.model``, ``cli.datamodule``, ``cli.trainer`` (notebooks)."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LinaCLI(
        GeneratorModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
        run=run,
    )


def main(argv: list[str]) -> int:
    # LightningCLI warns when given args while sys.argv holds the same command line
    build_cli(None if argv == sys.argv[1:] else argv)
    return 0
