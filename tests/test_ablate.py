"""`lina ablate`: suites parse, every variant of the shipped suites builds, a suite runs end to end into a
table whose numbers are the runs' TensorBoard values, a failed run is marked failed with exit status 1, and
``--resume`` keeps finished runs. Also the TensorBoard reader the table relies on."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from helpers import lina_error
from torch.utils.tensorboard import SummaryWriter

from lina_pl.codecs.kmeans import KMeansTokenizer
from lina_pl.commands import ablate
from lina_pl.data.build import build
from lina_pl.data.sources import DigitsSource
from lina_pl.lightning.scalars import last_scalars, read_scalars

ROOT = Path(__file__).resolve().parents[1]


def write_scalars(log_dir: Path, points: dict[str, list[tuple[int, float]]], mtime: float) -> None:
    """One TensorBoard event file of ``tag -> [(step, value)]``, last modified at ``mtime``."""
    with SummaryWriter(str(log_dir)) as writer:
        for tag, series in points.items():
            for step, value in series:
                writer.add_scalar(tag, value, step)
    for path in log_dir.glob("events.out.tfevents.*"):
        os.utime(path, (mtime, mtime))


def rows(table: str) -> dict[str, list[str]]:
    """A markdown table's rows by their first cell: the other cells."""
    cells = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {row[0].strip(): [c.strip() for c in row[1:]] for row in cells}


def test_read_scalars_merges_event_files_the_newer_winning_a_step(tmp_path):
    """A resumed run has two event files: the steps of both, the newer one's value where they overlap."""
    write_scalars(tmp_path / "tensorboard/b", {"val/loss": [(0, 1.0), (1, 2.0), (2, 3.0)]}, mtime=1000)
    write_scalars(
        tmp_path / "tensorboard/a", {"val/loss": [(2, 30.0), (3, 40.0)], "eval/fid": [(3, 5.0)]}, 2000
    )
    assert read_scalars(tmp_path) == {
        "val/loss": [(0, 1.0), (1, 2.0), (2, 30.0), (3, 40.0)],
        "eval/fid": [(3, 5.0)],
    }
    assert last_scalars(tmp_path) == {"val/loss": 40.0, "eval/fid": 5.0}
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        read_scalars(tmp_path / "tensorboard/none")


def test_table_reports_mean_and_sample_std_over_seeds_and_marks_failures(tmp_path):
    for seed, value in enumerate((1.0, 2.0)):
        write_scalars(
            tmp_path / f"a/seed{seed}", {"val/loss": [(0, 9.0), (5, value)], "train/lr": [(5, 1.0)]}, 1
        )
    write_scalars(tmp_path / "b/seed0", {"val/loss": [(5, 0.25)]}, 1)
    scalars = {
        "a": {0: last_scalars(tmp_path / "a/seed0"), 1: last_scalars(tmp_path / "a/seed1")},
        "b": {0: last_scalars(tmp_path / "b/seed0"), 1: None},
        "c": {0: None, 1: None},
    }
    suite = ablate.Suite("toy", Path("base.yaml"), [], None, {"a": [], "b": [], "c": []})
    text, missing = ablate.table(suite, 6, [0, 1], {"a": 1234, "b": 5, "c": 6}, scalars)
    # the metrics default to the val/ and eval/ tags; the mean of 1 and 2 and their sample std √0.5
    assert rows(text) == {
        "variant": ["parameters", "runs", "val/loss"],
        "a": ["1,234", "2/2", "1.5 ± 0.71"],
        "b": ["5", "1/2, failed: seed 1", "0.25"],
        "c": ["6", "0/2, failed: seed 0 1", "failed"],
    }
    assert not missing
    named = ablate.Suite("toy", Path("base.yaml"), [], ["val/loss", "eval/fid"], suite.variants)
    text, missing = ablate.table(named, 6, [0, 1], {"a": 1, "b": 1, "c": 1}, scalars)
    assert rows(text)["a"] == ["1", "2/2", "1.5 ± 0.71", "missing"]
    assert missing == ["eval/fid (a seed 0)", "eval/fid (a seed 1)", "eval/fid (b seed 0)"]


def test_suites_parse_and_a_wrong_suite_is_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    lina, lasad = ablate.load_suite("lina"), ablate.load_suite("lasad")
    assert (lina.base, lasad.base) == (Path("configs/c2i/demo.yaml"), Path("configs/raster/demo.yaml"))
    assert {"lina", "division", "subtraction", "no_kv_gate", "kv_gate_grid", "softmax", "hybrid"} <= set(
        lina.variants
    )
    assert {"lasad", "lasad_no_sad", "gla", "tnl", "linear_rope", "softmax"} <= set(lasad.variants)
    error = lina_error("ablate", "--suite", "nope", "--max-steps", "1", cwd=ROOT)
    assert error.endswith(
        "unknown suite 'nope'; suites in configs/ablations/: lasad, lina (or give a suite file)"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: configs/c2i/demo.yaml\nvariants: {a: --model.lr=1}\n")
    with pytest.raises(ValueError, match="variant 'a' must be a name .* with a list of `lina fit` overrides"):
        ablate.load_suite(str(bad))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory as the shipped suites expect it: configs/, the digits shards and the LASAD demo's
    k-means tokenizer (random: fitting is test_raster_training's)."""
    tmp = tmp_path_factory.mktemp("ablate")
    (tmp / "configs").symlink_to(ROOT / "configs")
    build(DigitsSource(), tmp / "data/shards/digits")
    KMeansTokenizer(torch.rand(256, 4) * 2 - 1, 2, 1).save(tmp / "runs/lasad_demo/tokenizer.npz")
    return tmp


@pytest.mark.parametrize("name", ["lina", "lasad"])
def test_dry_run_builds_every_variant_of_the_shipped_suites(name, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    suite = ablate.load_suite(name)
    assert ablate.main(["--suite", name, "--max-steps", "7", "--seeds", "0", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if " -m lina_pl.cli fit " in line]
    assert len(commands) == 2 * len(suite.variants)
    for variant, overrides in suite.variants.items():
        assert f"{variant}: builds, " in out
        (command,) = [c for c in commands if f"runs/ablations/{name}/{variant}/seed1 " in c]
        assert " ".join(overrides) in command and "--seed_everything 1 --data.init_args.seed 1" in command
    assert not (workdir / "runs/ablations").exists()  # nothing ran, nothing was written


@pytest.mark.slow
def test_a_suite_runs_into_a_table_of_its_runs_values(workdir, tmp_path, monkeypatch, capsys):
    """A variant and one that fails when its fit starts (its warm-start checkpoint is missing), 3 steps over
    2-step epochs: the run validates at its last step, the table holds its values, the failed run is marked
    and the exit status is 1; --resume then keeps the finished run."""
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(
        log_every_n_steps=1,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        callbacks=config["trainer"]["callbacks"][:1],  # ModelCheckpoint
    )
    config["model"].update(generator="lina_c2i_tiny")
    config["data"]["init_args"].update(
        root=str(workdir / "data/shards/digits"), batch_size=16, num_workers=0, samples_per_epoch=32
    )
    Path("tiny.yaml").write_text(yaml.safe_dump(config))
    variants = {
        "division": [
            "--model.generator_options.conv_kernel_size=0",
            "--model.generator_options.kv_gate=null",
        ],
        "broken": ["--model.init_from=missing.ckpt"],
    }
    suite = {"base": "tiny.yaml", "metrics": ["val/loss", "train/loss"], "variants": variants}
    Path("suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    args = ["--suite", "suite.yaml", "--max-steps", "3", "--seeds", "4", "--out", "out"]

    assert ablate.main(args) == 1
    out, err = capsys.readouterr()
    assert "[2/2] broken seed 4: FAILED (exit 1) after " in out
    assert "lina fit: error: init_from checkpoint not found: missing.ckpt" in out
    assert err.startswith("lina ablate: error: 1 of 2 runs failed: broken seed 4 (out/broken/seed4/fit.log")
    run = Path("out/division/seed4")
    saved = yaml.safe_load((run / "tensorboard/config.yaml").read_text())
    assert saved["model"]["generator_options"] == {"loss_repeat": 1, "conv_kernel_size": 0, "kv_gate": None}
    assert (saved["seed_everything"], saved["data"]["init_args"]["seed"]) == (4, 4)
    scalars = read_scalars(run)
    assert scalars["val/loss"][-1][0] == scalars["train/loss"][-1][0] == 2  # validated at the last step
    values = [format(scalars[tag][-1][1], ".4g") for tag in ("val/loss", "train/loss")]
    table = Path("out/table.md").read_text()
    assert "| variant | parameters | runs | val/loss | train/loss |" in table
    division, broken = rows(table)["division"], rows(table)["broken"]
    assert division[1:] == ["1/1", *values] and broken[1:] == ["0/1, failed: seed 4", "failed", "failed"]
    # the parameter counts of the variants as built: no DWConv and no KV gate in division
    assert int(division[0].replace(",", "")) < int(broken[0].replace(",", ""))
    assert json.loads((run / ablate.FINISHED).read_text())["args"][:2] == ["--config", "tiny.yaml"]
    assert not Path("out/broken/seed4", ablate.FINISHED).exists()

    with pytest.raises(ValueError, match="out/division/seed4 already holds a run: pass --resume"):
        ablate.main(args)
    del variants["broken"]
    Path("suite.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    assert ablate.main([*args, "--resume"]) == 0
    assert "[1/1] division seed 4: finished earlier, kept" in capsys.readouterr().out
    assert Path("out/table.md").read_text() == table.replace(table[table.index("| broken") :], "")
