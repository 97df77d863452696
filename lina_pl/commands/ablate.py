"""``lina ablate``: the variants of an ablation suite, trained per seed and summarised as a markdown table.

A suite file (``configs/ablations/NAME.yaml``) names a ``base`` config, the ``variants`` (name -> ``lina fit``
overrides), optionally ``args`` that every variant shares and the ``metrics`` of the table (TensorBoard tags;
by default every ``val/*`` and ``eval/*`` tag the runs logged). Every variant × seed is one ``lina fit`` in
``OUT/VARIANT/seedK``: ``--max-steps`` steps, one validation at the last step, ``K`` seeding the model and the
data. Every variant is built before anything trains, so a bad override fails in seconds, not after hours of
the other runs; a run's output goes to its ``fit.log``. The table (``OUT/table.md``) reads each run's last
logged values back from its TensorBoard event files and reports the mean ± sample standard deviation over
seeds; a failed run is marked in it, and the command exits with status 1. ``--resume`` keeps the finished
runs of an earlier call and continues the others from their ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lina_pl.errors import ArgumentParser, user_error
from lina_pl.io import atomic_write

#: where ``--suite NAME`` looks for ``NAME.yaml`` (relative to the working directory, like every config path)
SUITES = Path("configs/ablations")
#: the keys of a suite file
SUITE_KEYS = ("base", "args", "metrics", "variants")
#: written into a run's directory when its fit succeeded; ``--resume`` skips such runs
FINISHED = "finished.json"
#: a variant names a directory
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class Suite:
    name: str
    base: Path
    args: list[str]
    metrics: list[str] | None
    variants: dict[str, list[str]]


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def load_suite(spec: str) -> Suite:
    """The suite ``configs/ablations/SPEC.yaml``, or the suite file ``SPEC``; a wrong one is one error."""
    path = Path(spec)
    if not path.is_file():
        path = SUITES / f"{spec}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in SUITES.glob("*.yaml"))) or "none"
            raise ValueError(f"unknown suite {spec!r}; suites in {SUITES}/: {known} (or give a suite file)")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or set(doc) - set(SUITE_KEYS) or not {"base", "variants"} <= set(doc):
        raise ValueError(f"suite {path}: needs the keys base and variants (optional: args, metrics)")
    base = Path(str(doc["base"]))
    if not base.is_file():
        raise ValueError(f"suite {path}: base config {base} not found (relative to the working directory)")
    variants = doc["variants"]
    if not isinstance(variants, dict) or not variants:
        raise ValueError(f"suite {path}: variants must map names to lists of `lina fit` overrides")
    for name, overrides in variants.items():
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name) or not _strings(overrides):
            raise ValueError(
                f"suite {path}: variant {name!r} must be a name (letters, digits, '_', '.', '-') with a "
                "list of `lina fit` overrides ([] for none)"
            )
    args, metrics = doc.get("args", []), doc.get("metrics")
    if not _strings(args) or not (metrics is None or (_strings(metrics) and metrics)):
        raise ValueError(f"suite {path}: args and metrics must be lists of strings")
    return Suite(path.stem, base, args, metrics, variants)


@dataclass(frozen=True)
class Built:
    """What building a variant tells about its runs."""

    parameters: int
    data_seed: bool  # the data module takes a seed (``--data.init_args.seed``)


def build_variant(args: list[str]) -> Built:
    """Instantiate the model, data module and trainer of ``lina fit ARGS`` and build the generator on the meta
    device: every option is checked and nothing is allocated or written."""
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from lina_pl.lightning.cli import build_cli

    logging.disable(logging.INFO)  # the seed, device and model summary lines of each build
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # sys.argv is ablate's
            cli = build_cli(args, run=False)
        with torch.device("meta"):
            cli.model.configure_model()
    finally:
        logging.disable(logging.NOTSET)
    if not any(isinstance(logger, TensorBoardLogger) for logger in cli.trainer.loggers):
        raise ValueError("the runs need a TensorBoardLogger: the table reads its event files")
    parameters = sum(p.numel() for p in cli.model.generator.parameters())
    return Built(parameters, "seed" in cli.config.data.get("init_args", {}))


def fit_args(suite: Suite, variant: str, seed: int, run_dir: Path, steps: int, data_seed: bool) -> list[str]:
    """The ``lina fit`` arguments of one run; ablate's own settings come last, so they win."""
    return [
        *("--config", str(suite.base)),
        *suite.args,
        *suite.variants[variant],
        *("--trainer.default_root_dir", str(run_dir)),
        *("--trainer.max_steps", str(steps), "--trainer.max_epochs", "-1"),
        # validation counts batches over epochs (epoch-based loaders): exactly once, at the last step
        *("--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(steps)),
        *("--seed_everything", str(seed)),
        *(("--data.init_args.seed", str(seed)) if data_seed else ()),
    ]


def fit(args: list[str], log: Path) -> int:
    """Run ``lina fit ARGS`` with its output in ``log``; its exit status.

    Ctrl-C reaches the fit too (one process group), which saves ``last.ckpt`` before it exits: wait for that
    (``subprocess.run`` would kill it) so that ``--resume`` continues the run.
    """
    with (
        open(log, "a") as out,
        subprocess.Popen(
            [sys.executable, "-m", "lina_pl.cli", "fit", *args], stdout=out, stderr=subprocess.STDOUT
        ) as process,
    ):
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.wait()
            raise


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no output"


def cell(values: list[float]) -> str:
    """Mean ± sample standard deviation over seeds (the value alone for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def table(
    suite: Suite,
    max_steps: int,
    seeds: list[int],
    parameters: dict[str, int],
    scalars: dict[str, dict[int, dict[str, float] | None]],
) -> tuple[str, list[str]]:
    """The markdown table of ``scalars`` (variant -> seed -> the run's last values, None if it failed) and
    the metrics a finished run did not log."""
    finished = [values for runs in scalars.values() for values in runs.values() if values is not None]
    metrics = suite.metrics or sorted(
        {tag for values in finished for tag in values if tag.startswith(("val/", "eval/"))}
    )
    lines = [
        f"# Ablation `{suite.name}`: {max_steps} steps, seeds {' '.join(map(str, seeds))}",
        "",
        f"Base config {suite.base}. Each metric is its last logged value (TensorBoard), mean ± sample "
        "standard deviation over the seeds whose run finished.",
        "",
        "| " + " | ".join(["variant", "parameters", "runs", *metrics]) + " |",
        "|" + "---|" * (3 + len(metrics)),
    ]
    missing = []
    for variant, runs in scalars.items():
        ok = {seed: values for seed, values in runs.items() if values is not None}
        failed = [str(seed) for seed in runs if seed not in ok]
        status = f"{len(ok)}/{len(runs)}" + (f", failed: seed {' '.join(failed)}" if failed else "")
        cells = []
        for metric in metrics:
            lacking = [seed for seed, values in ok.items() if metric not in values]
            missing += [f"{metric} ({variant} seed {seed})" for seed in lacking]
            if not ok:
                cells.append("failed")
            else:
                cells.append("missing" if lacking else cell([values[metric] for values in ok.values()]))
        row = [variant, f"{parameters[variant]:,}", status, *cells]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", missing


@dataclass(frozen=True)
class Run:
    variant: str
    seed: int
    dir: Path
    args: list[str]  # of `lina fit`
    done: bool  # finished by an earlier call (--resume)


def build_all(suite: Suite, seed: int, out: Path, max_steps: int) -> dict[str, Built]:
    """Build every variant (as its run with ``seed`` would); a bad one is one error naming it."""
    built = {}
    for variant in suite.variants:
        start = time.perf_counter()
        try:
            built[variant] = build_variant(
                fit_args(suite, variant, seed, out / variant / f"seed{seed}", max_steps, data_seed=False)
            )
        except Exception as err:
            message = user_error(err)
            if message is None:
                raise
            raise ValueError(f"variant {variant!r} of suite {suite.name} does not build: {message}") from err
        elapsed = time.perf_counter() - start
        print(f"{variant}: builds, {built[variant].parameters:,} parameters ({elapsed:.1f} s)")
    return built


def execute(runs: list[Run]) -> tuple[dict[str, dict[int, dict[str, float] | None]], list[str]]:
    """Fit the runs not done yet, one line each; every run's last scalars (None if it failed) and the
    failures."""
    from lina_pl.lightning.scalars import last_scalars

    scalars: dict[str, dict[int, dict[str, float] | None]] = {}
    failures = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.variant} seed {run.seed}: ", end="", flush=True)
        results = scalars.setdefault(run.variant, {})
        if run.done:
            print("finished earlier, kept")
            results[run.seed] = last_scalars(run.dir)
            continue
        run.dir.mkdir(parents=True, exist_ok=True)
        checkpoint = run.dir / "checkpoints" / "last.ckpt"  # an interrupted run continues
        resume = ["--ckpt_path", str(checkpoint)] if checkpoint.is_file() else []
        start = time.perf_counter()
        status = fit([*run.args, *resume], run.dir / "fit.log")
        elapsed = time.strftime("%H:%M:%S", time.gmtime(time.perf_counter() - start))
        if status != 0:
            reason = last_line(run.dir / "fit.log")
            print(f"FAILED (exit {status}) after {elapsed}: {reason}")
            failures.append(f"{run.variant} seed {run.seed} ({run.dir / 'fit.log'}: {reason})")
            results[run.seed] = None
            continue
        atomic_write(run.dir / FINISHED, lambda tmp, a=run.args: tmp.write_text(json.dumps({"args": a})))
        print(f"finished in {elapsed}")
        results[run.seed] = last_scalars(run.dir)
    return scalars, failures


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="lina ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--suite", required=True, help=f"a suite name ({SUITES}/NAME.yaml) or a suite file")
    parser.add_argument("--max-steps", type=int, required=True, help="training steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds of every variant")
    parser.add_argument("--out", help="directory of the runs and table.md (default: runs/ablations/SUITE)")
    parser.add_argument("--dry-run", action="store_true", help="build the variants, print the commands, stop")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished runs of an earlier call; continue the others from their last.ckpt",
    )
    args = parser.parse_args(argv)
    if args.max_steps < 1 or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--max-steps must be ≥ 1 and --seeds distinct, got {args.max_steps} and {args.seeds}")
    suite = load_suite(args.suite)
    out = Path(args.out or Path("runs/ablations") / suite.name)
    dirs = {(v, seed): out / v / f"seed{seed}" for v in suite.variants for seed in args.seeds}
    taken = [d for d in dirs.values() if d.is_dir() and any(d.iterdir())]
    if taken and not args.resume:
        raise ValueError(f"{taken[0]} already holds a run: pass --resume to keep it, or another --out")

    built = build_all(suite, args.seeds[0], out, args.max_steps)
    runs = []
    for (variant, seed), run_dir in dirs.items():
        fit_argv = fit_args(suite, variant, seed, run_dir, args.max_steps, built[variant].data_seed)
        marker = run_dir / FINISHED
        done = args.resume and marker.is_file()
        if done and json.loads(marker.read_text())["args"] != fit_argv:
            raise ValueError(
                f"{run_dir} finished with other arguments than this call's; choose another --out"
            )
        runs.append(Run(variant, seed, run_dir, fit_argv, done))
    if args.dry_run:
        for run in runs:
            command = shlex.join([sys.executable, "-m", "lina_pl.cli", "fit", *run.args])
            print(f"{command}  # finished: kept" if run.done else command)
        return 0

    scalars, failures = execute(runs)
    parameters = {v: b.parameters for v, b in built.items()}
    text, missing = table(suite, args.max_steps, args.seeds, parameters, scalars)
    path = atomic_write(out / "table.md", lambda tmp: tmp.write_text(text))
    print(f"\n{text}\nwritten to {path}")
    problems = []
    if failures:
        problems.append(f"{len(failures)} of {len(runs)} runs failed: {'; '.join(failures)}")
    if missing:
        problems.append(f"metrics not logged: {', '.join(missing)}")
    if problems:
        print(f"lina ablate: error: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0
