"""Packaging: the console script, lazy heavy imports, the FLOP structure of the benchmark, and the grids."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lina_pl.bench.attention import count_flops

LINA = Path(sys.executable).parent / "lina"


def _run(*args):
    return subprocess.run([str(LINA), *args], capture_output=True, text=True, timeout=300)


def test_console_script_help():
    assert LINA.exists(), "the `lina` console script is not installed next to this Python"
    result = _run("--help")
    assert result.returncode == 0
    assert "bench" in result.stdout and "linear attention" in result.stdout


def test_unknown_command_fails_clearly():
    result = _run("fly")
    assert result.returncode != 0 and "unknown command" in result.stderr


def test_bench_help_lists_benchmarks():
    result = _run("bench", "--help")
    assert result.returncode == 0 and "attention" in result.stdout


def test_importing_the_mixers_stays_light():
    """fla (CUDA only), deepspeed and lightning must not be imported by the attention library."""
    code = (
        "import sys, lina_pl.nn, lina_pl.nn.functional; "
        "print([m for m in ('fla', 'deepspeed', 'lightning', 'triton') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_flop_ratio_of_the_paper_shape():
    """LINA decoder attention at N=5120, D=1536: 49.99 G MACs as in the paper, ≤ 0.39× softmax."""
    flops = count_flops()
    assert flops["lina_decoder"]["gflops"] / 2 == pytest.approx(49.99, abs=0.01)  # 2 FLOPs per MAC
    assert flops["ratio"] <= 0.39


def test_bench_flops_only_prints_json():
    result = _run("bench", "attention", "--skip-timing")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["flops"]["ratio"] <= 0.39 and "timing" not in report


def test_decode_bench_state_is_constant_for_lasad_and_grows_for_softmax():
    """The decode benchmark's state accounting (sizes, not timings): recurrent state vs KV cache."""
    from lina_pl.bench.decode import measure

    shape = dict(batch=2, dim=32, depth=2, heads=2, vocab=64)
    row = measure("lasad", 16, **shape)
    assert {"mixer", "tokens", "batch", "ms_per_token", "peak_mem_mb"} <= set(row)  # the row schema
    lasad = [measure("lasad", n, **shape)["state_mb"] for n in (16, 64)]
    softmax = [measure("softmax", n, **shape)["state_mb"] for n in (16, 64)]
    assert lasad[0] == lasad[1] > 0
    assert softmax[1] == pytest.approx(4 * softmax[0], rel=0.05)  # KV cache ∝ tokens


def test_grids_enlarge_small_samples_and_label_their_rows():
    """Grids are for people: ≥ 64 px cells (nearest neighbour), grey padding, a label margin per row."""
    from lina_pl.lightning.images import PAD_VALUE, make_grid

    images = np.arange(4 * 16 * 16, dtype=np.int64).reshape(4, 16, 16, 1).astype(np.uint8)
    plain = make_grid(images, nrow=2)
    assert plain.shape == (2 * 66 + 2, 2 * 66 + 2, 1)
    assert np.array_equal(plain[2:66, 2:66], images[0].repeat(4, axis=0).repeat(4, axis=1))
    assert (plain[:2] == PAD_VALUE).all() and (plain[:, 66:68] == PAD_VALUE).all()
    labelled = make_grid(images, nrow=2, row_labels=["0", "a red 7"])
    margin = labelled.shape[1] - plain.shape[1]
    assert margin > 0 and np.array_equal(labelled[:, margin:], plain)
    assert labelled[:, :margin].max() > 200  # the (anti-aliased) text is drawn
    with pytest.raises(ValueError, match="3 row labels for a grid of 2 rows"):
        make_grid(images, nrow=2, row_labels=["a", "b", "c"])
