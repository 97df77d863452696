"""Tokenizer faults of issue #12: code shards of one k-means codebook never train a model tokenizing with
another of the same size; a raster checkpoint keeps its codebook (so `lina sample` needs no tokenizer file)
and refuses to resume with another; LINA on code shards is one clear line."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from helpers import lina_error
from helpers import run_lina as lina

from lina_pl.codecs import create_codec

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Digits pixel shards, two 16-code k-means fits (seeds 0, 1), code shards of the first, and a 1-epoch
    LASAD run on those code shards with the first tokenizer."""
    tmp = tmp_path_factory.mktemp("tokenizer")
    lina("data", "build", "--source", "digits", "--out", tmp / "pixels", "--resolution", 8, cwd=tmp)
    for name, seed in (("a", 0), ("b", 1)):
        fit = ("--codebook-size", 16, "--iters", 3, "--seed", seed)
        lina("tokenizer", "fit", "--data", tmp / "pixels", "--out", tmp / f"{name}.npz", *fit, cwd=tmp)
    build = ("--resolution", 8, "--codec", "kmeans", "--tokenizer-path", tmp / "a.npz")
    lina("data", "build", "--source", "digits", "--out", tmp / "codes", *build, cwd=tmp)
    config = yaml.safe_load((ROOT / "configs/raster/demo.yaml").read_text())
    config["trainer"].update(max_epochs=1, check_val_every_n_epoch=100, num_sanity_val_steps=0)
    config["trainer"]["default_root_dir"] = str(tmp / "run")
    config["trainer"]["callbacks"] = [
        c for c in config["trainer"]["callbacks"] if c["class_path"].endswith(("ModelCheckpoint", "EMA"))
    ]
    config["model"].update(generator="lasad_tiny", generator_options={}, codec_options={"path": "a.npz"})
    config["data"]["init_args"].update(
        root=str(tmp / "codes"), batch_size=16, num_workers=0, samples_per_epoch=64
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    lina("fit", "--config", tmp / "config.yaml", cwd=tmp)
    return tmp


def test_code_shards_of_another_codebook_are_refused(run):
    recorded = json.loads((run / "codes/manifest.json").read_text())["codec"]["codebook_sha256"]
    assert recorded == create_codec("kmeans", path=run / "a.npz").describe()["codebook_sha256"]
    other = ("--model.codec_options", "{path: b.npz}", "--trainer.default_root_dir", run / "other")
    error = lina_error("fit", "--config", run / "config.yaml", *other, cwd=run)
    assert "made by another tokenizer" in error and "codebook_sha256" in error and "rebuild them" in error


def test_checkpoint_keeps_its_codebook_so_sampling_needs_no_file(run):
    ckpt = run / "run/checkpoints/last.ckpt"
    kept = torch.load(ckpt, weights_only=False)["codec_options"]
    assert torch.equal(kept["codebook"], create_codec("kmeans", path=run / "a.npz").codebook)
    shutil.move(run / "a.npz", run / "a_moved.npz")
    try:
        out = run / "samples.npz"
        sample = ("--ckpt", ckpt, "--classes", 0, 1, "--per-class", 2, "--out", out)
        result = lina("sample", *sample, cwd=run)
    finally:
        shutil.move(run / "a_moved.npz", run / "a.npz")
    assert json.loads(result.stdout.strip().splitlines()[-1])["shape"] == [4, 8, 8, 1]


def test_resume_with_another_codebook_is_refused(run):
    """On pixel shards (tokenized on the fly) the shards cannot tell; the checkpoint's codebook can."""
    fit = ("fit", "--config", run / "config.yaml", "--ckpt_path", run / "run/checkpoints/last.ckpt")
    args = ("--model.codec_options", "{path: b.npz}", "--data.init_args.root", run / "pixels")
    error = lina_error(*fit, *args, "--trainer.default_root_dir", run / "resumed", cwd=run)
    assert "was trained with another kmeans codebook" in error


def test_lina_on_code_shards_is_one_line(run):
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(run / "lina")
    config["model"]["generator"] = "lina_c2i_tiny"
    config["data"]["init_args"].update(root=str(run / "codes"), num_workers=0)
    (run / "lina.yaml").write_text(yaml.safe_dump(config))
    error = lina_error("fit", "--config", run / "lina.yaml", cwd=run)
    assert "these are code shards (codes.npy) for raster models, but lina_c2i_tiny models continuous" in error
