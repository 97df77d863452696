"""Training faults of issue #12 through the real `lina fit`: a run lives in `--trainer.default_root_dir`;
a resume takes explicit options over the checkpoint's and refuses another model; a NaN/inf loss stops the run
naming the step, and no checkpoint with non-finite weights replaces the last good one. The non-finite guard's
skip mode is checked in-process on Lightning's BoringModel."""

import math
import re
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from helpers import lina_error
from helpers import run_lina as lina
from lightning.pytorch.demos.boring_classes import BoringModel

from lina_pl.lightning.callbacks import NonFiniteGuard

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def all_finite(ckpt: dict) -> bool:
    tensors = [*ckpt["state_dict"].values(), *ckpt["ema_state_dict"].values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-epoch (4-step) tiny fit whose run directory is moved by `--trainer.default_root_dir`."""
    tmp = tmp_path_factory.mktemp("faults")
    lina("data", "build", "--source", "digits", "--out", tmp / "shards", "--resolution", 8, cwd=tmp)
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(max_epochs=1, check_val_every_n_epoch=100, num_sanity_val_steps=0)
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(("ModelCheckpoint", "EMA"))
    ]
    config["model"].update(generator="lina_c2i_tiny")
    config["data"]["init_args"].update(
        root=str(tmp / "shards"), batch_size=16, num_workers=0, samples_per_epoch=64
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    lina("fit", "--config", tmp / "config.yaml", "--trainer.default_root_dir", tmp / "base", cwd=tmp)
    return tmp


def copy_run(run: Path, name: str) -> Path:
    shutil.copytree(run / "base", run / name)
    return run / name


def test_default_root_dir_holds_checkpoints_logs_and_config(run):
    base = run / "base"
    assert checkpoint(base / "checkpoints/last.ckpt")["global_step"] == 4
    assert list((base / "tensorboard").glob("events.out.tfevents.*"))
    saved = yaml.safe_load((base / "tensorboard/config.yaml").read_text())
    assert saved["trainer"]["default_root_dir"] == str(base)
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(base)  # interpolated after the flag
    assert not (run / "runs").exists()  # nothing in the config's own default_root_dir (runs/demo)


def test_resume_takes_the_explicit_lr_and_keeps_one_last_ckpt(run):
    resumed = copy_run(run, "resumed")
    last = resumed / "checkpoints/last.ckpt"
    args = ("--trainer.default_root_dir", resumed, "--trainer.max_epochs", 2, "--ckpt_path", last)
    lina("fit", "--config", run / "config.yaml", *args, "--model.lr", 1e-5, cwd=run)
    ckpt = checkpoint(last)
    assert ckpt["global_step"] == 8  # resumed at step 4, not restarted
    assert ckpt["hyper_parameters"]["lr"] == 1e-5  # not the checkpoint's 2e-3
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-5, 1e-5]
    assert ckpt["lr_schedulers"][0]["base_lrs"] == [1e-5, 1e-5]
    assert math.isclose(groups[0]["lr"], 1e-5 * (0.001 + 0.999 * 8 / 50))  # warm-up position kept
    assert yaml.safe_load((resumed / "tensorboard/config.yaml").read_text())["model"]["lr"] == 1e-5
    assert not list(last.parent.glob("last-v*"))  # last.ckpt itself names the newest


def test_resume_refuses_another_model(run):
    last, config = run / "base/checkpoints/last.ckpt", run / "config.yaml"
    fit = ("fit", "--config", config, "--ckpt_path", last, "--trainer.default_root_dir", run / "other")
    raster = ("--model.generator", "lasad_tiny", "--model.codec", "kmeans", "--model.codec_options", "{}")
    error = lina_error(*fit, *raster, cwd=run)
    assert "a lina_c2i_tiny model (lina family), but the config trains lasad_tiny (raster family)" in error
    assert "--model.init_from" in error
    assert "holds a lina_c2i_tiny model" in lina_error(*fit, "--model.generator", "lina_c2i_demo", cwd=run)
    wider = lina_error(*fit, "--model.generator_options", "{dim: 64}", cwd=run)
    assert "does not fit the configured model" in wider and "tensors of another shape" in wider


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(run):
    diverged = copy_run(run, "diverged")
    last = diverged / "checkpoints/last.ckpt"
    args = ("--trainer.default_root_dir", diverged, "--trainer.max_epochs", 3, "--ckpt_path", last)
    error = lina_error("fit", "--config", run / "config.yaml", *args, "--model.lr", 1e6, cwd=run)
    assert re.search(r"the training loss is -?(nan|inf) at step (5|6|7) \(epoch 1\)", error), error
    assert "--non_finite.action skip" in error
    ckpt = checkpoint(last)
    assert ckpt["global_step"] == 4 and all_finite(ckpt)  # the good checkpoint, untouched


def test_no_checkpoint_with_non_finite_weights_is_written(run):
    """lr = inf: the first resumed step's loss is finite, its update is not; the save after it is refused."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = 1
    (run / "every_step.yaml").write_text(yaml.safe_dump(config))
    broken = copy_run(run, "broken")
    last = broken / "checkpoints/last.ckpt"
    args = ("--trainer.default_root_dir", broken, "--trainer.max_epochs", 2, "--ckpt_path", last)
    error = lina_error("fit", "--config", run / "every_step.yaml", *args, "--model.lr", ".inf", cwd=run)
    assert "refusing to write a checkpoint at step 5" in error and "NaN or ±inf" in error
    ckpt = checkpoint(last)
    assert ckpt["global_step"] == 4 and all_finite(ckpt)


class NaNAt(BoringModel):
    """BoringModel whose loss is NaN at the given steps."""

    def __init__(self, bad_steps):
        super().__init__()
        self.bad_steps = set(bad_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)["loss"]
        return loss * float("nan") if self.global_step in self.bad_steps else loss


def fit_boring(model, guard, steps=4):
    trainer = L.Trainer(
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model)
    return trainer


def test_skip_mode_drops_the_bad_step_and_trains_on():
    model, guard = NaNAt({1}), NonFiniteGuard(action="skip")
    trainer = fit_boring(model, guard)
    assert trainer.global_step == 4 and guard.skipped_in_a_row == 0
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_stop_mode_and_too_many_skips_stop_the_run():
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 1 \(epoch 0\)"):
        fit_boring(NaNAt({1}), NonFiniteGuard())
    with pytest.raises(FloatingPointError, match="at step 3 .* after 2 skipped steps in a row"):
        fit_boring(NaNAt({1, 2, 3}), NonFiniteGuard(action="skip", max_skips=2))
