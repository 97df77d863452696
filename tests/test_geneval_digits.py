"""Digit scenes (data) and their GenEval-style scorer: the layout, the captions, and that the scorer gives
real scenes a near-perfect score and mismatched captions a near-chance one."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from lina_pl.data import digit_scenes as ds
from lina_pl.metrics import geneval_digits as gd

N_EVAL = 300


def _stack(split: str, n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    images, captions = zip(*ds.scenes(split, n, seed=seed), strict=True)
    return np.stack(images), list(captions)


@pytest.fixture(scope="module")
def eval_scenes() -> tuple[np.ndarray, list[str]]:
    return _stack("eval", N_EVAL, seed=1)


def _cell(image: np.ndarray, cell: int) -> np.ndarray:
    row, col = divmod(cell, 2)
    return image[row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16]


# ---------------------------------------------------------------------------------------------- scorer


def test_real_eval_scenes_score_high(eval_scenes):
    images, captions = eval_scenes
    result = gd.score(images, captions)
    assert result["counts"] == {task: N_EVAL // 6 for task in ds.TASKS}
    assert result["overall"] >= 0.9
    for task in ds.TASKS:
        assert result[task] >= 0.9, (task, result)


def test_shuffled_captions_score_near_chance(eval_scenes):
    images, captions = eval_scenes
    shuffled = [captions[i] for i in np.random.default_rng(0).permutation(len(captions))]
    assert gd.score(images, shuffled)["overall"] < 0.4


def test_noise_is_not_an_object(eval_scenes):
    """Noise bright enough to occupy every cell is no digit: without the distance check, a noise cell was
    classified as some digit and "a 7" was met by chance about 1/3 of the time."""
    _, captions = eval_scenes
    rng = np.random.default_rng(0)
    untrained = np.clip(rng.normal(-0.6, 0.5, (N_EVAL, 32, 32, 3)), -1, 1)  # an untrained generator's output
    blobs = rng.random((N_EVAL, 8, 8, 3)).repeat(4, axis=1).repeat(4, axis=2) * 2 - 1  # 4×4-pixel blobs
    for noise in (untrained, blobs):
        images = ((noise + 1) * 127.5).astype(np.uint8)
        assert sum(map(len, gd.detect(images))) <= 0.01 * 4 * N_EVAL
        assert gd.score(images, captions)["overall"] == 0.0


def test_real_digits_lie_within_the_distance_of_a_train_digit():
    held_out, _ = ds.digit_arrays("eval")
    distance = gd.train_digits().kneighbors(gd._normalise(held_out))[0][:, 0]
    assert distance.max() <= gd.MAX_DIGIT_DISTANCE


def test_detect_finds_the_rendered_objects():
    rng = np.random.default_rng(3)
    pool = ds.digit_pool("eval")
    specs = [ds.random_scene(rng) for _ in range(60)]
    images = np.stack([ds.render(spec, pool, rng) for spec in specs])
    found = gd.detect(images)
    cells_right = sum(
        [d.cell for d in det] == [o[0] for o in spec.objects] for spec, det in zip(specs, found, strict=True)
    )
    colours_right = sum(
        [d.colour for d in det] == [o[2] for o in spec.objects]
        for spec, det in zip(specs, found, strict=True)
    )
    assert cells_right == len(specs) and colours_right == len(specs)
    assert gd.detect(np.zeros((2, 32, 32, 3), np.uint8)) == [[], []]


def test_rules_on_hand_made_detections():
    D = gd.Detection
    assert gd.check(ds.parse_caption("three 4s"), [D(0, 4, "red"), D(1, 4, "blue"), D(3, 4, "red")])
    assert not gd.check(ds.parse_caption("two 4s"), [D(0, 4, "red"), D(1, 4, "blue"), D(3, 4, "red")])
    assert gd.check(ds.parse_caption("a 1 above a 9"), [D(1, 1, "red"), D(3, 9, "red")])
    assert not gd.check(ds.parse_caption("a 1 above a 9"), [D(0, 1, "red"), D(3, 9, "red")])  # diagonal
    assert gd.check(ds.parse_caption("a 1 to the right of a 9"), [D(3, 1, "red"), D(2, 9, "red")])
    assert not gd.check(ds.parse_caption("a 1 to the left of a 9"), [D(3, 1, "red"), D(2, 9, "red")])
    assert gd.check(ds.parse_caption("a blue 6 and a green 8"), [D(0, 6, "blue"), D(2, 8, "green")])
    assert not gd.check(ds.parse_caption("a blue 6 and a green 8"), [D(0, 6, "green"), D(2, 8, "blue")])
    assert not gd.check(ds.parse_caption("a red 2"), [D(0, 2, "yellow")])
    assert gd.check(ds.parse_caption("a 3 and a 5"), [D(0, 5, "white"), D(3, 3, "red")])


def test_score_omits_tasks_without_prompts(eval_scenes):
    images, captions = eval_scenes
    result = gd.score(images[:2], captions[:2])  # single_object and two_object only
    assert set(result["counts"]) == {"single_object", "two_object"}
    assert result["overall"] == pytest.approx((result["single_object"] + result["two_object"]) / 2)


def test_bad_input_raises(eval_scenes):
    images, captions = eval_scenes
    with pytest.raises(ValueError, match="uint8"):
        gd.score(images[:4].astype(np.float32) / 255.0, captions[:4])
    with pytest.raises(ValueError, match="shape"):
        gd.score(np.zeros((4, 16, 16, 3), np.uint8), captions[:4])
    with pytest.raises(ValueError, match="shape"):
        gd.score(images[0], captions[:1])
    with pytest.raises(ValueError, match="prompts"):
        gd.score(images[:4], captions[:3])
    with pytest.raises(ValueError, match="templates"):
        gd.score(images[:2], [captions[0], "a cat on a mat"])
    with pytest.raises(ValueError):
        gd.score(images[:0], [])


# ------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "caption, task, digits, counts, colours, relation",
    [
        ("a 7", "single_object", (7,), (1,), (None,), None),
        ("a 3 and a 5", "two_object", (3, 5), (1, 1), (None, None), None),
        ("four 4s", "counting", (4,), (4,), (None,), None),
        ("a red 2", "colors", (2,), (1,), ("red",), None),
        ("a 1 to the right of a 9", "position", (1, 9), (1, 1), (None, None), "right of"),
        ("a 1 below a 9", "position", (1, 9), (1, 1), (None, None), "below"),
        ("a blue 6 and a green 8", "color_attr", (6, 8), (1, 1), ("blue", "green"), None),
    ],
)
def test_parse_caption(caption, task, digits, counts, colours, relation):
    req = ds.parse_caption(caption)
    assert req == ds.Requirement(task, digits, counts, colours, relation)
    assert ds.caption_for(req) == caption


@pytest.mark.parametrize(
    "caption", ["a 12", "one 4s", "a 3 and a 3", "a red 6 and a red 8", "a purple 2", "a 1 near a 9", ""]
)
def test_parse_caption_rejects(caption):
    with pytest.raises(ValueError):
        ds.parse_caption(caption)


def test_random_scenes_round_trip_and_fit_their_captions():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = ds.random_scene(rng)
        req = ds.parse_caption(spec.caption)
        assert req.task == spec.task and ds.caption_for(req) == spec.caption
        cells = [c for c, _, _ in spec.objects]
        assert len(set(cells)) == len(cells) and all(0 <= c < 4 for c in cells)
        by_digit = Counter(d for _, d, _ in spec.objects)
        assert by_digit == Counter({d: n for d, n in zip(req.digits, req.counts, strict=True)})
        # the scene satisfies its own caption under the scorer's rules
        assert gd.check(req, [gd.Detection(c, d, col) for c, d, col in spec.objects])


def test_make_prompts_balanced_and_deterministic():
    prompts = ds.make_prompts(600, seed=5)
    assert prompts == ds.make_prompts(600, seed=5)
    assert prompts != ds.make_prompts(600, seed=6)
    assert Counter(ds.parse_caption(p).task for p in prompts) == {task: 100 for task in ds.TASKS}
    assert len(set(prompts)) > 200
    assert [c for _, c in ds.scenes("eval", 30, seed=5)] == prompts[:30]


# ----------------------------------------------------------------------------------------------- layout


def test_render_obeys_layout():
    rng = np.random.default_rng(7)
    pool = ds.digit_pool("train")
    allowed = {int(np.rint(v / 16 * 255)) for v in range(17)}
    for _ in range(100):
        spec = ds.random_scene(rng)
        image = ds.render(spec, pool, rng)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        colour_of = {cell: colour for cell, _, colour in spec.objects}
        for cell in range(4):
            patch = _cell(image, cell).astype(int)
            if cell not in colour_of:
                assert not patch.any()
                continue
            rgb = np.array(ds.PALETTE[colour_of[cell]])
            level = patch.max(axis=-1)  # round(255 * v / 16) for v in 0..16
            assert set(np.unique(level)) <= allowed and level.max() > 0
            np.testing.assert_array_equal(patch, level[..., None] * (rgb // 255))
            # nearest-neighbour upscaling: every 2×2 block is constant
            blocks = level.reshape(8, 2, 8, 2)
            assert (blocks == blocks[:, :1, :, :1]).all()


def test_render_places_position_captions():
    rng = np.random.default_rng(11)
    for _ in range(100):
        spec = ds.random_scene(rng, "position")
        req = ds.parse_caption(spec.caption)
        cell_of = {d: c for c, d, _ in spec.objects}
        (ra, ca), (rb, cb) = divmod(cell_of[req.digits[0]], 2), divmod(cell_of[req.digits[1]], 2)
        expected = {
            "left of": ra == rb and ca < cb,
            "right of": ra == rb and ca > cb,
            "above": ca == cb and ra < rb,
            "below": ca == cb and ra > rb,
        }
        assert expected[req.relation]


def test_train_and_eval_never_share_digits():
    split = ds.digit_split()
    assert len(split["train"]) + len(split["eval"]) == 1797
    assert not set(split["train"].tolist()) & set(split["eval"].tolist())

    # the scenes themselves: no 16×16 digit brightness pattern of an eval scene occurs in a train scene
    def patterns(split_name: str) -> set[bytes]:
        out = set()
        for image, _ in ds.scenes(split_name, 120, seed=2):
            for cell in range(4):
                level = _cell(image, cell).max(axis=-1)
                if level.any():
                    out.add(level.tobytes())
        return out

    train, held_out = patterns("train"), patterns("eval")
    assert len(train) > 100 and len(held_out) > 100
    assert not train & held_out
    eval_pool = {img.tobytes() for imgs in ds.digit_pool("eval").values() for img in imgs}
    train_pool = {img.tobytes() for imgs in ds.digit_pool("train").values() for img in imgs}
    assert len(eval_pool) == 360 and len(train_pool) == 1437 and not eval_pool & train_pool


def test_occupancy_threshold_separates_real_digits_from_empty():
    cells, _ = ds.digit_arrays("train")
    assert cells.mean(axis=(1, 2)).min() >= 1.5 * gd.OCCUPIED_MEAN
