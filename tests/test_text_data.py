"""Text-to-image data: digit-scene and captioned-folder shards, cached text features, aspect buckets."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import fake_trainer, npy, take, tar_samples

from lina_pl.cli import main as lina
from lina_pl.data.build import CaptionFeatures
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.digit_scenes import make_prompts, scenes
from lina_pl.data.reader import Examples
from lina_pl.data.shards import load_manifest
from lina_pl.data.sources import center_crop_resize, closest_size
from lina_pl.text.encoder import MINILM_ALIAS, TextEncoder

N_TRAIN, N_VAL, MAX_LENGTH, FEATURES = 64, 16, 16, 384
SCENES = ["--source", "digit-scenes", "--train-size", str(N_TRAIN), "--val-size", str(N_VAL)]


def split_samples(root, split):
    manifest = load_manifest(root)
    return {k: v for name in manifest["shards"][split] for k, v in tar_samples(Path(root) / name).items()}


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory):
    """Digit scenes with cached MiniLM features."""
    out = tmp_path_factory.mktemp("scenes") / "emb"
    encoder = ["--text-encoder", MINILM_ALIAS, "--text-max-length", str(MAX_LENGTH)]
    assert lina(["data", "build", *SCENES, *encoder, "--out", str(out), "--shard-size", "32"]) == 0
    return out


@pytest.fixture(scope="module")
def captions_only_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "txt"
    assert lina(["data", "build", *SCENES, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder(MINILM_ALIAS, max_length=MAX_LENGTH)


# ------------------------------------------------------------------------------------------ digit scenes


def test_scene_manifests_describe_text_data(scenes_dir, captions_only_dir):
    manifest = json.loads((scenes_dir / "manifest.json").read_text())
    assert manifest["condition"] == "text" and manifest["source"] == "digit-scenes"
    assert manifest["num_classes"] == 0 and manifest["class_names"] == []
    assert manifest["text_encoder"] == {
        "path": MINILM_ALIAS,
        "kind": "encoder",
        "max_length": MAX_LENGTH,
        "feature_dim": FEATURES,
    }
    assert manifest["resolution"] == [32, 32] and manifest["resolutions"] == [[32, 32]]
    assert manifest["latent_shape"] == [3, 32, 32] and manifest["latent_shapes"] == [[3, 32, 32]]
    assert manifest["counts"] == {"train": N_TRAIN, "val": N_VAL} and manifest["val_fraction"] is None
    assert manifest["format"] == "image.png" and manifest["channels"] == 3
    plain = load_manifest(captions_only_dir)
    assert plain["text_encoder"] is None and plain["condition"] == "text"


def test_scene_samples_hold_a_caption_and_float16_token_features(scenes_dir, captions_only_dir):
    samples = split_samples(scenes_dir, "train")
    assert len(samples) == N_TRAIN
    for key, fields in samples.items():
        assert set(fields) == {"txt", "image.png", "txt_emb.npy"}, key
        emb = np.load(io.BytesIO(fields["txt_emb.npy"]), allow_pickle=False)
        assert emb.dtype == np.float16 and emb.ndim == 2 and emb.shape[1] == FEATURES
        assert 1 <= emb.shape[0] <= MAX_LENGTH and np.isfinite(emb).all()
        assert fields["txt"].decode("utf-8").strip()
    plain = split_samples(captions_only_dir, "val")
    assert all(set(fields) == {"txt", "image.png"} for fields in plain.values())


def test_val_scenes_are_evaluation_scenes_of_held_out_digits(scenes_dir):
    data = ShardDataModule(str(scenes_dir), num_workers=0)
    images, captions = data.real_images("val")
    assert captions == make_prompts(N_VAL, 0)
    held_out = np.stack([image for image, _ in scenes("eval", N_VAL, 0)])
    same_layout_train_digits = np.stack([image for image, _ in scenes("train", N_VAL, 0)])
    assert images.dtype == np.uint8 and np.array_equal(images, held_out)
    assert not np.array_equal(images, same_layout_train_digits)
    train_images, train_captions = data.real_images("train")
    expected = list(scenes("train", N_TRAIN, 1))  # train scenes use seed + 1: other layouts than val's
    assert train_captions == [caption for _, caption in expected]
    assert np.array_equal(train_images, np.stack([image for image, _ in expected]))


def check_text_batch(batch, size):
    assert set(batch) == {"latent", "text", "text_emb", "text_mask"}
    assert batch["latent"].shape == (size, 3, 32, 32) and batch["latent"].dtype == torch.float32
    assert len(batch["text"]) == size and all(isinstance(t, str) for t in batch["text"])
    emb, mask = batch["text_emb"], batch["text_mask"]
    assert emb.dtype == torch.float32 and mask.dtype == torch.bool
    lengths = mask.sum(1)
    assert emb.shape == (size, int(lengths.max()), FEATURES) and mask.shape == emb.shape[:2]
    assert emb.shape[1] <= MAX_LENGTH
    assert torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None]), "mask must be a prefix"
    assert (emb[~mask] == 0).all() and (emb[mask].abs().sum(-1) > 0).all()


def test_text_batches_carry_captions_features_and_masks(scenes_dir):
    data = ShardDataModule(str(scenes_dir), batch_size=8, num_workers=0)
    assert (data.condition, data.num_classes, data.text_encoder["feature_dim"]) == ("text", 0, FEATURES)
    batches = list(data.train_dataloader())
    assert len(batches) == N_TRAIN // 8
    for batch in batches:
        check_text_batch(batch, 8)
    val = list(data.val_dataloader())
    assert len(val) == N_VAL // 8
    for batch in val:
        check_text_batch(batch, 8)
    assert [t for b in val for t in b["text"]] == make_prompts(N_VAL, 0)


def test_cached_features_equal_online_encoding(scenes_dir, encoder):
    data = ShardDataModule(str(scenes_dir), batch_size=N_VAL, num_workers=0)
    batch = next(iter(data.val_dataloader()))
    fresh, fresh_mask = encoder.encode(batch["text"])
    length = batch["text_mask"].shape[1]
    assert torch.equal(fresh_mask[:, :length], batch["text_mask"]) and not fresh_mask[:, length:].any()
    mask = batch["text_mask"]
    torch.testing.assert_close(batch["text_emb"][mask], fresh[:, :length][mask], rtol=2e-3, atol=2e-3)


def test_caption_only_shards_give_captions_to_encode_online(captions_only_dir):
    data = ShardDataModule(str(captions_only_dir), batch_size=16, num_workers=0, samples_per_epoch=32)
    assert data.condition == "text" and data.text_encoder is None and data.num_classes == 0
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"latent", "text"} and len(batch["text"]) == 16
    assert set(next(iter(data.val_dataloader()))) == {"latent", "text"}


class _CountingEncoder:
    """Stands in for a TextEncoder: caption i -> ``[len(caption), 2]`` features; records every call."""

    batch_size, max_length = 4, 64

    def __init__(self):
        self.calls = []

    def encode(self, captions):
        self.calls.append(list(captions))
        features = torch.zeros(len(captions), self.max_length, 2)
        mask = torch.arange(self.max_length) < torch.tensor([len(c) for c in captions])[:, None]
        for i, caption in enumerate(captions):
            features[i, : len(caption)] = torch.tensor([float(ord(caption[0])), 1.0])
        return features, mask


def test_caption_features_encode_each_distinct_caption_once_in_full_batches():
    encoder = _CountingEncoder()
    features = CaptionFeatures(encoder)
    captions = ["a", "bb", "a", "c", "a", "dd", "e", "bb", "f", "g"]
    out = []
    for start in range(0, len(captions), 3):
        out += features(captions[start : start + 3], ahead=iter(captions[start + 3 :]))
    assert [f.shape for f in out] == [(len(c), 2) for c in captions]
    assert all(f.dtype == np.float16 and f[0, 0] == ord(c[0]) for f, c in zip(out, captions, strict=True))
    assert encoder.calls == [["a", "bb", "c", "dd"], ["e", "f", "g"]], "distinct, looked ahead, batched"
    small = CaptionFeatures(_CountingEncoder(), max_bytes=16)  # room for one 4-token caption
    assert [f.shape[0] for f in small(["aaaa", "bb", "aaaa"])] == [4, 2, 4]
    assert small.bytes == 16 and list(small.cache) == ["aaaa"], "the least recently used goes first"


@pytest.mark.parametrize(
    "condition,image_flip,expected",
    [("text", None, {0}), ("text", True, {0, 1}), ("class", None, {0, 1}), ("class", False, {0})],
)
def test_stored_flips_are_off_for_text_data_by_default(condition, image_flip, expected):
    """Captions may say left or right: text data trains on unflipped codes/latents unless asked."""
    manifest = {"format": "codes.npy", "latent_shape": [1, 1], "condition": condition, "num_classes": 2}
    sample = {
        "__key__": "k",
        "codes.npy": npy(np.zeros((1, 1), np.int32)),
        "codes_flip.npy": npy(np.ones((1, 1), np.int32)),
    }
    sample |= {"cls": b"1"} if condition == "class" else {"txt": b"a 1 to the left of a 9"}
    examples = Examples(manifest, image_flip=image_flip)
    batch = examples.batch([examples.check(sample)] * 32, torch.Generator().manual_seed(0))
    assert set(batch["latent"].flatten().tolist()) == expected


# ----------------------------------------------------------------------------- captioned folder, buckets


def test_crop_follows_the_closest_bucket():
    assert closest_size(40, 20, [(16, 16), (16, 24)]) == (16, 24)
    assert closest_size(20, 22, [(16, 16), (16, 24)]) == (16, 16)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[..., 0] = 255
    pixels[:, 5:35] = (0, 255, 0)  # the centred 30×20 crop (aspect 3:2) is all green
    out = np.asarray(center_crop_resize(Image.fromarray(pixels), (16, 24)))
    assert out.shape == (16, 24, 3) and out[..., 0].max() <= 8 and out[..., 1].min() >= 247


#: (width, height) of the folder's images: 5 square ones, 7 wide ones (one wider than the 16x24 bucket)
FOLDER_SIZES = [(20, 20)] * 5 + [(30, 20)] * 6 + [(40, 20)]


@pytest.fixture
def captioned_folder(tmp_path):
    root = tmp_path / "captioned"
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(FOLDER_SIZES):
        folder = root / ("wide" if w > h else "square")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"picture number {i}\n", encoding="utf-8")
    return root


def build_folder(root, out, *extra):
    args = ["--source", "image-folder", "--root", str(root), "--out", str(out), "--sizes", "16x16", "16x24"]
    return lina(["data", "build", *args, "--val-fraction", "0.25", "--shard-size", "4", *extra])


def expected_shape(caption):
    """The latent shape of ``picture number i``: 16×16 for the square images, 16×24 for the wide ones."""
    w, h = FOLDER_SIZES[int(caption.split()[-1])]
    return (3, 16, 24) if w > h else (3, 16, 16)


def check_bucketed(batch):
    shapes = {expected_shape(c) for c in batch["text"]}
    assert shapes == {tuple(batch["latent"].shape[1:])}, "a batch must hold one image size"


def test_mixed_size_folder_gives_batches_of_one_size(captioned_folder, tmp_path):
    out = tmp_path / "shards"
    assert build_folder(captioned_folder, out) == 0
    manifest = load_manifest(out)
    assert (
        manifest["condition"] == "text" and manifest["num_classes"] == 0 and manifest["text_encoder"] is None
    )
    assert manifest["resolutions"] == [[16, 24], [16, 16]] and manifest["resolution"] == [16, 24]
    assert manifest["latent_shapes"] == [[3, 16, 24], [3, 16, 16]] and manifest["latent_shape"] == [3, 16, 24]
    assert manifest["counts"] == {"train": 9, "val": 3}
    train_captions = {f["txt"].decode().strip() for f in split_samples(out, "train").values()}
    val_captions = [f["txt"].decode().strip() for f in split_samples(out, "val").values()]

    data = ShardDataModule(str(out), batch_size=2, num_workers=0, samples_per_epoch=200, shuffle_buffer=8)
    assert data.image_sizes == [(16, 24), (16, 16)] and data.image_size == (16, 24)
    batches = list(data.train_dataloader())
    assert len(batches) == 100
    for batch in batches:
        check_bucketed(batch)
    assert {c for b in batches for c in b["text"]} == train_captions, "every training sample is seen"
    assert {tuple(b["latent"].shape) for b in batches} == {(2, 3, 16, 24), (2, 3, 16, 16)}

    single = ShardDataModule(str(out), val_batch_size=2, num_workers=0)
    assert sorted(c for b in single.val_dataloader() for c in b["text"]) == sorted(val_captions)
    with pytest.raises(ValueError, match="one size"):
        single.real_images("train")


def test_a_resumed_bucketed_stream_continues_with_the_uninterrupted_batches(captioned_folder, tmp_path):
    """Aspect buckets: the pending list of each size is rebuilt on resume (groups of 1-2 shards)."""
    out = tmp_path / "shards"
    assert build_folder(captioned_folder, out) == 0
    options = dict(batch_size=2, num_workers=0, samples_per_epoch=10, shuffle_buffer=6)
    full = take(ShardDataModule(str(out), **options).train_dataloader(), 30)
    for k in (3, 11, 17):
        data = ShardDataModule(str(out), **options)
        take(data.train_dataloader(), k)
        resumed = ShardDataModule(str(out), **options)
        resumed.load_state_dict(data.state_dict())
        rest = take(resumed.train_dataloader(), 30 - k)
        assert [b["text"] for b in rest] == [b["text"] for b in full[k:]], f"resumed after {k}"
        assert all(torch.equal(a["latent"], b["latent"]) for a, b in zip(rest, full[k:], strict=True))
    assert {tuple(b["latent"].shape) for b in full} == {(2, 3, 16, 24), (2, 3, 16, 16)}


def test_validation_buckets_split_evenly_over_ranks(captioned_folder, tmp_path):
    out = tmp_path / "shards"
    assert build_folder(captioned_folder, out, "--val-fraction", "0.5") == 0
    val_captions = {f["txt"].decode().strip() for f in split_samples(out, "val").values()}
    assert {expected_shape(c) for c in val_captions} == {(3, 16, 16), (3, 16, 24)}
    per_rank = []
    for rank in (0, 1):
        data = ShardDataModule(str(out), val_batch_size=2, num_workers=0)
        data.trainer = fake_trainer(rank, 2)
        loader = data.val_dataloader()
        batches = list(loader)
        assert len(loader) == len(batches)
        for batch in batches:
            check_bucketed(batch)
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1]), "every rank must run the same number of batches"
    assert {c for batches in per_rank for b in batches for c in b["text"]} == val_captions


def test_a_missing_caption_is_named(captioned_folder, tmp_path, capsys):
    (captioned_folder / "wide" / "img07.txt").unlink()
    with pytest.raises(SystemExit) as exit_info:
        build_folder(captioned_folder, tmp_path / "out")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "img07.png has no caption file img07.txt" in err
    assert not (tmp_path / "out").exists()


def test_latent_shards_keep_one_shape_per_batch(captioned_folder, tmp_path):
    pytest.importorskip("diffusers")
    from test_vae_codec import tiny_vae  # a random 4-channel, stride-2 AutoencoderKL

    vae = tmp_path / "vae"
    tiny_vae().save_pretrained(vae)
    out = tmp_path / "latents"
    assert build_folder(captioned_folder, out, "--codec", "diffusers", "--vae-path", str(vae)) == 0
    manifest = load_manifest(out)
    assert manifest["format"] == "latent.npy" and manifest["latent_shapes"] == [[4, 8, 12], [4, 8, 8]]
    data = ShardDataModule(str(out), batch_size=3, num_workers=0, samples_per_epoch=30)
    shapes = {tuple(b["latent"].shape) for b in data.train_dataloader()}
    assert shapes == {(3, 4, 8, 12), (3, 4, 8, 8)}
    assert all(b["latent"].shape[0] <= 3 for b in data.val_dataloader())


# ------------------------------------------------------------------------------------- old data, options


def test_old_class_shards_still_load(tmp_path):
    out = tmp_path / "digits"
    assert lina(["data", "build", "--source", "digits", "--out", str(out), "--resolution", "8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["condition"] == "class" and manifest["text_encoder"] is None
    for key in ("condition", "text_encoder", "resolutions", "latent_shapes"):  # as written before text data
        del manifest[key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    data = ShardDataModule(str(out), batch_size=32, num_workers=0, samples_per_epoch=64)
    assert (data.condition, data.num_classes, data.text_encoder) == ("class", 10, None)
    assert data.image_sizes == [(8, 8)] and data.latent_shapes == [(1, 8, 8)]
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"latent", "label"} and batch["label"].dtype == torch.int64
    images, labels = data.real_images("val")
    assert images.shape[1:] == (8, 8, 1) and labels.dtype == np.int64


@pytest.mark.parametrize(
    "options,message",
    [
        (["--source", "digits", "--text-encoder", MINILM_ALIAS], "needs captions"),
        (["--source", "digits", "--train-size", "10"], "only used with --source digit-scenes"),
        (["--source", "digits", "--sizes", "8x8"], "only used with --source image-folder"),
        (["--source", "digits", "--sizes", "8by8"], "is not HxW"),
        ([*SCENES, "--val-fraction", "0.2"], "set --val-size, not --val-fraction"),
        ([*SCENES, "--text-max-length", "16"], "only used with --text-encoder"),
        ([*SCENES, "--sizes", "32x32", "--resolution", "32"], "not both"),
    ],
)
def test_text_build_options_are_checked(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        lina(["data", "build", "--out", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
