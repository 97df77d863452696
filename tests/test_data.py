"""Data layer: digits and image-folder sources, `lina data build`, the manifest, the DataModule, resuming the
training stream, `lina bench data`."""

import hashlib
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

from lina_pl.bench.data import main as bench_data
from lina_pl.bench.data import write_latent_shards
from lina_pl.cli import main as lina
from lina_pl.data.build import split_indices
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.reader import Examples
from lina_pl.data.shards import file_sha256, load_manifest
from lina_pl.data.sources import DigitsSource, ImageFolderSource, create_source
from lina_pl.data.stream import Layout

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


def write_manifest_json(root, manifest):
    """A hand-edited manifest, written as a test that damages data would (no checks)."""
    (Path(root) / "manifest.json").write_text(json.dumps(manifest))


def refresh_file_entry(root, manifest, name, samples):
    """The manifest entry of a shard a test (re)wrote on purpose: its checksum and sample count."""
    manifest["files"][name] = {
        "samples": samples,
        "shapes": [samples],
        "sha256": file_sha256(Path(root) / name),
    }


def take(loader, n):
    """The first ``n`` batches of a training loader, across as many epochs as that takes."""
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


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
    assert not list(digits_dir.glob(".manifest*")), "the atomic write left its temp file behind"
    for split in ("train", "val"):
        entries = [manifest["files"][name] for name in manifest["shards"][split]]
        assert [e["samples"] for e in entries] == [
            len(tar_samples(digits_dir / n)) for n in manifest["shards"][split]
        ]
        assert all(e["shapes"] == [e["samples"]] for e in entries)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == hashlib.sha256((digits_dir / name).read_bytes()).hexdigest()


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


def test_rebuild_with_the_same_seed_gives_the_same_split_and_bytes(digits_dir, tmp_path):
    lina(["data", "build", "--source", "digits", "--out", str(tmp_path), "--shard-size", "2000"])
    assert split_keys(tmp_path, "val") == split_keys(digits_dir, "val")
    checksum = load_manifest(tmp_path)["files"]["val-000000.tar"]["sha256"]
    assert checksum == load_manifest(digits_dir)["files"]["val-000000.tar"]["sha256"], "tar bytes must repeat"


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
    manifest["shards"]["val"], manifest["counts"]["val"] = [], 0
    write_manifest_json(copy, manifest)
    with pytest.raises(ValueError, match="limit_val_batches"):
        ShardDataModule(str(copy)).val_dataloader()
    (copy / manifest["shards"]["train"][0]).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ShardDataModule(str(copy)).train_dataloader()


@pytest.fixture
def corrupt_dir(digits_dir, tmp_path):
    """Train shards: one truncated mid-way (its checksum fails), one holding a sample whose image.png is not
    a PNG (written that way, so its checksum holds)."""
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
    manifest["counts"]["train"] = 200 + 21
    refresh_file_entry(root, manifest, "train-bad.tar", 21)
    write_manifest_json(root, manifest)
    return root, truncated.name


def check_exact_losses(data, truncated):
    """Every read of the truncated shard lost its 200 samples, every read of train-bad.tar its bad PNG."""
    damaged = {name: (lost, reads) for name, lost, reads in data.damaged_shards}
    assert set(damaged) == {truncated, "train-bad.tar"}
    (lost_truncated, reads_truncated), (lost_bad, reads_bad) = damaged[truncated], damaged["train-bad.tar"]
    assert lost_truncated == 200 * reads_truncated and lost_bad == reads_bad >= 1
    assert data.skipped_samples == lost_truncated + lost_bad


def test_bad_samples_are_skipped_counted_exactly_and_named(corrupt_dir):
    root, truncated = corrupt_dir
    data = ShardDataModule(str(root), batch_size=32, num_workers=0, samples_per_epoch=640, shuffle_buffer=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(data.train_dataloader())
    assert len(batches) == 20 and all(b["latent"].shape == (32, 1, 16, 16) for b in batches)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("'bad_png'" in m and "UnidentifiedImageError" in m for m in messages), messages
    assert any(truncated in m and "checksum mismatch" in m for m in messages), messages
    check_exact_losses(data, truncated)


def test_skips_in_worker_processes_reach_the_main_process(corrupt_dir):
    data = ShardDataModule(str(corrupt_dir[0]), batch_size=32, num_workers=2, samples_per_epoch=640)
    loader = data.train_dataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(list(loader)) == 20
    loader.close()
    check_exact_losses(data, corrupt_dir[1])


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_latent_examples_sample_the_image_or_its_flip():
    """Train: a posterior sample of the image or its flip, then (z − shift)·scale; val: the scaled mean."""
    manifest = {"format": "latent.npy", "latent_shape": [2, 1, 1], "num_classes": 3}
    mean, flip_mean = np.array([1.0, 2.0]), np.array([-3.0, 5.0])
    tiny_logvar = np.full(2, -30.0)  # σ = e^-15: the sample is the mean to ~1e-6

    def moments(m):
        return npy(np.concatenate([m, tiny_logvar]).astype(np.float16).reshape(4, 1, 1))

    sample = {"__key__": "k", "cls": b"2", "latent.npy": moments(mean), "latent_flip.npy": moments(flip_mean)}
    examples = Examples(manifest, scale=0.5, shift=1.0)
    item = examples.check(sample)
    train = examples.batch([item] * 64, torch.Generator().manual_seed(0))["latent"].flatten(1)
    assert {tuple(row) for row in train.double().round(decimals=4).tolist()} == {(0.0, 0.5), (-2.0, 2.0)}
    val = examples.batch([item])
    assert val["latent"].flatten().tolist() == [0.0, 0.5] and val["label"].tolist() == [2]
    with pytest.raises(ValueError, match="label 3"):
        examples.check({**sample, "cls": b"3"})
    with pytest.raises(ValueError, match="moments"):
        wrong = npy(np.zeros((2, 1, 1), np.float16))
        examples.check({**sample, "latent.npy": wrong, "latent_flip.npy": wrong})
    with pytest.raises(ValueError, match="NaN"):
        examples.check({**sample, "latent_flip.npy": moments(np.array([np.nan, 0.0]))})


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


class _Recorder(_TinyClassifier):
    """Keeps every training batch it saw."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((batch["latent"].clone(), batch["label"].clone()))
        return super().training_step(batch, batch_idx)


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


def as_pairs(batches):
    return [(b["latent"], b["label"]) for b in batches]


# -------------------------------------------------------------------------------------------- resuming


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_continues_with_the_batches_of_the_uninterrupted_one(digits_dir, workers):
    """Stop after k batches (mid-epoch, or two epochs later), resume from the state: batches k+1..n equal
    the uninterrupted stream's, also with DataLoader workers (epochs of 7 batches, 24 batches in all)."""
    options = dict(batch_size=16, num_workers=workers, samples_per_epoch=16 * 7, shuffle_buffer=300)
    loader = ShardDataModule(str(digits_dir), **options).train_dataloader()
    full = as_pairs(take(loader, 24))
    loader.close()
    assert not torch.equal(full[0][0], full[7][0]), "each epoch must continue the stream, not repeat it"
    for k in (5, 16):
        data = ShardDataModule(str(digits_dir), **options)
        loader = data.train_dataloader()
        assert same_batches(as_pairs(take(loader, k)), full[:k])
        state = data.state_dict()
        loader.close()
        assert state["train_stream"]["batches"] == k
        resumed = ShardDataModule(str(digits_dir), **options)
        resumed.load_state_dict(state)
        loader = resumed.train_dataloader()
        assert same_batches(as_pairs(take(loader, 24 - k)), full[k:]), f"resumed after {k} batches"
        loader.close()


def test_layout_locates_every_batch_boundary_of_a_bucketed_stream():
    """``Layout.locate(n)`` (arithmetic) equals a slot-by-slot run of the bucketing: where batch n ends and,
    per latent shape, which slots wait in its pending list."""
    counts = np.array([[5, 2], [3, 4], [6, 0], [1, 7], [2, 2]])  # 5 shards, 2 shapes
    layout = Layout(counts, group_shards=2, batch_size=3, key=(7, 1, 0))
    boundaries, pending, emitted, (p, g) = {0: ((0, 0, 0), [[], []])}, [[], []], 0, (0, 0)
    while emitted < 60:  # about five passes
        shapes = layout.slot_shapes(p, g)
        assert np.bincount(shapes, minlength=2).tolist() == layout.counts(p, g).tolist()
        for i, b in enumerate(shapes):
            pending[b].append((p, g, i))
            if len(pending[b]) == 3:
                pending[b], emitted = [], emitted + 1
                boundaries[emitted] = ((p, g, i + 1), [list(slots) for slots in pending])
        p, g = layout.next(p, g)
    for n, expected in boundaries.items():
        assert layout.locate(n) == expected, n
    passes = [np.concatenate([layout.shards(p, g) for g in range(layout.groups)]) for p in range(3)]
    assert all(sorted(order.tolist()) == list(range(5)) for order in passes), "a pass reads every shard once"
    assert not all(np.array_equal(passes[0], order) for order in passes[1:]), "passes are reshuffled"


def test_resuming_a_different_stream_says_it_cannot_be_exact(digits_dir):
    data = ShardDataModule(str(digits_dir), batch_size=16, num_workers=0)
    take(data.train_dataloader(), 3)
    state = data.state_dict()
    other = ShardDataModule(str(digits_dir), batch_size=32, num_workers=0)
    other.load_state_dict(state)
    with pytest.warns(UserWarning, match="batch_size 16 -> 32.*continues at batch 3"):
        other.train_dataloader()


def test_fit_resumed_from_a_checkpoint_sees_the_batches_of_the_uninterrupted_fit(digits_dir, tmp_path):
    """Through Lightning: the stream position is the trainer's count of batches whose step ran."""

    def fit(steps, ckpt_path=None):
        model = _Recorder()
        trainer = L.Trainer(
            max_steps=steps,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        data = ShardDataModule(str(digits_dir), batch_size=16, num_workers=0, samples_per_epoch=16 * 5)
        trainer.fit(model, data, ckpt_path=ckpt_path)
        return trainer, model.seen

    _, full = fit(12)
    trainer, first = fit(7)  # stops in the middle of the second epoch
    trainer.save_checkpoint(tmp_path / "step7.ckpt")
    _, rest = fit(12, tmp_path / "step7.ckpt")
    assert same_batches(first, full[:7]) and same_batches(rest, full[7:])


# ------------------------------------------------------------------------------------------ latent shards


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    """48 synthetic KL-16 latent samples (float16 moments [32, 16, 16]) in 3 shards, written as the benchmark
    writes them; the first shard doubles as the val split."""
    root = tmp_path_factory.mktemp("latents")
    manifest = write_latent_shards(root, samples=48, shard_size=16)
    manifest["shards"]["val"], manifest["counts"]["val"] = manifest["shards"]["train"][:1], 16
    write_manifest_json(root, manifest)
    return root


def test_latent_scale_and_shift_come_from_the_manifest_unless_given(latent_dir, tmp_path):
    root = tmp_path / "shifted"
    shutil.copytree(latent_dir, root)
    manifest = load_manifest(root)
    assert manifest["codec"]["scaling_factor"] == 0.2325
    manifest["codec"]["shift_factor"] = 0.5
    write_manifest_json(root, manifest)
    first = next(iter(tar_samples(root / manifest["shards"]["val"][0]).values()))
    mean = torch.from_numpy(np.load(io.BytesIO(first["latent.npy"]))[:16].astype(np.float32))

    data = ShardDataModule(str(root), num_workers=0)
    assert (data.latent_scale, data.latent_shift) == (0.2325, 0.5)
    torch.testing.assert_close(data.val_dataset[0]["latent"], (mean - 0.5) * 0.2325)
    given = ShardDataModule(str(root), num_workers=0, latent_scale=1.0, latent_shift=0.0)
    torch.testing.assert_close(given.val_dataset[0]["latent"], mean)


def test_bench_data_prints_throughput_and_a_cost_breakdown(capsys):
    options = ["--samples", "48", "--shard-size", "16", "--batch-size", "8", "--workers", "0"]
    assert bench_data([*options, "--batches", "2", "--warmup", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["latent_shape"] == [16, 16, 16] and result["workers"] == 0 and result["batch_size"] == 8
    figures = ("samples_per_s", "pipeline_cpu_us_per_sample", "cpu_bound_samples_per_s")
    assert all(result[k] > 0 for k in figures) and result["main_process_cpu_us_per_sample"] is None
    assert result["target_samples_per_s"] == 5000 and isinstance(result["meets_target"], bool)
    stages = result["per_sample_us"]
    assert set(stages) == {"tar_read", "decode", "collate", "posterior_flip", "total"}
    assert all(value >= 0 for value in stages.values()) and stages["total"] > 0
