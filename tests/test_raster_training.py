"""Raster AR family end to end: k-means tokenizer, `lina fit` with the LASAD demo config (shrunk), and
`lina sample` on its checkpoint (the same command as for LINA)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import run_lina as lina

from lina_pl.codecs.kmeans import KMeansTokenizer

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
    config = yaml.safe_load((ROOT / "configs/lasad/demo.yaml").read_text())
    config["trainer"].update(max_epochs=1, check_val_every_n_epoch=1, log_every_n_steps=1)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp / "runs")
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(tmp / "ckpt")
    init = config["model"]["init_args"]
    init.update(tokenizer_options={"path": str(tmp / "tok.npz")}, sample_classes=[0, 1], sample_per_class=1)
    init["model_overrides"].update(dim=32, depth=2, heads=2, expand_ratio=16)
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
    ckpt = torch.load(tmp / "ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["lina_module"] == "lina_pl.lightning.raster.RasterC2I"
    assert any(k.endswith("lower_bounds") for k in ckpt["state_dict"])
    out = tmp / "s.npz"
    lina(
        "sample",
        "--ckpt",
        tmp / "ckpt/last.ckpt",
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
