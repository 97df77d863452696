"""The ``lina`` console script.

Subcommands are added as the package grows; each one is a thin dispatcher to a module with its own
``main(argv)``, so ``python -m <module>`` and ``lina <command>`` behave the same.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module with a ``main(argv)``, one-line help)
COMMANDS = {
    "fit": (
        "lina_pl.lightning.cli",
        "train a model from a config (`lina fit --config configs/c2i/demo.yaml`)",
    ),
    "validate": ("lina_pl.lightning.cli", "run validation from a config and a checkpoint"),
    "tokenizer": ("lina_pl.commands.tokenizer", "fit the k-means patch tokenizer for raster models"),
    "sample": ("lina_pl.commands.sample", "generate samples.npz (+ PNG grid) for classes or prompts"),
    "evaluate": (
        "lina_pl.commands.evaluate",
        "score samples.npz (class consistency, GenEval on digit scenes)",
    ),
    "bench": ("lina_pl.bench", "benchmarks that print JSON (e.g. `lina bench attention`)"),
    "data": (
        "lina_pl.data.build",
        "build webdataset shards: digits, digit scenes, image folders (`lina data build --help`)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lina",
        description="Autoregressive image generation with linear attention (LINA, LASADGen and baselines).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    if module.__name__ == "lina_pl.lightning.cli":  # LightningCLI parses the subcommand itself
        return module.main(argv) or 0
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
