"""Raster AR family end to end: k-means tokenizer, `lina fit` with the LASAD demo config (shrunk), and
`lina sample` on its checkpoint (the same command as for LINA)."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers import run_lina as lina

from lina_pl.codecs.kmeans import KMeansTokenizer
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.lightning import GeneratorModule

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_kmeans_tokenizer_roundtrip(tmp_path):
    torch.manual_seed(0)
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    tok = KMeansTokenizer.fit(images, codebook_size=16, patch_size=2, iters=10)
    codes = tok.encode(images)
    assert codes.shape == (20, 16) and codes.dtype == torch.int64 and codes.max() < 16
    recon = tok.decode(codes, (4, 4))
    assert recon.shape == images.shape
    # every patch decodes to its nearest centroid, so re-encoding the reconstruction is a fixed point
    assert torch.equal(tok.encode(recon), codes)
    loaded = KMeansTokenizer.load(tok.save(tmp_path / "tok.npz"))
    assert torch.equal(loaded.codebook, tok.codebook) and loaded.patch_size == 2 and loaded.channels == 1
    with pytest.raises(FileNotFoundError, match="tokenizer fit"):
        KMeansTokenizer.load(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="patches"):
        KMeansTokenizer(torch.zeros(4, 5), 2, 1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("raster")
    lina("data", "build", "--source", "digits", "--out", tmp / "shards", "--resolution", 8, cwd=tmp)
    fit_tok = lina(
        "tokenizer",
        "fit",
        "--data",
        tmp / "shards",
        "--out",
        tmp / "tok.npz",
        "--codebook-size",
        32,
        "--iters",
        5,
        cwd=tmp,
    )
    config = yaml.safe_load((ROOT / "configs/raster/demo.yaml").read_text())
    config["trainer"].update(
        max_epochs=1, check_val_every_n_epoch=1, log_every_n_steps=1, default_root_dir=str(tmp / "run")
    )
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c for c in config["trainer"]["callbacks"]}
    callbacks["SampleGrid"]["init_args"].update(values=[0, 1], per_value=1)
    model = config["model"]
    model.update(codec_options={"path": str(tmp / "tok.npz")})
    model["generator_options"].update(dim=32, depth=2, heads=2, expand_ratio=16)
    config["data"]["init_args"].update(
        root=str(tmp / "shards"), batch_size=16, num_workers=0, samples_per_epoch=48
    )
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    lina("fit", "--config", tmp / "config.yaml", cwd=tmp)
    return tmp, json.loads(fit_tok.stdout.strip().splitlines()[-1])


def test_tokenizer_command_reports_reconstruction(trained):
    _, report = trained
    assert 0 <= report["mean_abs_reconstruction_error"] < 0.5


def test_lasad_fit_and_sample(trained):
    tmp, _ = trained
    ckpt = torch.load(tmp / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["lina_pl_format"] == 2
    assert any(k.endswith("lower_bounds") for k in ckpt["state_dict"])
    out = tmp / "s.npz"
    lina(
        "sample",
        "--ckpt",
        tmp / "run/checkpoints/last.ckpt",
        "--classes",
        1,
        2,
        "--per-class",
        2,
        "--cfg",
        2.0,
        "--top-k",
        8,
        "--out",
        out,
        cwd=tmp,
    )
    with np.load(out) as f:
        assert f["arr_0"].shape == (4, 8, 8, 1) and f["arr_0"].dtype == np.uint8
        assert f["labels"].tolist() == [1, 1, 2, 2]


def test_code_shards_hold_the_tokenizer_codes_and_train_like_pixels(trained):
    """``lina data build --codec kmeans``: the codes of every image and of its flip, so training never runs
    the tokenizer; the loss on a code batch equals the loss on the same images tokenized on the fly."""
    tmp, _ = trained
    build = ["data", "build", "--source", "digits", "--out", tmp / "codes", "--resolution", 8]
    lina(*build, "--codec", "kmeans", "--tokenizer-path", tmp / "tok.npz", cwd=tmp)
    pixels = ShardDataModule(str(tmp / "shards"), num_workers=0, val_batch_size=500)
    codes = ShardDataModule(str(tmp / "codes"), num_workers=0, val_batch_size=500, samples_per_epoch=64)
    manifest = codes.manifest
    assert manifest["format"] == "codes.npy" and manifest["latent_shape"] == [4, 4]
    assert manifest["codec"]["name"] == "kmeans" and manifest["codec"]["codebook_size"] == 32
    tok = KMeansTokenizer.load(tmp / "tok.npz")
    image_batch, code_batch = next(iter(pixels.val_dataloader())), next(iter(codes.val_dataloader()))
    assert code_batch["latent"].dtype == torch.int64 and code_batch["latent"].shape[1:] == (4, 4)
    assert torch.equal(code_batch["label"], image_batch["label"])
    assert torch.equal(code_batch["latent"].flatten(1), tok.encode(image_batch["latent"]))
    images = torch.from_numpy(pixels.real_images("train")[0]).permute(0, 3, 1, 2) / 127.5 - 1
    plain = {tuple(c) for c in tok.encode(images).tolist()}
    flipped = {tuple(c) for c in tok.encode(images.flip(-1)).tolist()}
    train = [tuple(c) for c in next(iter(codes.train_dataloader()))["latent"].flatten(1).tolist()]
    assert all(c in plain | flipped for c in train) and any(c not in plain for c in train)

    module = GeneratorModule(
        "lasad_tiny", codec="kmeans", codec_options={"path": str(tmp / "tok.npz")}, image_size=(8, 8)
    )
    module.configure_model()
    module.eval()
    assert torch.allclose(module.loss(code_batch), module.loss(image_batch))
    module.trainer = SimpleNamespace(datamodule=codes)
    module.setup("fit")  # same tokenizer: accepted
    other = KMeansTokenizer(tok.codebook[:16], tok.patch_size, tok.channels).save(tmp / "tok16.npz")
    mismatched = GeneratorModule(
        "lasad_tiny", codec="kmeans", codec_options={"path": str(other)}, image_size=(8, 8)
    )
    mismatched.trainer = SimpleNamespace(datamodule=codes)
    with pytest.raises(ValueError, match="rebuild them with this tokenizer"):
        mismatched.setup("fit")
