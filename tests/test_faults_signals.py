"""Stop signals during `lina fit` (issue #12): SIGTERM / SIGUSR1 write last.ckpt and exit with 128 + the
signal's number, also while the loader is stuck on data; the saved run resumes where it stopped.

The demo config is shrunk (tiny model, 8×8 digits, batch 16: 4 steps per epoch, no validation); the data
module and callback below are imported by the `lina fit` subprocess (tests/ is put on its PYTHONPATH).
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import LINA
from helpers import run_lina as lina
from lightning.pytorch.callbacks import Callback

from lina_pl.data.datamodule import ShardDataModule

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SIGUSR1, SIGKILL = int(signal.SIGUSR1), int(signal.SIGKILL)


class StallingData(ShardDataModule):
    """Digits shards whose training stream hangs after ``stall_after`` batches of an epoch (a stuck
    filesystem), touching ``marker`` when it does."""

    def __init__(self, root: str, batch_size: int, samples_per_epoch: int, stall_after: int, marker: str):
        super().__init__(root, batch_size=batch_size, num_workers=0, samples_per_epoch=samples_per_epoch)
        self.stall_after, self.marker = stall_after, marker

    def train_dataloader(self):
        return _Stalling(super().train_dataloader(), self.stall_after, self.marker)


class _Stalling:
    def __init__(self, loader, stall_after: int, marker: str):
        self.loader, self.stall_after, self.marker = loader, stall_after, marker

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.stall_after:
                Path(self.marker).touch()
                time.sleep(600)
            yield batch


class SignalAt(Callback):
    """Sends ``signum`` to its own process in the middle of training step ``step``."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class MarkAt(Callback):
    """Touches ``marker`` at the start of training step ``step``, then keeps training slowly."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.step:
            Path(self.marker).touch()
            time.sleep(0.5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signal_shards")
    lina("data", "build", "--source", "digits", "--out", tmp / "shards", "--resolution", 8, cwd=tmp)
    return tmp / "shards"


def write_config(tmp: Path, shards: Path, data: dict, callbacks: list | None = None) -> Path:
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(
        max_epochs=100, check_val_every_n_epoch=100, num_sanity_val_steps=0, default_root_dir=str(tmp / "run")
    )
    kept = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(("ModelCheckpoint", "EMA"))]
    config["trainer"]["callbacks"] = kept + (callbacks or [])
    config["model"].update(generator="lina_c2i_tiny")
    config["data"] = data
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


def start_fit(tmp: Path, *args, own_process_group: bool = False) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(LINA), "fit", "--config", str(tmp / "config.yaml"), *map(str, args)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=own_process_group,  # as a batch job's, so killpg reaches only it
    )


def step_of(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_sigterm_while_stuck_on_data_saves_and_exits_143(tmp_path, shards):
    marker = tmp_path / "stalled"
    data = {
        "class_path": "test_faults_signals.StallingData",
        "init_args": {
            "root": str(shards),
            "batch_size": 16,
            "samples_per_epoch": 64,
            "stall_after": 3,
            "marker": str(marker),
        },
    }
    write_config(tmp_path, shards, data)
    fit = start_fit(tmp_path)
    deadline = time.monotonic() + 300
    while not marker.exists() and fit.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), fit.communicate()
    fit.send_signal(signal.SIGTERM)
    _, err = fit.communicate(timeout=120)
    assert fit.returncode == 128 + signal.SIGTERM, err
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    assert step_of(ckpt) == 3  # the three steps before the loader hung, none lost
    assert f"SIGTERM: saved {ckpt} at step 3" in err and "Traceback" not in err


def test_a_killed_fit_keeps_last_ckpt_of_its_last_epoch(tmp_path, shards):
    """SIGKILL (no handler runs) in epoch 1: the demo config's ModelCheckpoint wrote last.ckpt at the end of
    epoch 0, not only at the end of training."""
    data = {
        "class_path": "lina_pl.data.datamodule.ShardDataModule",
        "init_args": {"root": str(shards), "batch_size": 16, "num_workers": 0, "samples_per_epoch": 64},
    }
    kill_at = {"class_path": "test_faults_signals.SignalAt", "init_args": {"step": 6, "signum": SIGKILL}}
    write_config(tmp_path, shards, data, [kill_at])
    fit = start_fit(tmp_path)
    _, err = fit.communicate(timeout=300)
    assert fit.returncode == -SIGKILL, err
    assert step_of(tmp_path / "run/checkpoints/last.ckpt") == 4


def test_sigusr1_mid_step_finishes_the_step_saves_and_resumes(tmp_path, shards):
    data = {
        "class_path": "lina_pl.data.datamodule.ShardDataModule",
        "init_args": {"root": str(shards), "batch_size": 16, "num_workers": 0, "samples_per_epoch": 64},
    }
    signal_at = {"class_path": "test_faults_signals.SignalAt", "init_args": {"step": 5, "signum": SIGUSR1}}
    write_config(tmp_path, shards, data, [signal_at])
    fit = start_fit(tmp_path)
    _, err = fit.communicate(timeout=300)
    assert fit.returncode == 128 + signal.SIGUSR1, err
    ckpt = tmp_path / "run/checkpoints/last.ckpt"
    assert step_of(ckpt) == 6  # step 5 completed, then saved
    # the saved run resumes mid-epoch and ends where an uninterrupted one would
    write_config(tmp_path, shards, data)
    config = tmp_path / "config.yaml"
    lina("fit", "--config", config, "--trainer.max_epochs", 3, "--ckpt_path", ckpt, cwd=tmp_path)
    assert step_of(ckpt) == 12


def test_sigterm_to_the_process_group_with_loader_workers_saves_and_exits_143(tmp_path, shards):
    """SLURM and Ctrl-C signal the whole process group: the two DataLoader workers ignore it, so they do not
    die mid-batch and take the run down before the training process has saved it."""
    marker = tmp_path / "training"
    data = {
        "class_path": "lina_pl.data.datamodule.ShardDataModule",
        "init_args": {"root": str(shards), "batch_size": 16, "num_workers": 2, "samples_per_epoch": 64},
    }
    mark = {"class_path": "test_faults_signals.MarkAt", "init_args": {"step": 2, "marker": str(marker)}}
    write_config(tmp_path, shards, data, [mark])
    fit = start_fit(tmp_path, own_process_group=True)
    deadline = time.monotonic() + 300
    while not marker.exists() and fit.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), fit.communicate()
    os.killpg(fit.pid, signal.SIGTERM)
    _, err = fit.communicate(timeout=120)
    assert fit.returncode == 128 + signal.SIGTERM, err
    assert step_of(tmp_path / "run/checkpoints/last.ckpt") >= 2
    assert "Traceback" not in err
