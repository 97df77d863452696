"""Files a later run trusts survive a failed write (issue #12): a disk that fills up half-way through writing
`last.ckpt` (through the trainer `lina fit` builds, with the system's temp directory on another filesystem,
as on most clusters) or a samples file leaves the previous file whole and no temporary file behind."""

import builtins
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lina_pl.cli import main as lina
from lina_pl.io import save_npz
from lina_pl.lightning.checkpoint import AtomicCheckpointIO
from lina_pl.lightning.cli import build_cli

ROOT = Path(__file__).resolve().parents[1]


class _DiskFull:
    """A file that takes half of the first write, then fails like a full disk."""

    def __init__(self, f):
        self.f = f

    def write(self, data) -> int:
        self.f.write(bytes(data)[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def disk_full_for(monkeypatch):
    """``disk_full_for(name)``: from now on, files whose name contains ``name`` fail half-way when written,
    and moves cross filesystems (``os.rename`` fails with EXDEV, so ``shutil.move`` copies)."""
    real_open = builtins.open

    def start(name: str) -> None:
        def faulty_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _DiskFull(f) if "w" in mode and name in str(file) else f

        def cross_device(src, dst, *args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(builtins, "open", faulty_open)
        monkeypatch.setattr(os, "rename", cross_device)
        monkeypatch.setattr(shutil, "_USE_CP_SENDFILE", False)  # copies go through write(), which fails

    return start


def test_a_failed_checkpoint_write_keeps_the_previous_last_ckpt(tmp_path, disk_full_for):
    build = ["data", "build", "--source", "digits", "--resolution", "8", "--out", str(tmp_path / "shards")]
    assert lina(build) == 0
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(max_steps=1, limit_val_batches=0, num_sanity_val_steps=0, logger=False)
    config["trainer"]["default_root_dir"] = str(tmp_path / "run")
    config["trainer"]["callbacks"] = config["trainer"]["callbacks"][:1]  # ModelCheckpoint: last.ckpt
    config["model"]["generator"] = "lina_c2i_tiny"
    config["data"]["init_args"].update(root=str(tmp_path / "shards"), batch_size=16, num_workers=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = build_cli(["fit", "--config", str(tmp_path / "config.yaml")])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    last = tmp_path / "run/checkpoints/last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 1

    disk_full_for("last.ckpt")
    with pytest.raises((OSError, RuntimeError)):
        cli.trainer.save_checkpoint(last)
    assert torch.load(last, weights_only=False)["global_step"] == 1  # whole, not truncated
    assert not list(last.parent.glob(".*"))  # no temporary file left


def test_a_failed_samples_write_keeps_the_previous_file(tmp_path, disk_full_for):
    out = save_npz(tmp_path / "samples.npz", arr_0=np.zeros((2, 4, 4, 1), np.uint8), labels=np.arange(2))
    disk_full_for("samples.npz")
    with pytest.raises(OSError, match="No space left"):
        save_npz(out, arr_0=np.ones((8, 4, 4, 1), np.uint8), labels=np.arange(8))
    with np.load(out) as f:
        assert f["labels"].tolist() == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]
