"""The Evaluation callback: FID/KID/IS/precision/recall of EMA samples during a fit, in one process (in
process, with either callback order) and under DDP on 2 CPU processes (through `lina fit`), the gather of
uneven per-rank sample counts, and that the feature network never reaches a checkpoint."""

import math
import socket
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from helpers import run_lina as lina
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lina_pl.data.build import build
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.sources import DigitsSource
from lina_pl.lightning import EMA, Evaluation, GeneratorModule
from lina_pl.lightning.callbacks.evaluation import (
    METRIC_NAMES,
    batch_seed,
    compute_metrics,
    gather_rows,
    on_rank_zero,
    split_counts,
)
from lina_pl.metrics.generative import FeatureStats
from lina_pl.metrics.reference import Reference

ROOT = Path(__file__).resolve().parents[1]
#: a sample count that does not divide by 2 ranks (11 + 10) nor by 10 classes
NUM_SAMPLES = 21
TINY = {
    "num_samples": NUM_SAMPLES,
    "batch_size": 8,
    "options": {"steps": 2, "flow_steps": 2},
    "kid_subsets": 10,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits8") / "shards"
    build(DigitsSource(resolution=8), path)
    return path


# -- pieces -------------------------------------------------------------------------------------------


def test_samples_split_exactly_over_ranks():
    assert split_counts(NUM_SAMPLES, 2) == [11, 10]
    assert split_counts(500, 3) == [167, 167, 166] and split_counts(4, 4) == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        split_counts(3, 4)
    seeds = {batch_seed(0, rank, b) for rank in range(4) for b in range(8)}
    assert len(seeds) == 32 and batch_seed(0, 1, 2) == batch_seed(0, 1, 2)  # the same at every evaluation


def test_bad_settings_fail_at_config_time():
    with pytest.raises(ValueError, match="is_splits"):
        Evaluation(num_samples=5)  # Inception Score needs ≥ 10 samples for its 10 splits
    with pytest.raises(ValueError, match="unknown features"):
        Evaluation(features="vgg")
    with pytest.raises(ValueError, match="batch_size=0"):
        Evaluation(batch_size=0)
    text_module = SimpleNamespace(condition=torch.nn.Identity())  # no classes: prompts must be given
    with pytest.raises(ValueError, match="list of prompts"):
        Evaluation()._condition_values(text_module)
    assert Evaluation(values=["a 7", "two 4s"])._condition_values(text_module) == ["a 7", "two 4s"]
    class_module = SimpleNamespace(condition=SimpleNamespace(num_classes=10))
    assert Evaluation()._condition_values(class_module) == list(range(10))  # every class by default
    with pytest.raises(ValueError, match=r"values \[12, '3'\] are not classes 0..9"):
        Evaluation(values=[0, 12, "3"])._condition_values(class_module)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _features(n: int, dim: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(n + dim)) + shift


def _broadcast(obj, src: int = 0):
    """Lightning's DDP ``strategy.broadcast``."""
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _missing_reference():
    raise FileNotFoundError("reference not found: nope.npz")


def _gather_and_compute(rank: int, world: int, port: int, out: str) -> None:
    """One rank: its rows of 21 samples' features (11 or 10, padded to 11), gathered and evaluated."""
    torch.set_num_threads(1)  # a forked child (as a DataLoader worker): no OpenMP pool of the parent's
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = torch.cat([_features(NUM_SAMPLES, 8, 0.5), _features(NUM_SAMPLES, 10)], dim=1)
        counts = split_counts(NUM_SAMPLES, world)
        first = sum(counts[:rank])
        local = full[first : first + counts[rank]]
        local = torch.cat([local, local[:1].expand(max(counts) - len(local), -1)])  # padding, dropped
        gathered = gather_rows(local, counts)
        real = _features(40, 8)
        reference = Reference("test", FeatureStats.of(real), real)
        # every rank computes here: a torchmetrics sync would count each feature twice (or wait forever
        # when only rank 0 computes, as the callback does)
        metrics = compute_metrics(reference, gathered[:, :8], gathered[:, 8:], kid_subsets=10)
        # what rank 0 alone computes (or fails at) reaches every rank: no rank waits forever
        trainer = SimpleNamespace(is_global_zero=rank == 0, strategy=SimpleNamespace(broadcast=_broadcast))
        shared = on_rank_zero(trainer, lambda: {"eval/fid": 1.5}, share=True)
        try:
            on_rank_zero(trainer, _missing_reference)
            error = None
        except FileNotFoundError as err:
            error = str(err)
        torch.save(
            {"gathered": gathered, "metrics": metrics, "shared": shared, "error": error}, f"{out}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_gather_uneven_counts_and_share_rank_zero_results(tmp_path):
    # forked, not spawned: a fresh interpreter would spend most of the test importing Lightning
    mp.start_processes(
        _gather_and_compute, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork"
    )
    full = torch.cat([_features(NUM_SAMPLES, 8, 0.5), _features(NUM_SAMPLES, 10)], dim=1)
    real = _features(40, 8)
    expected = compute_metrics(
        Reference("test", FeatureStats.of(real), real), full[:, :8], full[:, 8:], kid_subsets=10
    )
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(result["gathered"], full)  # rank order, padding dropped
        assert result["metrics"] == pytest.approx(expected, rel=1e-9)
        assert result["shared"] == {"eval/fid": 1.5} and result["error"] == "reference not found: nope.npz"


# -- one process, in process --------------------------------------------------------------------------


class RecordSampling(L.Callback):
    """Wraps ``sample_images`` to keep the generator's weights at the moment the evaluation samples."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module):
        original = pl_module.sample_images

        def sample_images(*args, **kwargs):
            self.weights.append({n: p.detach().clone() for n, p in pl_module.generator.named_parameters()})
            return original(*args, **kwargs)

        pl_module.sample_images = sample_images


def _tiny_module() -> GeneratorModule:
    return GeneratorModule(
        generator="lina_c2i_tiny",
        codec_options={"patch_size": 2},
        image_size=(8, 8),
        image_channels=1,
        num_classes=10,
    )


@pytest.mark.parametrize("ema_first", [True, False], ids=["ema-first", "evaluation-first"])
def test_one_process_fit_evaluates_ema_samples(cache, shards, tmp_path, ema_first):
    """Two validations, each evaluated with the EMA weights whatever the callback order; ModelCheckpoint can
    monitor eval/fid; the checkpoint holds the generator, its EMA and the callback's counter, nothing of
    the feature network."""
    ema, evaluation, record = EMA(decay=0.5), Evaluation(**TINY), RecordSampling()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="eval/fid", mode="min", save_top_k=1
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        callbacks=[ema, evaluation, record, checkpoint]
        if ema_first
        else [record, evaluation, ema, checkpoint],
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    data = ShardDataModule(str(shards), batch_size=16, num_workers=0, samples_per_epoch=32)
    trainer.fit(_tiny_module(), data)

    assert len(record.weights) == 2 * math.ceil(NUM_SAMPLES / TINY["batch_size"])  # 2 evaluations
    last = record.weights[-1]  # no optimizer step after the last validation: the EMA is as it sampled
    live = dict(trainer.lightning_module.generator.named_parameters())
    assert all(torch.equal(last[n], ema.weights[n]) for n in last)
    assert not all(torch.equal(last[n], live[n].detach()) for n in last)  # decay 0.5: EMA ≠ weights

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("eval/")}
    assert set(metrics) == set(METRIC_NAMES) and all(np.isfinite(v) for v in metrics.values())
    assert 0 <= metrics["eval/precision"] <= 1 and 0 <= metrics["eval/recall"] <= 1
    assert 1 <= metrics["eval/is"] <= 10 and metrics["eval/fid"] >= 0
    assert checkpoint.best_model_score is not None and np.isfinite(float(checkpoint.best_model_score))

    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    _assert_no_feature_network(saved)


def _assert_no_feature_network(saved: dict) -> None:
    """Only the generator's weights, its EMA, optimizer states and callback counters (ModelCheckpoint's
    scores are the only other tensors)."""
    assert all(k.startswith("generator.") for k in saved["state_dict"])
    assert {f"generator.{k}" for k in saved["ema_state_dict"]} <= set(saved["state_dict"])
    assert set(saved["callbacks"]["Evaluation"]) == {"validations"}

    def has_tensors(tree) -> bool:
        if isinstance(tree, torch.Tensor):
            return True
        if isinstance(tree, dict):
            return any(has_tensors(v) for v in tree.values())
        return isinstance(tree, list | tuple) and any(has_tensors(v) for v in tree)

    holding = {k for k, v in saved.items() if has_tensors(v)}
    assert holding <= {"state_dict", "ema_state_dict", "optimizer_states", "callbacks"}, holding
    callbacks = {k for k, v in saved["callbacks"].items() if has_tensors(v)}
    assert all(k.startswith("ModelCheckpoint") for k in callbacks), callbacks


# -- DDP on 2 CPU processes, through `lina fit` -------------------------------------------------------


@pytest.mark.slow
def test_ddp_fit_logs_finite_eval_scalars_to_tensorboard(cache, shards, tmp_path):
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"].update(
        max_epochs=2, check_val_every_n_epoch=1, log_every_n_steps=1, default_root_dir=str(tmp_path / "run")
    )
    kept = {}
    for callback in config["trainer"]["callbacks"]:
        kept[callback["class_path"].rsplit(".", 1)[-1]] = callback
    kept["ModelCheckpoint"]["init_args"] = {  # the best eval/fid, which every rank must see
        "dirpath": str(tmp_path / "run/checkpoints"),
        "monitor": "eval/fid",
        "mode": "min",
        "save_top_k": 1,
        "save_last": True,
    }
    kept["Evaluation"] = {"class_path": "lina_pl.lightning.Evaluation", "init_args": dict(TINY)}
    config["trainer"]["callbacks"] = [kept[k] for k in ("Evaluation", "EMA", "ModelCheckpoint")]
    config["model"].update(generator="lina_c2i_tiny")
    config["data"]["init_args"].update(root=str(shards), batch_size=8, num_workers=0, samples_per_epoch=32)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ["--trainer.strategy", "ddp", "--trainer.devices", 2, "--trainer.accelerator", "cpu"]
    result = lina("fit", "--config", tmp_path / "config.yaml", *args, cwd=tmp_path)
    assert f"{NUM_SAMPLES} samples in" in result.stdout + result.stderr  # gathered from both ranks

    events = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for name in METRIC_NAMES:
        values = [e.value for e in events.Scalars(name)]
        assert len(values) == 2 and all(np.isfinite(values)), (name, values)
    (best,) = (tmp_path / "run/checkpoints").glob("epoch=*.ckpt")  # monitored on both ranks
    _assert_no_feature_network(torch.load(best, map_location="cpu", weights_only=False))
    last = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    _assert_no_feature_network(last)
