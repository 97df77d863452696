"""Data layer: digits and image-folder sources, `lina data build`, the manifest, the webdataset DataModule."""

import io
import json
import shutil
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from lina_pl.cli import main as lina
from lina_pl.data.build import split_indices
from lina_pl.data.datamodule import ShardDataModule, ToExample
from lina_pl.data.shards import load_manifest
from lina_pl.data.sources import DigitsSource, ImageFolderSource, create_source

N_DIGITS = 1797


def tar_samples(path):
    """``{key: {extension: bytes}}`` of one shard, read with the standard library (not with webdataset)."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def split_keys(root, split):
    manifest = load_manifest(root)
    return [key for name in manifest["shards"][split] for key in tar_samples(Path(root) / name)]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits"
    assert lina(["data", "build", "--source", "digits", "--out", str(out), "--shard-size", "200"]) == 0
    return out


def fake_trainer(rank, world_size=2):
    return SimpleNamespace(global_rank=rank, world_size=world_size)


# ----------------------------------------------------------------------------------------------- build


def test_digits_build_writes_every_image_once_with_a_complete_manifest(digits_dir):
    manifest = json.loads((digits_dir / "manifest.json").read_text())
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == N_DIGITS
    assert manifest["format"] == "image.png" and manifest["codec"] == {"name": "patchify"}
    assert manifest["num_classes"] == 10 and manifest["class_names"] == [str(d) for d in range(10)]
    assert manifest["resolution"] == [16, 16] and manifest["channels"] == 1
    assert manifest["latent_shape"] == [1, 16, 16]
    assert len(manifest["shards"]["train"]) == 9 and manifest["shards"]["val"] == ["val-000000.tar"]
    train, val = split_keys(digits_dir, "train"), split_keys(digits_dir, "val")
    assert (len(train), len(val)) == (manifest["counts"]["train"], manifest["counts"]["val"])
    assert set(train).isdisjoint(val) and len(set(train) | set(val)) == N_DIGITS
    assert not list(digits_dir.glob(".manifest-*")), "the atomic write left its temp file behind"


def test_shard_pixels_are_the_digits_source_pixels(digits_dir):
    """PNG is lossless: a stored image equals the source image, which spans the full uint8 range."""
    source = DigitsSource()
    sample = tar_samples(digits_dir / "val-000000.tar")
    key, fields = next(iter(sample.items()))
    index = source.keys.index(key)
    stored = np.asarray(Image.open(io.BytesIO(fields["image.png"])))
    expected = np.asarray(source.load(index))
    assert stored.shape == (16, 16) and np.array_equal(stored, expected)
    assert int(fields["cls"]) == source.labels[index]
    assert source._pixels.max() == 255 and source._pixels.min() == 0


def test_split_is_seeded_and_stratified():
    labels = DigitsSource().labels
    first, again, other = (split_indices(labels, 0.1, seed) for seed in (0, 0, 1))
    assert all(np.array_equal(first[s], again[s]) for s in ("train", "val"))
    assert not np.array_equal(first["val"], other["val"])
    per_class = Counter(np.asarray(labels)[first["val"]].tolist())
    for label, n in Counter(labels).items():
        assert per_class[label] == round(0.1 * n)
    assert sorted(np.concatenate([first["train"], first["val"]]).tolist()) == list(range(N_DIGITS))
    with pytest.raises(ValueError, match="val-fraction"):
        split_indices(labels, 1.0, 0)


def test_rebuild_with_the_same_seed_gives_the_same_split(digits_dir, tmp_path):
    lina(["data", "build", "--source", "digits", "--out", str(tmp_path), "--shard-size", "2000"])
    assert split_keys(tmp_path, "val") == split_keys(digits_dir, "val")


def test_build_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "train-000099.tar").write_bytes(b"stale")
    args = ["data", "build", "--source", "digits", "--out", str(tmp_path), "--resolution", "8"]
    with pytest.raises(SystemExit) as exit_info:
        lina(args)
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert lina([*args, "--overwrite", "--val-fraction", "0"]) == 0
    manifest = load_manifest(tmp_path)
    assert manifest["counts"] == {"train": N_DIGITS, "val": 0} and manifest["shards"]["val"] == []
    assert not (tmp_path / "train-000099.tar").exists() and (tmp_path / "notes.txt").exists()
    assert manifest["resolution"] == [8, 8]
    with pytest.raises(SystemExit):  # options are checked before anything is deleted
        lina([*args, "--overwrite", "--val-fraction", "1.5"])
    assert load_manifest(tmp_path) == manifest


def test_build_help_describes_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        lina(["data", "build", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(
        opt in text
        for opt in ("--source", "--vae-path", "--tokenizer-path", "--val-fraction", "--overwrite", "ImageNet")
    )


@pytest.mark.parametrize(
    "options,message",
    [
        (["--codec", "kmeans"], "--tokenizer-path goes with"),
        (["--tokenizer-path", "tok.npz"], "--tokenizer-path goes with"),
        (["--codec", "kmeans", "--vae-path", "vae"], "only used with --codec diffusers"),
        (["--codec", "llamagen_vq", "--tokenizer-path", "missing.pt"], "VQ checkpoint not found"),
    ],
)
def test_tokenizer_build_options_are_checked(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        lina(["data", "build", "--source", "digits", "--out", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_load_manifest_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "image.png"}')
    with pytest.raises(ValueError, match="lacks num_classes"):
        load_manifest(tmp_path)


# ------------------------------------------------------------------------------------------ image folder


def write_striped_image(path, width, height):
    """Red outer thirds of the long side around a green centre square: a centre crop must be all green."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 255
    side = min(width, height)
    top, left = (height - side) // 2, (width - side) // 2
    pixels[top : top + side, left : left + side] = (0, 255, 0)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for name, sizes in {"zebra": [(40, 20), (24, 24)], "ant": [(20, 36)]}.items():
        (root / name).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            write_striped_image(root / name / f"img.{i}.png", w, h)
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_center_crops_non_square_images(image_folder):
    source = ImageFolderSource(image_folder, resolution=8)
    assert source.class_names == ["ant", "zebra"] and source.labels == [0, 1, 1]
    assert source.keys == ["ant_img_0", "zebra_img_0", "zebra_img_1"]
    for key, image, _ in source.samples():
        pixels = np.asarray(image)
        assert image.mode == "RGB" and pixels.shape == (8, 8, 3), key
        assert pixels[..., 0].max() <= 8 and pixels[..., 1].min() >= 247, f"{key}: crop is not centred"


def test_image_folder_errors_name_the_problem(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderSource(image_folder / "ant")
    (image_folder / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no images"):
        ImageFolderSource(image_folder)
    with pytest.raises(ValueError, match="needs --root"):
        create_source("image-folder")


def test_build_from_an_image_folder(image_folder, tmp_path):
    out = tmp_path / "shards"
    args = ["--root", str(image_folder), "--out", str(out), "--resolution", "8", "--val-fraction", "0"]
    assert lina(["data", "build", "--source", "image-folder", *args]) == 0
    manifest = load_manifest(out)
    assert manifest["class_names"] == ["ant", "zebra"] and manifest["channels"] == 3
    assert manifest["counts"]["train"] == 3 and manifest["latent_shape"] == [3, 8, 8]
    assert manifest["root"] == str(image_folder.resolve())


# ------------------------------------------------------------------------------------------- DataModule


def test_batches_are_pixels_in_unit_range_with_int64_labels(digits_dir):
    data = ShardDataModule(str(digits_dir), batch_size=32, num_workers=0, samples_per_epoch=320)
    assert (data.num_classes, data.image_size, data.channels, data.format) == (10, (16, 16), 1, "image.png")
    loader = data.train_dataloader()
    batches = list(loader)
    assert len(loader) == len(batches) == 10
    assert len(list(loader)) == 10, "the second epoch must have the same length"
    batch = batches[0]
    assert batch["latent"].shape == (32, 1, 16, 16) and batch["latent"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64 and 0 <= batch["label"].min() <= batch["label"].max() < 10
    latents = torch.cat([b["latent"] for b in batches])
    assert latents.min() == -1.0 and latents.max() == 1.0
    assert data.skipped_samples == 0


def test_epoch_length_defaults_to_the_train_split(digits_dir):
    data = ShardDataModule(str(digits_dir), batch_size=100, num_workers=0)
    assert len(data.train_dataloader()) == load_manifest(digits_dir)["counts"]["train"] // 100


def test_two_ranks_get_equal_epochs_from_different_streams(digits_dir):
    loaders = []
    for rank in (0, 1):
        data = ShardDataModule(str(digits_dir), batch_size=16, num_workers=0, samples_per_epoch=200)
        data.trainer = fake_trainer(rank)
        loaders.append(data.train_dataloader())
    epochs = [list(loader) for loader in loaders]
    assert len(loaders[0]) == len(loaders[1]) == len(epochs[0]) == len(epochs[1]) == 200 // (16 * 2)
    assert not torch.equal(epochs[0][0]["latent"], epochs[1][0]["latent"]), "ranks must read different data"
    again = ShardDataModule(str(digits_dir), batch_size=16, num_workers=0, samples_per_epoch=200)
    again.trainer = fake_trainer(0)
    assert torch.equal(next(iter(again.train_dataloader()))["latent"], epochs[0][0]["latent"])


def test_epoch_shorter_than_one_global_batch_fails_clearly(digits_dir):
    data = ShardDataModule(str(digits_dir), batch_size=64, num_workers=0, samples_per_epoch=100)
    data.trainer = fake_trainer(0)
    with pytest.raises(ValueError, match="less than one global batch"):
        data.train_dataloader()


def test_val_loader_splits_evenly_over_two_ranks(digits_dir):
    n_val = load_manifest(digits_dir)["counts"]["val"]
    seen, batch_counts = [], []
    for rank in (0, 1):
        data = ShardDataModule(str(digits_dir), batch_size=8, val_batch_size=32, num_workers=0)
        data.trainer = fake_trainer(rank)
        loader = data.val_dataloader()
        batch_counts.append(sum(1 for _ in loader))
        seen += [index for batch in loader.sampler for index in batch]  # it yields whole batches
    assert batch_counts[0] == batch_counts[1] == -(-((n_val + 1) // 2) // 32)
    assert set(seen) == set(range(n_val))


def test_val_set_and_real_images_match_the_stored_pngs(digits_dir):
    data = ShardDataModule(str(digits_dir), num_workers=0)
    images, labels = data.real_images("val")
    stored = tar_samples(digits_dir / "val-000000.tar").values()
    expected = np.stack([np.asarray(Image.open(io.BytesIO(s["image.png"]))) for s in stored])[..., None]
    assert images.dtype == np.uint8 and images.shape == (len(stored), 16, 16, 1)
    assert np.array_equal(images, expected)
    assert labels.tolist() == [int(s["cls"]) for s in stored]
    assert len(data.val_dataset) == len(stored) and data.val_dataset[0]["latent"].shape == (1, 16, 16)
    assert len(data.val_dataloader()) == -(-len(stored) // 64)


def test_val_samples_reads_only_the_first_samples(digits_dir):
    full = ShardDataModule(str(digits_dir), num_workers=0).val_dataset
    head = ShardDataModule(str(digits_dir), num_workers=0, val_samples=20).val_dataset
    assert len(head) == 20 and torch.equal(head[:]["latent"], full[:20]["latent"])


def test_image_flip_mirrors_about_half_the_training_images(digits_dir):
    def first_epoch(flip):
        data = ShardDataModule(str(digits_dir), batch_size=100, num_workers=0, image_flip=flip)
        return torch.cat([b["latent"] for b in data.train_dataloader()])

    torch.manual_seed(0)
    plain = first_epoch(False)
    torch.manual_seed(0)
    flipped = first_epoch(True)
    same = (flipped == plain).flatten(1).all(1)
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1) & ~same
    assert (same | mirrored).all() and 0.4 < mirrored.float().mean() < 0.6


def test_missing_root_and_missing_split_fail_clearly(digits_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardDataModule(str(tmp_path / "nowhere"))
    copy = tmp_path / "no_val"
    shutil.copytree(digits_dir, copy)
    manifest = load_manifest(copy)
    manifest["shards"]["val"] = []
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="limit_val_batches"):
        ShardDataModule(str(copy)).val_dataloader()
    (copy / manifest["shards"]["train"][0]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardDataModule(str(copy)).train_dataloader()


@pytest.fixture
def corrupt_dir(digits_dir, tmp_path):
    """Train shards: one truncated mid-way, one holding a sample whose image.png is not a PNG."""
    root = tmp_path / "corrupt"
    shutil.copytree(digits_dir, root)
    manifest = load_manifest(root)
    truncated = root / manifest["shards"]["train"][0]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    good = tar_samples(root / manifest["shards"]["train"][1])
    with wds.TarWriter(str(root / "train-bad.tar")) as sink:
        for key, fields in list(good.items())[:20]:
            sink.write({"__key__": key, "cls": fields["cls"], "image.png": fields["image.png"]})
        sink.write({"__key__": "bad_png", "cls": b"3", "image.png": b"this is not a png"})
    manifest["shards"]["train"] = [truncated.name, "train-bad.tar"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, truncated.name


def test_bad_samples_are_skipped_counted_and_named(corrupt_dir):
    root, truncated = corrupt_dir
    data = ShardDataModule(str(root), batch_size=32, num_workers=0, samples_per_epoch=640, shuffle_buffer=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(data.train_dataloader())
    assert len(batches) == 20 and all(b["latent"].shape == (32, 1, 16, 16) for b in batches)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'bad_png'" in m and "UnidentifiedImageError" in m for m in messages), messages
    assert any(truncated in m for m in messages), messages
    assert data.skipped_samples >= 2


def test_skips_in_worker_processes_reach_the_main_process(corrupt_dir):
    data = ShardDataModule(str(corrupt_dir[0]), batch_size=32, num_workers=2, samples_per_epoch=640)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(data.train_dataloader())) == 20
    assert data.skipped_samples >= 2


def test_latent_examples_sample_the_image_or_its_flip():
    """Train: a posterior sample of the image or its flip, then (z − shift)·scale; val: the scaled mean."""
    manifest = {"format": "latent.npy", "latent_shape": [2, 1, 1], "num_classes": 3}
    mean, flip_mean = np.array([1.0, 2.0]), np.array([-3.0, 5.0])
    tiny_logvar = np.full(2, -30.0)  # σ = e^-15: the sample is the mean to ~1e-6

    def moments(m):
        return np.concatenate([m, tiny_logvar]).astype(np.float16).reshape(4, 1, 1)

    sample = {"__key__": "k", "cls": 2, "latent.npy": moments(mean), "latent_flip.npy": moments(flip_mean)}
    train = ToExample(manifest, scale=0.5, shift=1.0, train=True)
    outcomes = {
        tuple(train(sample)["latent"].flatten().double().round(decimals=4).tolist()) for _ in range(64)
    }
    assert outcomes == {(0.0, 0.5), (-2.0, 2.0)}
    val = ToExample(manifest, scale=0.5, shift=1.0, train=False)
    assert val(sample)["latent"].flatten().tolist() == [0.0, 0.5] and val(sample)["label"] == 2
    with pytest.raises(ValueError, match="label 3"):
        val({**sample, "cls": 3})
    with pytest.raises(ValueError, match="moments"):
        val({**sample, "latent.npy": np.zeros((2, 1, 1), np.float16)})


class _TinyClassifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(256, 10)

    def training_step(self, batch, _):
        return torch.nn.functional.cross_entropy(self.net(batch["latent"].flatten(1)), batch["label"])

    def validation_step(self, batch, _):
        self.log(
            "val/loss",
            torch.nn.functional.cross_entropy(self.net(batch["latent"].flatten(1)), batch["label"]),
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_the_epoch_length(digits_dir):
    data = ShardDataModule(str(digits_dir), batch_size=32, num_workers=0, samples_per_epoch=256)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(_TinyClassifier(), datamodule=data)
    assert trainer.num_training_batches == 8 and trainer.global_step == 8
    assert trainer.num_val_batches == [len(data.val_dataloader())]
