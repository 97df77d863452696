"""The diffusers AutoencoderKL codec on a tiny random VAE, and VAE-latent shards end to end."""

import io
import tarfile
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from lina_pl.cli import main as lina
from lina_pl.codecs.diffusers_vae import DiffusersVAECodec
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.shards import load_manifest
from lina_pl.data.sources import image_to_tensor


def tiny_vae(**config):
    """4 latent channels, stride 2 (two blocks): 32×32 images -> 4×16×16 latents."""
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    tiny_vae().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def codec(vae_dir):
    return DiffusersVAECodec(str(vae_dir))


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_and_config(codec):
    assert (codec.latent_channels, codec.downsample, codec.patch_size) == (4, 2, 1)
    assert codec.scaling_factor == pytest.approx(0.18215) and codec.shift_factor == 0.0  # config, then 0.0
    moments = codec.moments(images())
    assert moments.shape == (2, 8, 16, 16)
    assert codec.sample(moments).shape == codec.encode(images()).shape == (2, 4, 16, 16)
    decoded = codec.decode(codec.encode(images()))
    assert decoded.shape == (2, 3, 32, 32) and decoded.abs().max() <= 1.0
    assert codec.grid((32, 32)) == (16, 16) and codec.token_channels == 4


def test_moments_are_the_posterior_mean_and_logvar(codec):
    x = images()
    with torch.no_grad():
        posterior = codec.vae.encode(x).latent_dist
    mean, logvar = codec.moments(x).chunk(2, dim=1)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)


def test_scaling_and_shift_are_applied_exactly(vae_dir):
    codec = DiffusersVAECodec(str(vae_dir), scaling_factor=0.5, shift_factor=0.25, patch_size=2)
    moments = codec.moments(images())
    mean, logvar = moments.chunk(2, dim=1)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    expected = (mean + torch.exp(0.5 * logvar) * noise - 0.25) * 0.5
    latent = codec.sample(moments, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latent, expected, rtol=0, atol=1e-6)
    with torch.no_grad():
        reference = codec.vae.decode(latent / 0.5 + 0.25).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(latent), reference)
    assert codec.grid((32, 32)) == (8, 8) and codec.token_channels == 16


def test_logvar_is_clamped_before_exp(codec):
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)], dim=1)
    latent = codec.sample(moments, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(latent, torch.exp(torch.tensor(10.0)) * noise * codec.scaling_factor)


def test_factors_default_to_the_vae_config(tmp_path):
    tiny_vae(scaling_factor=0.3, shift_factor=0.1).save_pretrained(tmp_path)
    codec = DiffusersVAECodec(str(tmp_path))
    assert (codec.scaling_factor, codec.shift_factor) == pytest.approx((0.3, 0.1))
    assert codec.describe()["shift_factor"] == pytest.approx(0.1)


def test_missing_vae_dir_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        DiffusersVAECodec(str(tmp_path))


@pytest.fixture(scope="module")
def latent_shards(vae_dir, tmp_path_factory):
    """Six 40×32 RGB images in two classes, encoded at 32 px into 2 train + 2 val shards."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    out = root.parent / "latent_shards"
    args = ["--source", "image-folder", "--root", str(root), "--out", str(out), "--resolution", "32"]
    vae = ["--codec", "diffusers", "--vae-path", str(vae_dir), "--batch-size", "4", "--shard-size", "5"]
    assert lina(["data", "build", *args, *vae, "--val-fraction", "0.34", "--device", "cpu"]) == 0
    return root, out


def test_build_rejects_a_resolution_the_vae_cannot_divide(latent_shards, vae_dir, tmp_path, capsys):
    args = ["--source", "image-folder", "--root", str(latent_shards[0]), "--out", str(tmp_path / "x")]
    with pytest.raises(SystemExit):
        lina(
            ["data", "build", *args, "--codec", "diffusers", "--vae-path", str(vae_dir), "--resolution", "33"]
        )
    assert "not divisible by the VAE's stride 2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_build_writes_float16_moments_of_the_image_and_its_flip(latent_shards, codec):
    folder, out = latent_shards
    manifest = load_manifest(out)
    assert manifest["format"] == "latent.npy" and manifest["latent_shape"] == [4, 16, 16]
    assert manifest["counts"] == {"train": 8, "val": 4} and manifest["channels"] == 3
    assert {k: manifest["codec"][k] for k in ("name", "latent_channels", "downsample")} == {
        "name": "diffusers",
        "latent_channels": 4,
        "downsample": 2,
    }
    assert manifest["codec"]["path"] == str(Path(codec.path).resolve())
    assert manifest["codec"]["scaling_factor"] == pytest.approx(0.18215)
    with tarfile.open(out / manifest["shards"]["val"][0]) as tar:
        fields = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()[:3]}
        key = tar.getmembers()[0].name.split(".", 1)[0]
    moments, flipped = (np.load(io.BytesIO(fields[f])) for f in ("latent.npy", "latent_flip.npy"))
    assert moments.dtype == flipped.dtype == np.float16 and moments.shape == flipped.shape == (8, 16, 16)
    label, name = key.split("_", 1)
    with Image.open(folder / label / f"{name}.png") as image:
        pixels = image_to_tensor(image.crop((4, 0, 36, 32)))[None]  # the centred 32×32 square
    expected = codec.moments(pixels)[0].numpy()
    expected_flip = codec.moments(pixels.flip(-1))[0].numpy()
    np.testing.assert_allclose(moments.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(flipped.astype(np.float32), expected_flip, rtol=2e-3, atol=2e-3)


def test_datamodule_yields_scaled_latents(latent_shards):
    data = ShardDataModule(
        str(latent_shards[1]), batch_size=4, num_workers=0, latent_scale=0.5, latent_shift=0.1
    )
    assert data.format == "latent.npy" and data.latent_shape == (4, 16, 16) and data.image_size == (32, 32)
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 2
    assert batches[0]["latent"].shape == (4, 4, 16, 16) and batches[0]["latent"].dtype == torch.float32
    assert batches[0]["label"].dtype == torch.int64 and torch.isfinite(batches[0]["latent"]).all()
    val = data.val_dataset
    assert len(val) == 4 and val[0]["latent"].shape == (4, 16, 16)
    with pytest.raises(ValueError, match="image.png"):
        data.real_images()
