"""Text-to-image end to end through the `lina` entry point: digit-scene shards with cached MiniLM features,
a shrunk `configs/t2i/demo.yaml` fit, the next resolution stage warm-started with `--model.init_from`,
`lina sample --prompts`, and `lina evaluate geneval-digits`; plus cached vs online text features giving the
same loss, and one model trained on mixed aspect ratios."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import run_lina as lina

from lina_pl.data.datamodule import ShardDataModule
from lina_pl.lightning import GeneratorModule

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SCENES = ["--source", "digit-scenes", "--train-size", "96", "--val-size", "12", "--shard-size", "64"]


def shrunk_demo(tmp: Path, root: Path, run: str, **model) -> Path:
    """configs/t2i/demo.yaml with a tiny model, a few steps, no workers, its run in ``tmp/run``."""
    config = yaml.safe_load((ROOT / "configs/t2i/demo.yaml").read_text())
    config["trainer"].update(max_steps=4, val_check_interval=2, limit_val_batches=1, log_every_n_steps=1)
    config["trainer"]["default_root_dir"] = str(tmp / run)
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    callbacks["SampleGrid"]["init_args"].update(values=["a 7", "a red 2"], per_value=1, options={"steps": 2})
    config["model"].update(generator="lina_t2i_tiny", **model)
    config["data"]["init_args"].update(root=str(root), batch_size=8, num_workers=0)
    path = tmp / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    encoder = ["--text-encoder", "bundled:minilm", "--text-max-length", "8"]
    lina("data", "build", *SCENES, *encoder, "--out", tmp / "scenes", cwd=tmp)
    lina("data", "build", *SCENES, "--out", tmp / "captions", cwd=tmp)
    lina("data", "build", *SCENES, *encoder, "--resolution", 64, "--out", tmp / "scenes64", cwd=tmp)
    return tmp


def test_fit_curriculum_sample_and_geneval(scenes):
    tmp = scenes
    lina("fit", "--config", shrunk_demo(tmp, tmp / "scenes", "run"), cwd=tmp)
    ckpt = tmp / "run/checkpoints/last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 4 and state["ema_state_dict"]
    assert "generator.condition.padding_table" in state["state_dict"]  # a buffer, not a parameter
    # the next stage: the same model at twice the resolution (64 px: 16×16 tokens), from this EMA
    result = lina(
        "fit", "--config", shrunk_demo(tmp, tmp / "scenes64", "stage2", init_from=str(ckpt)), cwd=tmp
    )
    log = result.stdout + result.stderr
    assert "init_from" in log and "copied" in log and "resized" in log  # the grid KV gates, 8×8 -> 16×16
    stage2 = torch.load(tmp / "stage2/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    gate = stage2["state_dict"]["generator.decoder_blocks.0.attn.kv_gate.key"]
    assert gate.shape[1:] == (16, 16)
    # sample balanced prompts and score them like GenEval
    prompts = tmp / "prompts.txt"
    lina("evaluate", "geneval-digits", "--make-prompts", 6, "--out", prompts, cwd=tmp)
    out = tmp / "samples.npz"
    lina(
        "sample", "--ckpt", ckpt, "--prompts", prompts, "--per-prompt", 1, "--steps", 2, "--out", out, cwd=tmp
    )
    with np.load(out) as f:
        assert (
            f["arr_0"].shape == (6, 32, 32, 3) and list(f["prompts"]) == prompts.read_text().split("\n")[:6]
        )
    report = json.loads(lina("evaluate", "geneval-digits", "--samples", out, cwd=tmp).stdout)
    assert set(report["counts"]) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert 0.0 <= report["overall"] <= 1.0


def test_cached_and_online_text_features_give_the_same_loss(scenes):
    tmp = scenes
    cached = ShardDataModule(str(tmp / "scenes"), num_workers=0, val_batch_size=12)
    online = ShardDataModule(str(tmp / "captions"), num_workers=0, val_batch_size=12)
    batch_cached, batch_online = next(iter(cached.val_dataloader())), next(iter(online.val_dataloader()))
    assert "text_emb" in batch_cached and "text_emb" not in batch_online
    assert batch_cached["text"] == batch_online["text"]
    module = GeneratorModule(
        "lina_t2i_tiny", codec_options={"patch_size": 8}, image_size=(32, 32), image_channels=3
    )
    module.configure_model()
    losses = []
    for batch in (batch_cached, batch_online):
        torch.manual_seed(0)
        losses.append(module.loss(batch))
    assert torch.allclose(losses[0], losses[1], rtol=1e-3), losses  # features cached in float16


def test_one_model_trains_on_mixed_aspect_ratios(tmp_path):
    """Captioned images of two aspect ratios, bucketed: each batch has one size, one model takes both."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        w = 16 if i % 2 else 24
        Image.fromarray(rng.integers(0, 255, (16, w, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        (tmp_path / f"img{i}.txt").write_text(f"a {i % 10}")
    out = tmp_path / "shards"
    lina(
        "data",
        "build",
        "--source",
        "image-folder",
        "--root",
        tmp_path,
        "--out",
        out,
        "--sizes",
        "16x16",
        "16x24",
        "--val-fraction",
        "0.34",
        cwd=tmp_path,
    )
    data = ShardDataModule(str(out), batch_size=2, num_workers=0, samples_per_epoch=8)
    module = GeneratorModule(
        "lina_t2i_tiny",
        codec_options={"patch_size": 4},
        image_size=data.image_size,
        image_channels=3,
        condition_options={"encoder_path": "bundled:minilm"},
    )
    module.configure_model()
    grids = set()
    for batch in data.train_dataloader():
        grids.add(module.codec.batch_grid(batch["latent"]))
        assert torch.isfinite(module.loss(batch))
    assert grids == {(4, 4), (4, 6)}
