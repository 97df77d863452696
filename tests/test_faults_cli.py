"""User errors are one line (issue #12): a bad option, preset, path, checkpoint or samples file ends `lina`
with one line naming the cause and the fix and a non-zero exit, instead of a double traceback ending in a
dump of the whole config; LINA_DEBUG=1 or `lina --debug` shows the traceback. Run in-process."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import save_untrained

from lina_pl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def lina(*argv) -> int:
    """`lina ARGV` in this process."""
    return main([str(a) for a in argv])


def run(capsys, *argv) -> tuple[int, str]:
    """Exit status and stderr of `lina ARGV` (argparse errors exit through SystemExit)."""
    try:
        code = lina(*argv)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def one_line_error(capsys, *argv, code: int = 1) -> str:
    """Run `lina ARGV` expecting a user error: exit ``code``, no traceback, the error on the last line."""
    status, err = run(capsys, *argv)
    assert status == code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("lina") and ": error: " in last, err
    return last


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_shards")
    assert lina("data", "build", "--source", "digits", "--out", tmp, "--resolution", 8) == 0
    return tmp


@pytest.fixture(scope="module")
def config(tmp_path_factory, shards):
    """The demo config on 8×8 digits with the tiny preset (nothing here gets as far as training)."""
    tmp = tmp_path_factory.mktemp("cli_config")
    config = yaml.safe_load((ROOT / "configs/c2i/demo.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp / "run")
    config["model"]["generator"] = "lina_c2i_tiny"
    config["data"]["init_args"].update(root=str(shards), num_workers=0)
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_ckpt")
    options = {"generator": "lina_c2i_tiny", "image_size": (8, 8), "image_channels": 1, "num_classes": 10}
    return save_untrained(tmp / "untrained.ckpt", **options)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.generator", "nope"], "unknown model 'nope'; presets: lasad_b"),
        (["--model.generator_options", "{dim: 96, heads: 5}"], "dim=96 is not divisible by num_heads=5"),
        (["--model.codec_options", "{patch_size: 0}"], "patch_size ≥ 1"),
        (["--data.init_args.root", "nowhere"], "shard directory nowhere does not exist; build it with"),
        (["--non_finite.action", "maybe"], "non_finite.action must be one of stop, skip"),
        (["--preemption.signals", "[SIGNOPE]"], "unknown signal(s) ['SIGNOPE']"),
    ],
)
def test_fit_config_errors_are_one_line(capsys, config, args, message):
    assert message in one_line_error(capsys, "fit", "--config", config, *args)


def test_fit_option_errors_are_one_line_with_exit_2(capsys, config):
    last = one_line_error(capsys, "fit", "--config", config, "--model.lr", "abc", code=2)
    assert 'Parser key "model.lr"' in last and "abc" in last and "lina fit --help" in last
    assert "unrecognized arguments: --model.foo" in one_line_error(
        capsys, "fit", "--config", config, "--model.foo", "1", code=2
    )


def test_bad_checkpoint_files_are_one_line(capsys, tmp_path, config, ckpt):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    sample = ("sample", "--classes", 1, "--out", tmp_path / "s.npz", "--ckpt")
    for args, code in ((sample, 2), (("fit", "--config", config, "--ckpt_path"), 1)):
        assert "is not a torch file" in one_line_error(capsys, *args, text, code=code)
        assert "truncated or corrupt" in one_line_error(capsys, *args, truncated, code=code)


def test_sample_refuses_bad_options(capsys, tmp_path, ckpt):
    cases = {
        "--cfg must be a finite number, got nan": ["--cfg", "nan"],
        "--cfg must be a finite number, got inf": ["--cfg", "inf"],
        "--steps and --flow-steps must be ≥ 1, got 0 and": ["--steps", 0],
        "--steps and --flow-steps must be ≥ 1, got 2 and 0": ["--steps", 2, "--flow-steps", 0],
        "labels must lie in 0..9": ["--classes", 42],
    }
    for message, args in cases.items():
        sample = ["sample", "--ckpt", ckpt, "--out", tmp_path / "s.npz", "--classes", 1, *args]
        assert message in one_line_error(capsys, *sample, code=2)
    assert not (tmp_path / "s.npz").exists()


def test_sample_refuses_non_finite_weights_and_outputs(capsys, tmp_path, ckpt):
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["state_dict"]["generator.head.out.weight"][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "nan.ckpt")
    checkpoint = torch.load(ckpt, weights_only=False)
    checkpoint["state_dict"]["generator.head.out.bias"].fill_(3e38)  # finite, but sampling overflows
    torch.save(checkpoint, tmp_path / "overflow.ckpt")
    sample = ("sample", "--classes", 1, "--per-class", 2, "--steps", 2, "--flow-steps", 2, "--out")
    nan = one_line_error(capsys, *sample, tmp_path / "a.npz", "--ckpt", tmp_path / "nan.ckpt", code=2)
    assert "holds NaN or ±inf weights (1 tensors, e.g. generator.head.out.weight)" in nan
    overflow_ckpt = ("--ckpt", tmp_path / "overflow.ckpt")
    overflow = one_line_error(capsys, *sample, tmp_path / "b.npz", *overflow_ckpt, code=2)
    assert "sampling batch 0 produced NaN or ±inf pixels" in overflow
    assert not list(tmp_path.glob("*.npz"))  # no black images written


def test_evaluate_refuses_labels_outside_the_classes(capsys, tmp_path, shards):
    images = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    for labels in ([0, 1, 42], [0, -1, 2]):
        np.savez(tmp_path / "s.npz", arr_0=images, labels=np.asarray(labels))
        last = one_line_error(
            capsys, "evaluate", "consistency", "--samples", tmp_path / "s.npz", "--data", shards, code=2
        )
        assert "labels must be classes of" in last and "(0..9)" in last
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32), labels=np.zeros(3, dtype=int))
    evaluate = ("evaluate", "consistency", "--data", shards, "--samples")
    assert "arr_0 must be uint8" in one_line_error(capsys, *evaluate, tmp_path / "f.npz", code=2)


def test_tokenizer_refuses_a_zero_patch_size(capsys, tmp_path, shards):
    last = one_line_error(
        capsys, "tokenizer", "fit", "--data", shards, "--out", tmp_path / "t.npz", "--patch-size", 0, code=2
    )
    assert "--patch-size must be ≥ 1" in last


def test_unknown_command_is_one_line(capsys):
    assert "unknown command 'fitt'" in one_line_error(capsys, "fitt", code=2)


def test_debug_shows_the_traceback(capsys, monkeypatch, config):
    bad = ["fit", "--config", str(config), "--model.generator", "nope"]
    monkeypatch.setenv("LINA_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        lina(*bad)
    monkeypatch.setenv("LINA_DEBUG", "0")  # restored after the test, also where --debug sets it
    assert "unknown model" in one_line_error(capsys, *bad)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        lina("--debug", *bad)
