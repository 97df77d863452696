"""Generative metrics: FID/sFID, KID, IS and precision/recall against hand-computed values, the digits
feature network (deterministic, accurate, separates real digits from noise), reference statistics (shards,
image files, cached and ADM statistics) and `lina evaluate fid | all`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lina_pl.cli import main as lina
from lina_pl.data.digit_scenes import digit_split
from lina_pl.data.sources import DigitsSource
from lina_pl.lightning.images import to_uint8_nhwc
from lina_pl.metrics import digits_net
from lina_pl.metrics import generative as g
from lina_pl.metrics.features import extract_features, feature_network, to_uint8_nchw
from lina_pl.metrics.reference import load_reference

# -- metric functions on features -----------------------------------------------------------------------


def test_fid_of_identical_features_is_zero():
    x = torch.randn(300, 8)
    assert g.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_shifted_features_is_the_squared_shift():
    x = torch.randn(400, 4, dtype=torch.float64)
    shift = torch.tensor([1.0, 2.0, 0.0, -2.0], dtype=torch.float64)  # equal covariances: FID = ‖Δμ‖² = 9
    assert g.fid(x, x + shift) == pytest.approx(9.0, rel=1e-9)


def test_fid_closed_form_of_gaussians():
    # N((0,0), I) vs N((3,4), 4I): ‖Δμ‖² = 25, Tr(I + 4I − 2·(4I)^½) = 2 + 8 − 8 = 2
    real = g.FeatureStats(torch.zeros(2), torch.eye(2))
    fake = g.FeatureStats(torch.tensor([3.0, 4.0]), 4 * torch.eye(2))
    assert g.fid(real, fake) == pytest.approx(27.0, rel=1e-9)


def test_kid_is_zero_for_one_distribution_and_positive_for_shifted():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 400, 16, generator=gen)
    same = g.kid(a, b, subsets=20, subset_size=200)
    shifted = g.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert same[2] == 200 and abs(same[0]) < 0.03  # unbiased: ± its sampling noise around 0
    assert shifted[0] > 0.5 > 10 * abs(same[0])
    assert g.kid(a, b + 0.5, subsets=20, subset_size=200) == shifted  # a private seeded stream


def test_inception_score_hand_values():
    confident = 50.0 * torch.eye(10).repeat(20, 1)  # 200 one-hot predictions, every class equally often
    assert g.inception_score(confident, splits=1) == pytest.approx((10.0, 0.0), rel=1e-6)
    assert g.inception_score(torch.zeros(200, 10), splits=1) == pytest.approx((1.0, 0.0))


def test_precision_recall_hand_values():
    line = torch.arange(10.0)[:, None]  # real: 0..9 on a line
    assert g.precision_recall(line, line) == (1.0, 1.0)
    assert g.precision_recall(line, line + 100) == (0.0, 0.0)
    # fake = {0, 1, 2, 3} ⊂ real: every fake point is real (precision 1). Fake 3-NN radii: 3, 2, 2, 3, so
    # the fake manifold is [-3, 6] and holds the real points 0..6 (6 is exactly 3 from 3): recall 7/10.
    assert g.precision_recall(line, line[:4]) == (1.0, 0.7)


def test_metric_inputs_are_checked():
    with pytest.raises(ValueError, match="differ in size"):
        g.fid(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"\[N, D\] tensor"):
        g.precision_recall(torch.randn(5), torch.randn(5))


# -- images -> features ---------------------------------------------------------------------------------


def test_images_reach_the_network_as_uint8():
    floats = torch.rand(3, 3, 5, 4) * 2 - 1
    expected = torch.from_numpy(to_uint8_nhwc(floats)).permute(0, 3, 1, 2)  # what `lina sample` saves
    assert torch.equal(to_uint8_nchw(floats), expected)
    assert torch.equal(to_uint8_nchw(expected.permute(0, 2, 3, 1).numpy()), expected)
    with pytest.raises(ValueError, match="must be uint8"):
        to_uint8_nchw(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"lie in \[-1, 1\]"):
        to_uint8_nchw(torch.full((2, 3, 4, 4), 255.0))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_uint8_nchw(torch.zeros(2, 4, 4, 3, dtype=torch.uint8))  # NHWC given as a tensor


def test_inception_without_weights_names_the_file(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(FileNotFoundError, match=f"Inception weights not found: {missing}"):
        feature_network("inception", inception_weights=missing)


# -- the digits feature network -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(cache):
    return feature_network("digits")  # trained here (seconds), then cached


@pytest.fixture(scope="module")
def digits():
    """All 1,797 digits as the digits shards hold them (uint8 16×16×1) and their labels."""
    source = DigitsSource(resolution=16)
    images = np.stack([np.asarray(source.load(i)) for i in range(len(source))])[..., None]
    return images, np.asarray(source.labels)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_net_trains_deterministically_and_is_cached(net, cache):
    assert _same_weights(net, digits_net.train_digits_net(key=net.key))
    assert [p.name for p in cache.iterdir()] == [f"{net.key}.pt"]
    assert _same_weights(net, feature_network("digits"))  # read from the cache file


def test_digits_net_classifies_held_out_digits(net, digits):
    images, labels = digits
    held_out = digit_split()["eval"]
    predicted = extract_features(net, images[held_out]).logits.argmax(1).numpy()
    assert (predicted == labels[held_out]).mean() >= 0.9


def test_digits_net_takes_any_size_and_channel_count(net, digits):
    images = digits[0][:8]
    grey = extract_features(net, images)
    rgb = extract_features(net, np.repeat(images, 3, axis=-1))  # brightest channel = the grey image
    assert torch.equal(grey.pool, rgb.pool)
    big = extract_features(net, torch.from_numpy(images).permute(0, 3, 1, 2).repeat_interleave(2, -1))
    assert big.pool.shape == (8, 64) and big.logits.shape == (8, 10) and big.spatial.shape == (8, 128)


def test_real_digits_fid_is_far_below_noise(net, digits):
    held_out = digits[0][digit_split()["eval"]]
    features = extract_features(net, held_out)
    half = len(held_out) // 2
    noise = np.random.default_rng(0).integers(0, 256, (half, 16, 16, 1), dtype=np.uint8)
    noise_features = extract_features(net, noise)
    real_vs_real = g.fid(features.pool[:half], features.pool[half:])
    real_vs_noise = g.fid(features.pool[:half], noise_features.pool)
    assert real_vs_real * 5 < real_vs_noise
    assert g.fid(features.spatial[:half], features.spatial[half:]) < g.fid(
        features.spatial[:half], noise_features.spatial
    )
    assert min(g.precision_recall(features.pool[:half], features.pool[half:])) > 0.6
    assert max(g.precision_recall(features.pool[:half], noise_features.pool)) < 0.05


# -- reference statistics -------------------------------------------------------------------------------


def test_references_from_images_stats_and_adm_batches(net, digits, tmp_path):
    images = tmp_path / "real.npz"
    np.savez(images, arr_0=digits[0][:300])
    ref = load_reference(images, net)
    assert ref.features.shape == (300, 64) and ref.path.is_file()
    cached = load_reference(ref.path, net)  # the statistics file, as --ref STATS.npz
    assert torch.equal(cached.features, ref.features) and torch.equal(cached.stats.sigma, ref.stats.sigma)

    adm = tmp_path / "adm.npz"
    np.savez(adm, mu=ref.stats.mu.numpy(), sigma=ref.stats.sigma.numpy())
    only_stats = load_reference(adm, net)
    assert only_stats.features is None and torch.equal(only_stats.stats.mu, ref.stats.mu)
    np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="2048-d statistics"):
        load_reference(adm, net)

    other = digits_net.DigitsNet(key="digits-other")
    with pytest.raises(ValueError, match="feature network digits-"):
        load_reference(ref.path, other)
    np.savez(images, arr_0=digits[0][:300].astype(np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        load_reference(images, other)


def test_reference_from_shards_is_computed_once(net, tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    assert lina(["data", "build", "--source", "digits", "--out", str(shards), "--resolution", "8"]) == 0
    ref = load_reference(shards, net, split="val")
    assert ref.features.shape == (179, 64)
    monkeypatch.setattr("lina_pl.metrics.reference.extract_features", None)  # a second run must not compute
    assert torch.equal(load_reference(shards, net, split="val").features, ref.features)


# -- lina evaluate ----------------------------------------------------------------------------------------


def _evaluate(capsys, *argv) -> dict:
    assert lina(["evaluate", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_lina_evaluate_fid_prints_json(net, digits, tmp_path, capsys):
    images, labels = digits
    samples, real = tmp_path / "samples.npz", tmp_path / "real.npz"
    np.savez(samples, arr_0=images[:100], labels=labels[:100])
    np.savez(real, arr_0=images[100:400])
    report = _evaluate(capsys, "fid", "--samples", samples, "--ref", real, "--features", "digits")
    assert report["samples"] == 100 and report["reference"]["count"] == 300
    assert report["features"] == net.key and 0 < report["fid"] < 5 and report["sfid"] > 0
    again = _evaluate(
        capsys, "all", "--samples", samples, "--ref", report["reference"]["stats"], "--features", "digits"
    )
    assert again["fid"] == pytest.approx(report["fid"], rel=1e-9)
    assert {"kid", "kid_std", "is", "is_std", "precision", "recall"} <= set(again)
    assert again["precision"] > 0.5 and again["is"] > 5
