"""The ``lina`` console script.

Subcommands are added as the package grows; each one is a thin dispatcher to a module with its own
``main(argv)``, so ``python -m <module>`` and ``lina <command>`` behave the same. A user error of any
command is one line on stderr and exit status 1 (2 for a bad option); ``lina --debug COMMAND …`` or
``LINA_DEBUG=1`` shows its traceback (see :mod:`lina_pl.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lina_pl.errors import DEBUG_ENV, ArgumentParser, user_error

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
    "consolidate": (
        "lina_pl.lightning.consolidate",
        "turn a sharded FSDP2 checkpoint directory into one file (`lina consolidate DIR --out FILE`)",
    ),
    "ablate": (
        "lina_pl.commands.ablate",
        "train the variants of an ablation suite over seeds, write a table (`lina ablate --suite lasad`)",
    ),
    "bench": ("lina_pl.bench", "benchmarks that print JSON (e.g. `lina bench attention`)"),
    "data": (
        "lina_pl.data.build",
        "build webdataset shards (`lina data build --help`) and check them (`lina data verify DIR`)",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="lina",
        description="Autoregressive image generation with linear attention (LINA, LASADGen and baselines).",
    )
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error (the same as {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--debug"]:
        os.environ[DEBUG_ENV] = "1"  # inherited by the processes a multi-process fit starts
        argv = argv[1:]
        if from_command_line:
            del sys.argv[1]  # LightningCLI and DDP launchers read sys.argv themselves
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    debug = os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    try:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if module.__name__ == "lina_pl.lightning.cli":  # LightningCLI parses the subcommand itself
            return module.main(argv) or 0
        return module.main(argv[1:]) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lina {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error(err)
        if message is None or debug:
            raise
        if isinstance(err, argparse.ArgumentError):  # a bad option of `lina fit | validate`
            print(f"lina {argv[0]}: error: {message} (see `lina {argv[0]} --help`)", file=sys.stderr)
            return 2
        print(f"lina {argv[0]}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
