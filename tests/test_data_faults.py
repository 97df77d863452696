"""Damaged data (the fault trial of issue #12): unreadable, truncated and altered shards are found, named and
counted exactly; a run that can read nothing stops; validation refuses a damaged split; `lina data verify`;
old manifests without checksums; and a fuzz test over random and corrupted shard bytes."""

import contextlib
import io
import os
import shutil
import signal
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from test_data import (
    _TinyClassifier,
    digits_dir,  # noqa: F401 — the module-scoped fixture
    refresh_file_entry,
    take,
    tar_samples,
    write_manifest_json,
)

from lina_pl.bench.data import write_latent_shards
from lina_pl.cli import main as lina
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.reader import Examples, ShardError, read_shard
from lina_pl.data.shards import load_manifest, shard_entries

#: copies made to look like older builds warn that they cannot be verified (tested once, below)
pytestmark = pytest.mark.filterwarnings("ignore:.*has no shard checksums:UserWarning")


@contextlib.contextmanager
def deadline(seconds):
    """Fail with TimeoutError instead of hanging (the main thread gets SIGALRM)."""

    def expire(signum, frame):
        raise TimeoutError(f"no result within {seconds} s: the data pipeline hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def copy_dir(source, target, checksums=True):
    """A copy of a shard directory; ``checksums=False`` makes its manifest look like an older build's."""
    shutil.copytree(source, target)
    manifest = load_manifest(target)
    if not checksums:
        del manifest["files"]
    write_manifest_json(target, manifest)
    return manifest


def members(path):
    """``(key, header offset, data end)`` of every member of an intact shard (standard library reader)."""
    with tarfile.open(path) as tar:
        return [(m.name.split(".", 1)[0], m.offset, m.offset_data + m.size) for m in tar.getmembers()]


def samples_before(path, offset):
    """Samples of an intact shard whose every member lies (header and data) before byte ``offset``."""
    last_end = {}
    for key, _, end in members(path):
        last_end[key] = end
    return sum(end <= offset for end in last_end.values())


# ------------------------------------------------------------------------------------ nothing readable


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_train_shards_stop_with_one_clear_error(digits_dir, tmp_path, workers):  # noqa: F811
    """Was: a warning per shard, then 100% CPU forever without a step (and no way to stop it)."""
    root = tmp_path / "unreadable"
    manifest = copy_dir(digits_dir, root)
    for name in manifest["shards"]["train"]:
        (root / name).write_bytes(b"not a tar archive\n" * 64)
    data = ShardDataModule(str(root), batch_size=16, num_workers=workers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with deadline(60), pytest.raises(ShardError) as error:
            next(iter(data.train_dataloader()))
    message = str(error.value)
    assert "a full pass over the 9 training shards" in message and "yielded no readable sample" in message
    assert str(root) in message and "lina data verify" in message and "\n" not in message


# -------------------------------------------------------------------------------- the fault-trial cases


def damage(path, kind):
    """Damage a digits shard (200 samples of two members, cls and image.png) as the fault trial did; returns
    the good samples left when the damage is found by parsing alone (no checksum)."""
    data = bytearray(path.read_bytes())
    layout = members(path)
    if kind == "header":  # a byte in the header of sample 97's first member: was read as the end of archive
        data[layout[2 * 97][1] + 20] ^= 0xFF
        good = 97
    elif kind == "member_boundary":  # cut where sample 100 begins: half the shard was lost silently
        del data[layout[2 * 100][1] :]
        good = 100
    elif kind == "mid_member":  # cut inside sample 150's image
        del data[layout[2 * 150 + 1][2] - 10 :]
        good = 150
    else:  # "cls": sample 30's label byte flipped to a non-digit (a flip to a digit only a checksum finds)
        data[layout[2 * 30][2] - 1] = ord("x")
        good = 199
    path.write_bytes(bytes(data))
    return good


@pytest.mark.parametrize("checksums", [True, False])
@pytest.mark.parametrize("kind", ["header", "member_boundary", "mid_member", "cls"])
def test_damaged_train_shards_are_skipped_and_counted_exactly(digits_dir, tmp_path, kind, checksums):  # noqa: F811
    root = tmp_path / "damaged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the older-manifest warning
        manifest = copy_dir(digits_dir, root, checksums)
    name = manifest["shards"]["train"][0]
    good = damage(root / name, kind)
    expected_loss = 200 if checksums else 200 - good
    data = ShardDataModule(str(root), batch_size=64, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with deadline(60):
            batches = take(data.train_dataloader(), 40)  # more than a pass over the 1,618 samples
    assert all(b["latent"].shape == (64, 1, 16, 16) and torch.isfinite(b["latent"]).all() for b in batches)
    ((shard, lost, reads),) = data.damaged_shards
    assert shard == name and reads >= 1 and lost == reads * expected_loss
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(f"{name}: lost {expected_loss} of 200 samples" in m for m in messages), messages
    if checksums:
        assert any("checksum mismatch" in m for m in messages)


def test_a_val_shard_cut_short_is_an_error_naming_the_loss(digits_dir, tmp_path):  # noqa: F811
    """Was: validation ran on 90 of the 179 samples without a word."""
    for checksums, readable in ((False, 90), (True, 0)):
        root = tmp_path / f"val_{checksums}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            copy_dir(digits_dir, root, checksums)
        shard = root / "val-000000.tar"
        shard.write_bytes(shard.read_bytes()[: members(shard)[2 * 90][1]])  # where sample 90 begins
        data = ShardDataModule(str(root), num_workers=0)
        with pytest.raises(
            ShardError, match=f"'val' split .* is damaged: {readable} of 179 samples readable"
        ):
            data.val_dataloader()
        with pytest.raises(ShardError, match="lina data verify"):
            data.real_images("val")


@pytest.mark.filterwarnings("ignore:skipping damaged data")
def test_the_end_of_fit_reports_what_the_training_data_lost(digits_dir, tmp_path):  # noqa: F811
    root = tmp_path / "lossy"
    manifest = copy_dir(digits_dir, root)
    name = manifest["shards"]["train"][3]
    damage(root / name, "member_boundary")
    data = ShardDataModule(str(root), batch_size=32, num_workers=0, samples_per_epoch=32 * 60)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with pytest.warns(RuntimeWarning, match=rf"training data: \d+ samples lost in \d+ shard reads.*{name}"):
        trainer.fit(_TinyClassifier(), datamodule=data)
    ((_, lost, reads),) = data.damaged_shards
    assert lost == 200 * reads and data.skipped_samples == lost


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="lists open files through Linux /proc")
def test_shard_files_are_closed_after_damaged_reads(digits_dir, tmp_path):  # noqa: F811
    root = tmp_path / "closed"
    manifest = copy_dir(digits_dir, root)
    for name, kind in zip(manifest["shards"]["train"][:2], ("header", "mid_member"), strict=True):
        damage(root / name, kind)
    data = ShardDataModule(str(root), batch_size=64, num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        take(data.train_dataloader(), 30)
    fds = Path("/proc/self/fd")
    open_files = [os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()]
    assert not [f for f in open_files if f.startswith(str(root))], open_files


# --------------------------------------------------------------------------------- lina data verify


def test_verify_reports_each_split_and_fails_on_damage(digits_dir, tmp_path, capsys):  # noqa: F811
    assert lina(["data", "verify", str(digits_dir)]) == 0
    out = capsys.readouterr().out
    assert "train: 9 shards, 1618 of 1618 samples readable, no damage" in out
    assert "val: 1 shard, 179 of 179 samples readable, no damage" in out
    root = tmp_path / "damaged"
    manifest = copy_dir(digits_dir, root)
    damage(root / manifest["shards"]["train"][2], "cls")
    (root / "val-000000.tar").unlink()
    assert lina(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert "train: 9 shards, 1418 of 1618 samples readable, 200 lost in 1 damaged shard" in out
    assert f"{root / manifest['shards']['train'][2]}: lost 200 of 200 samples (checksum mismatch" in out
    assert "val: 1 shard, 0 of 179 samples readable, 179 lost" in out and "unreadable" in out
    assert "is damaged: rebuild it" in out


def test_old_manifests_without_checksums_load_warn_once_and_still_count_losses(digits_dir, tmp_path):  # noqa: F811
    root = tmp_path / "old"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = copy_dir(digits_dir, root, checksums=False)
    damage(root / manifest["shards"]["train"][1], "member_boundary")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = ShardDataModule(str(root), batch_size=64, num_workers=0)
        ShardDataModule(str(root), batch_size=64, num_workers=0)
        take(data.train_dataloader(), 30)
    unverifiable = [w for w in caught if "no shard checksums" in str(w.message)]
    assert len(unverifiable) == 1, "warn once per directory"
    ((_, lost, reads),) = data.damaged_shards
    assert lost == 100 * reads, "per-shard counts inferred from shard_size"


# ------------------------------------------------------------------------------------------------ fuzz

#: 4 shards of 16 synthetic KL-16 samples (moments [32, 16, 16] float16)
FUZZ_SHARDS, FUZZ_SIZE = 4, 16


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "base"
    root.mkdir()
    write_latent_shards(root, samples=FUZZ_SHARDS * FUZZ_SIZE, shard_size=FUZZ_SIZE)
    return root


def rewrite(path, edit):
    """Rewrite a shard sample by sample (``edit(index, fields) -> fields``) as a writer that stored damaged
    samples would; the caller refreshes the checksum."""
    samples = list(tar_samples(path).items())
    with wds.TarWriter(str(path)) as sink:
        for i, (key, fields) in enumerate(samples):
            fields = edit(i, dict(fields))
            sink.write({"__key__": fields.pop("__key__", key), **fields})


def npy_with(fields, member, value, rng):
    moments = np.load(io.BytesIO(fields[member])).copy()
    moments.flat[rng.integers(moments.size)] = value
    buffer = io.BytesIO()
    np.save(buffer, moments)
    return buffer.getvalue()


def corrupt(path, kind, rng):
    """Corrupt one shard; returns ``(whether the manifest checksum must be refreshed, good samples left when
    nothing but this damage is checked, or None when it is not known in advance)``."""
    size = path.stat().st_size
    if kind == "truncate":
        cut = int(rng.integers(0, size))
        good = samples_before(path, cut)
        path.write_bytes(path.read_bytes()[:cut])
        return False, good
    if kind == "header_flip":  # member j belongs to sample j // 3 (cls, latent.npy, latent_flip.npy)
        j = int(rng.integers(3 * FUZZ_SIZE))
        position = members(path)[j][1] + int(rng.choice([*range(0, 148), *range(156, 512)]))  # not its chksum
        data = bytearray(path.read_bytes())
        data[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        return False, j // 3
    if kind == "payload_flip":
        _, offset, end = members(path)[rng.integers(3 * FUZZ_SIZE)]
        data = bytearray(path.read_bytes())
        data[int(rng.integers(offset + 512, end))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        return True, None
    if kind == "random_bytes":
        path.write_bytes(rng.integers(0, 256, int(rng.integers(1, size)), dtype=np.uint8).tobytes())
        return False, 0
    chosen = set(rng.choice(FUZZ_SIZE, size=int(rng.integers(1, 4)), replace=False).tolist())

    def edit(i, fields):
        if i not in chosen:
            return fields
        if kind == "wrong_names":
            member = ["cls", "latent.npy", "latent_flip.npy"][rng.integers(3)]
            renamed = {"cls": "cIs", "latent.npy": "latent.npz", "latent_flip.npy": "latent_flip.np"}[member]
            fields[renamed] = fields.pop(member)
        elif kind == "bad_cls":
            fields["cls"] = [b"seven", b"", b"1e3", b"-1", b"\xff\xfe", b"1000"][rng.integers(6)]
        else:  # "nan": a NaN or inf in the moments of the image or of its flip
            member = ["latent.npy", "latent_flip.npy"][rng.integers(2)]
            fields[member] = npy_with(fields, member, [np.nan, np.inf, -np.inf][rng.integers(3)], rng)
        return fields

    rewrite(path, edit)
    return True, FUZZ_SIZE - len(chosen)


KINDS = ["truncate", "header_flip", "payload_flip", "random_bytes", "wrong_names", "bad_cls", "nan"]


def check_read(read, expected_good):
    """No crash, nothing non-finite or malformed kept, and the reported loss is what was really lost."""
    items = read.items
    for item in items:
        assert np.isfinite(item["latent"].astype(np.float32)).all()
        assert np.isfinite(item["latent_flip"].astype(np.float32)).all()
        assert 0 <= item["label"] < 1000 and item["latent"].shape == (32, 16, 16)
    keys = [item["key"] for item in items]
    assert len(set(keys)) == len(keys)
    assert read.lost == FUZZ_SIZE - len(items)
    if expected_good is not None:
        assert len(items) == expected_good, read.describe()


@pytest.mark.parametrize("case", range(42))
def test_fuzz_damaged_shard_bytes(fuzz_base, tmp_path, case):
    """One corrupted shard per case (every kind, with and without manifest checksums): reading it never
    raises or hangs, keeps no NaN and reports as lost exactly the samples that did not come out."""
    rng = np.random.default_rng(case)
    kind, checksums = KINDS[case % len(KINDS)], case % 2 == 0
    root = tmp_path / "fuzz"
    manifest = copy_dir(fuzz_base, root, checksums=True)
    name = manifest["shards"]["train"][case % FUZZ_SHARDS]
    refresh, good = corrupt(root / name, kind, rng)
    if refresh:  # the damage was written with the shard: its checksum holds, the samples must be checked
        refresh_file_entry(root, manifest, name, FUZZ_SIZE)
    elif checksums:  # changed bytes under a checksum: the whole shard is lost
        good = 0
    if not checksums:
        del manifest["files"]
    write_manifest_json(root, manifest)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        manifest = load_manifest(root)
    entry = next(e for e in shard_entries(root, manifest, "train") if e.name == name)
    with deadline(30):
        check_read(read_shard(entry, Examples(manifest)), good)


def test_fuzz_datamodule_over_a_directory_of_damaged_shards(fuzz_base, tmp_path):
    """Every shard damaged one way: the training stream neither crashes nor hangs nor lets a NaN through,
    and what it reports lost per shard read is what the reader finds in that shard."""
    rng = np.random.default_rng(1234)
    root = tmp_path / "all_damaged"
    manifest = copy_dir(fuzz_base, root)
    for name, kind in zip(
        manifest["shards"]["train"], ["nan", "wrong_names", "bad_cls", "truncate"], strict=True
    ):
        if corrupt(root / name, kind, rng)[0]:
            refresh_file_entry(root, manifest, name, FUZZ_SIZE)
    write_manifest_json(root, manifest)
    data = ShardDataModule(str(root), batch_size=8, num_workers=0, shuffle_buffer=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with deadline(60):
            batches = take(data.train_dataloader(), 24)
    for batch in batches:
        assert batch["latent"].shape == (8, 16, 16, 16) and torch.isfinite(batch["latent"]).all()
        assert ((0 <= batch["label"]) & (batch["label"] < 1000)).all()
    examples = Examples(manifest)
    per_read = {e.name: read_shard(e, examples).lost for e in shard_entries(root, manifest, "train")}
    damaged = data.damaged_shards
    assert {name for name, _, _ in damaged} == set(manifest["shards"]["train"])
    for name, lost, reads in damaged:
        assert lost == reads * per_read[name] > 0
    assert data.skipped_samples == sum(lost for _, lost, _ in damaged)
