"""The real `lina` entry point end to end on digits shards: fit, validate from the saved config, resume,
sample to npz, evaluate; TensorBoard gets scalars and a sample grid. The demo config is composed and
shrunk (tiny model, 8×8 digits, a few steps, no workers)."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import LINA
from helpers import run_lina as lina
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lina_pl.lightning.consolidate import read_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("c2i")
    lina("data", "build", "--source", "digits", "--out", tmp / "shards", "--resolution", 8, cwd=tmp)
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(
        max_epochs=2, check_val_every_n_epoch=1, log_every_n_steps=1, default_root_dir=str(tmp / "runs")
    )
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    callbacks["SampleGrid"]["init_args"].update(
        values=[0, 1], per_value=1, options={"steps": 2, "flow_steps": 2}
    )
    callbacks["Throughput"]["init_args"] = {"window_size": 2}
    callbacks["Evaluation"]["init_args"].update(num_samples=20, options={"steps": 2, "flow_steps": 2})
    config["model"].update(generator="lina_c2i_tiny")
    config["data"]["init_args"].update(
        root=str(tmp / "shards"), batch_size=16, num_workers=0, samples_per_epoch=64
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    fit = lina("fit", "--config", tmp / "config.yaml", cwd=tmp)
    return tmp, fit


def test_fit_writes_checkpoint_config_and_tensorboard(run):
    tmp, _ = run
    ckpt = torch.load(tmp / "runs/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 8  # 2 epochs × 64 samples / batch 16
    assert ckpt["ema_state_dict"] and all(
        f"generator.{k}" in ckpt["state_dict"] for k in ckpt["ema_state_dict"]
    )
    version = tmp / "runs/tensorboard"
    assert yaml.safe_load((version / "config.yaml").read_text())["model"]["generator"] == "lina_c2i_tiny"
    hparams = yaml.unsafe_load((version / "hparams.yaml").read_text())
    assert hparams["num_classes"] == 10 and tuple(hparams["image_size"]) == (8, 8)  # linked from the data
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "val/loss", "train/device/samples_per_sec"} <= set(scalars)
    assert all(np.isfinite(e.value) for e in events.Scalars("train/loss"))
    assert "samples/grid" in events.Tags()["images"]


def test_validate_from_saved_config(run):
    tmp, _ = run
    config = tmp / "runs/tensorboard/config.yaml"
    ckpt = tmp / "runs/checkpoints/last.ckpt"
    result = lina(
        "validate",
        "--config",
        config,
        "--ckpt_path",
        ckpt,
        "--trainer.default_root_dir",
        tmp / "val",
        cwd=tmp,
    )
    assert "val/loss" in result.stdout


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_resume_reproduces_the_uninterrupted_run_exactly(run):
    """8 steps, then --ckpt_path to 12: the same losses, weights and EMA as 12 steps in one go (data position,
    mask and noise draws, LR schedule and EMA all continue where they stopped)."""
    tmp, _ = run
    resumed = tmp / "resumed"
    shutil.copytree(tmp / "runs", resumed)  # the 8-step run
    for root, resume in ((tmp / "whole", []), (resumed, ["--ckpt_path", resumed / "checkpoints/last.ckpt"])):
        config = ["--config", tmp / "config.yaml", "--trainer.max_epochs", 3]
        lina("fit", *config, "--trainer.default_root_dir", root, *resume, cwd=tmp)
    whole_losses, resumed_losses = scalars(tmp / "whole", "train/loss"), scalars(resumed, "train/loss")
    assert sorted(resumed_losses) == sorted(whole_losses) and max(whole_losses) >= 11  # steps 0..11
    assert resumed_losses == whole_losses
    a, b = (
        torch.load(d / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
        for d in (tmp / "whole", resumed)
    )
    assert a["global_step"] == b["global_step"] == 12
    for key in ("state_dict", "ema_state_dict"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_sample_and_evaluate(run):
    tmp, _ = run
    out = tmp / "samples/s.npz"
    result = lina(
        "sample",
        "--ckpt",
        tmp / "runs/checkpoints/last.ckpt",
        "--classes",
        0,
        3,
        "--per-class",
        2,
        "--steps",
        2,
        "--flow-steps",
        2,
        "--cfg",
        2.0,
        "--out",
        out,
        cwd=tmp,
    )
    assert json.loads(result.stdout.strip().splitlines()[-1])["shape"] == [4, 8, 8, 1]
    with np.load(out) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (4, 8, 8, 1)
        assert f["labels"].tolist() == [0, 0, 3, 3]
    assert out.with_suffix(".png").is_file()
    report = json.loads(
        lina("evaluate", "consistency", "--samples", out, "--data", tmp / "shards", cwd=tmp).stdout
    )
    assert 0.0 <= report["class_consistency"] <= 1.0
    assert report["real_heldout_accuracy"] > 0.9  # the classifier itself works on real digits


def test_sample_rejects_bad_input(run):
    tmp, _ = run

    def sample(ckpt, cls):
        cmd = [str(LINA), "sample", "--ckpt", str(ckpt), "--classes", str(cls), "--out", str(tmp / "x.npz")]
        return subprocess.run(cmd, capture_output=True, text=True)

    bad = sample(tmp / "runs/checkpoints/last.ckpt", 42)
    assert bad.returncode != 0 and "labels must lie in 0..9" in bad.stderr
    missing = sample(tmp / "nope.ckpt", 1)
    assert missing.returncode != 0 and "not found" in missing.stderr
    # a checkpoint of lina_pl 0.1 (LinaC2I, format 1) fails with a message naming both formats
    old = tmp / "old.ckpt"
    torch.save(
        {"lina_module": "lina_pl.lightning.c2i.LinaC2I", "state_dict": {}, "hyper_parameters": {}}, old
    )
    result = sample(old, 1)
    assert result.returncode != 0 and "checkpoint format 1" in result.stderr and "format 2" in result.stderr
    # an option the family does not use is refused, naming the flag
    cmd = [str(LINA), "sample", "--ckpt", str(tmp / "runs/checkpoints/last.ckpt"), "--classes", "1"]
    top_k = subprocess.run([*cmd, "--top-k", "5"], capture_output=True, text=True)
    assert top_k.returncode != 0 and "--top-k" in top_k.stderr


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_shipped_strategy_configs_fit_on_two_cpu_processes(run, strategy):
    """configs/trainer/{ddp,fsdp2}.yaml composed with the demo on 2 CPU processes (gloo): both ranks run the
    same number of steps on their own shard streams, the val set is split over ranks, the EMA and the sample
    grid work under the strategy, nothing hangs, and ``lina sample`` reads the (sharded) checkpoint."""
    tmp, _ = run
    out = tmp / strategy
    result = lina(
        "fit",
        "--config",
        tmp / "config.yaml",
        "--config",
        ROOT / f"configs/trainer/{strategy}.yaml",
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
        "--trainer.devices",
        2,
        "--trainer.max_epochs",
        1,
        "--trainer.default_root_dir",
        out,
        *(["--model.fsdp_param_dtype", "null"] if strategy == "fsdp2" else []),  # CPUs lack fast bf16
        cwd=tmp,
    )
    assert "Traceback" not in result.stderr
    last = out / "checkpoints/last.ckpt"
    assert last.is_dir() == (strategy == "fsdp2")  # FSDP2 writes one shard per rank into a directory
    assert read_checkpoint(last)["global_step"] == 2  # 64 samples per epoch / (batch 16 × 2 ranks)
    lina(
        "sample",
        "--ckpt",
        last,
        "--classes",
        0,
        1,
        "--per-class",
        1,
        "--steps",
        2,
        "--out",
        out / "s.npz",
        cwd=tmp,
    )
    assert np.load(out / "s.npz")["arr_0"].shape == (2, 8, 8, 1)
