"""``lina fit | validate | test | predict``: LightningCLI over any LightningModule / DataModule.

Configs pick classes with ``class_path``/``init_args`` (subclass mode), may use OmegaConf
interpolation resolved on the merged config (``omegaconf+``), and are saved with each run. Data-derived
sizes (image size, channels, classes) flow into the model through links, so a config never repeats them.
"""

from __future__ import annotations

import sys

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI


class LinaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for source, target in (
            ("data.image_size", "model.init_args.image_size"),
            ("data.channels", "model.init_args.image_channels"),
            ("data.num_classes", "model.init_args.num_classes"),
        ):
            parser.link_arguments(source, target, apply_on="instantiate")


def build_cli(args: list[str] | None, run: bool = True) -> LinaCLI:
    """The CLI object; ``run=False`` gives ``cli.model``, ``cli.datamodule``, ``cli.trainer`` (notebooks)."""
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    return LinaCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
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
