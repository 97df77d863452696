"""``lina bench sample``: the whole-model FLOP count of ``generate`` (exact, checked against a count by
hand and against the un-memoised count), the softmax/LINA ratio, and the command's JSON. No timings."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lina_pl.bench.sample import build, count_generate_flops, main, measure_latency, text_batch
from lina_pl.models.lina import LinaSampling
from lina_pl.sampling import cosine_mask_counts

LINA = Path(sys.executable).parent / "lina"
TINY = "lina_t2i_tiny"  # dim 32, 2 heads, 1 + 1 + 1 blocks, 2-block head, 4 channels, 8 text tokens


def _count(attention: str, grid: int, steps: int, flow_steps: int, *, memo: bool = True) -> dict:
    with torch.device("meta"):
        model = build(TINY, attention, (grid, grid))
        condition = text_batch(model)
    options = LinaSampling(steps=steps, flow_steps=flow_steps, cfg=7.0, cfg_schedule="constant")
    return count_generate_flops(model, condition, options, memo=memo)


def _hand_count(grid: int, steps: int, flow_steps: int) -> dict:
    """FLOPs (2 per MAC) of the tiny softmax model's CFG sampling, from its layer shapes alone."""
    with torch.device("meta"):
        cfg = build(TINY, "softmax", (grid, grid)).config
    d, c, w, rows = cfg.dim, cfg.token_channels, cfg.head_width or cfg.dim, 2  # CFG doubles the batch
    prompt, m, n_tok = 8, (grid // 2) ** 2, grid * grid

    def block(n: int) -> int:  # qkv 3D² + proj D² + MLP 8D² per token, then QKᵀ and AV (n² D each)
        return 2 * rows * n * 12 * d * d + 2 * 2 * rows * n * n * d

    head_macs = c * w + (d * w + w * w) + (256 * w + w * w) + cfg.head_depth * 5 * w * w + 2 * w * w + w * c
    parts = dict.fromkeys(("condition_tower", "encoder", "decoder", "flow_head", "other"), 0)
    parts["other"] += 2 * 2 * prompt * 384 * d  # text projection of the prompt and of the null prompt
    parts["condition_tower"] += cfg.cond_depth * block(prompt + m)
    counts = cosine_mask_counts(n_tok, steps)
    for k in range(steps):
        known, new = n_tok - counts[k], counts[k] - counts[k + 1]
        if new == 0:
            continue
        parts["other"] += 2 * rows * n_tok * c * d  # token embedding
        parts["encoder"] += cfg.encoder_depth * block(m + known)
        parts["decoder"] += cfg.decoder_depth * block(m + n_tok)
        parts["flow_head"] += flow_steps * 2 * rows * new * head_macs
    return parts


@pytest.mark.parametrize("grid, steps", [(4, 3), (8, 5)])
def test_softmax_count_equals_a_count_by_hand(grid, steps):
    counted = _count("softmax", grid, steps, flow_steps=3)
    expected = _hand_count(grid, steps, flow_steps=3)
    assert counted["parts"] == expected
    assert counted["flops"] == sum(expected.values()) == sum(counted["by_op"].values())


@pytest.mark.parametrize("attention", ["lina", "softmax"])
def test_memoised_count_equals_the_plain_count(attention):
    """Skipping repeated block/head calls changes nothing: total, parts and ops all equal."""
    memo = _count(attention, 8, steps=6, flow_steps=3)
    plain = _count(attention, 8, steps=6, flow_steps=3, memo=False)
    for key in ("flops", "parts", "by_op"):
        assert memo[key] == plain[key]
    assert sum(memo["parts"].values()) == memo["flops"]


def test_count_is_affine_in_the_euler_steps():
    """Only the flow head runs per Euler step: F(S) = F(1) + (S − 1)·(F(2) − F(1))."""
    f1, f2, f5 = (_count("lina", 8, steps=4, flow_steps=s) for s in (1, 2, 5))
    assert f5["flops"] == f1["flops"] + 4 * (f2["flops"] - f1["flops"])
    assert f5["parts"]["decoder"] == f1["parts"]["decoder"]


def test_softmax_costs_more_than_lina_at_the_largest_tiny_resolution():
    ratios = {}
    for grid in (4, 16):
        ratios[grid] = _count("softmax", grid, 8, 2)["flops"] / _count("lina", grid, 8, 2)["flops"]
    assert ratios[16] > 1.0
    assert ratios[16] > ratios[4]  # the quadratic term grows with the sequence


def test_counting_needs_the_meta_device():
    model = build(TINY, "lina", (4, 4))
    with pytest.raises(ValueError, match="meta"):
        count_generate_flops(model, text_batch(model), LinaSampling(steps=2, flow_steps=1))


def test_latency_worker_returns_a_row():
    spec = dict(
        model=TINY,
        overrides={},
        condition_options=None,
        options=dict(steps=2, flow_steps=1, cfg=7.0, cfg_schedule="constant"),
        device="cpu",
        weights="float32",
        autocast=False,
        warmup=1,
        repeats=2,
        attention="softmax",
        grid=[4, 4],
    )
    row = measure_latency(spec)
    assert row["attention"] == "softmax" and row["grid"] == [4, 4] and len(row["runs_s"]) == 2
    assert row["s_per_image"] > 0 and "peak_allocated_mb" not in row


def test_command_prints_json():
    args = ["bench", "sample", "--skip-timing", "--resolutions", "256", "--model", TINY]
    result = subprocess.run(
        [str(LINA), *args, "--ar-steps", "4", "--flow-steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    entry = report["flops"]["resolutions"]["256"]
    assert entry["grid"] == [16, 16] and entry["cond_grid"] == [8, 8]
    assert entry["softmax_over_lina"] > 1.0
    for attention in ("lina", "softmax"):
        assert sum(entry[attention]["parts_gflops"].values()) == pytest.approx(entry[attention]["gflops"])
    assert report["reference"]["latency_s_per_image_1024px"] == {"lina": 22.08, "softmax": 20.02}
    assert "cpu" not in report and "gpu" not in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "cuda"], "needs a CUDA GPU"),
        (["--skip-timing", "--resolutions", "100"], "multiples of 32"),
        (["--skip-timing", "--ar-steps", "0"], "steps"),
    ],
)
def test_user_errors_are_one_line(args, message, capsys):
    if args[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main([*args, "--model", TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
