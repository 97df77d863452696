"""Raster AR generator (LASADGen / LlamaGen / baselines): sizes, incremental decoding, SAD, CFG, sampling."""

import pytest
import torch

from lina_pl.models import RasterSampling, count_parameters, create_model
from lina_pl.models.raster import RASTER_MIXERS
from lina_pl.nn.optim import parameter_groups
from lina_pl.sampling import sample_logits

LLAMAGEN = {"b": 110.9, "l": 342.9, "xl": 774.7, "xxl": 1411.0}
LASAD = {"b": 110.9, "l": 343.0, "xl": 774.8, "xxl": 1411.1}  # reference/lasad.md §2.5 (computed)


@pytest.mark.parametrize("size", sorted(LLAMAGEN))
def test_preset_parameter_counts(size):
    with torch.device("meta"):
        llamagen, lasad = create_model(f"llamagen_{size}"), create_model(f"lasad_{size}")
    assert count_parameters(llamagen) / 1e6 == pytest.approx(LLAMAGEN[size], rel=1e-3)
    assert count_parameters(lasad) / 1e6 == pytest.approx(LASAD[size], rel=1e-3)


def _tiny(mixer, **kw):
    model = create_model("lasad_tiny", mixer=mixer, grid=(3, 4), **kw).double().eval()
    with torch.no_grad():
        model.output.weight.normal_(std=0.5)  # a non-zero head, so logits carry the whole network
        if model.lower_bounds is not None:
            model.lower_bounds.normal_()
    return model


@pytest.mark.parametrize(
    "mixer,kw",
    [(m, {}) for m in RASTER_MIXERS]
    + [
        ("lasad", {"sad_mode": "reset", "sad_position": "row_first"}),
        ("lasad", {"sad_mode": "off"}),
        ("gla", {"gla_sad": True}),
        ("tnl", {"tnl_decay": "alibi"}),
        ("hybrid", {"hybrid_linear": "lasad", "hybrid_softmax_layers": [0]}),
        ("hybrid", {"hybrid_linear": "lasad"}),  # softmax at layer 1 once received LASAD's lower bound
    ],
)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_incremental_decoding_reproduces_the_full_forward(mixer, kw, dtype, atol):
    model = _tiny(mixer, **kw).to(dtype)
    codes, labels = torch.randint(0, 64, (2, 12)), torch.tensor([3, 7])
    full = model.logits(codes, {"label": labels})  # [B, 12, V]: teacher forcing over [cls, x_1 … x_11]
    logits, states = model.step(model.condition({"label": labels}), None, 0)
    steps = [logits]
    for i in range(11):
        logits, states = model.step(model.tok_embeddings(codes[:, i : i + 1]), states, i + 1)
        steps.append(logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=atol, rtol=0)


@pytest.mark.parametrize("mixer", RASTER_MIXERS)
def test_bf16_autocast_tracks_fp32_in_training_and_decoding(mixer):
    """bf16-mixed (the paper recipes' precision) on a non-square grid: teacher-forced and decoded logits
    stay close to fp32."""
    model = _tiny(mixer).float()
    codes, labels = torch.randint(0, 64, (2, 12)), torch.tensor([3, 7])
    reference = model.logits(codes, {"label": labels})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.logits(codes, {"label": labels})
        _, states = model.step(model.condition({"label": labels}), None, 0)
        logits, states = model.step(model.tok_embeddings(codes[:, :1]), states, 1)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    rel = (mixed - reference).norm() / reference.norm()
    assert rel < 0.05, f"bf16 autocast drifts {rel:.3f} from fp32"
    assert torch.allclose(logits[:, -1], mixed[:, 1], atol=0.1 * reference.abs().max().item())


def test_sad_mask_lands_on_the_documented_positions_in_training_and_decoding(monkeypatch):
    """Record the positions whose log-decay LASAD zeroes, in one forward and in step-by-step decoding."""
    from lina_pl.nn import functional as LF

    seen = {"forward": set(), "decode": set()}
    mode = {"now": "forward"}
    original = LF.spatial_aware_log_decay

    def spy(log_decay, width, *, start=0, mode_=None, **kw):
        out = original(log_decay, width, start=start, **kw)
        rows = (out == 0).flatten(2).all(-1).any(0).nonzero().flatten() + start
        seen[mode["now"]].update(rows.tolist())
        return out

    monkeypatch.setattr(LF, "spatial_aware_log_decay", spy)
    model = _tiny("lasad")
    codes, labels = torch.randint(0, 64, (1, 12)), torch.tensor([1])
    model.logits(codes, {"label": labels})
    mode["now"] = "decode"
    logits, states = model.step(model.condition({"label": labels}), None, 0)
    for i in range(11):
        logits, states = model.step(model.tok_embeddings(codes[:, i : i + 1]), states, i + 1)
    expected = {0, 4, 8}  # width 4, class token at 0: i % w == 0 (row_last)
    assert seen["forward"] == expected and seen["decode"] == expected


def test_cfg_one_is_the_conditional_model():
    model = _tiny("lasad")
    labels = {"label": torch.tensor([2, 5])}
    a = model.generate(labels, RasterSampling(cfg=1.0), generator=torch.Generator().manual_seed(0))
    b = model.generate(labels, RasterSampling(cfg=1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 12) and (a >= 0).all() and (a < 64).all()
    # guided decoding at scale 1 through the doubled batch gives the same codes
    c = model.generate(labels, RasterSampling(cfg=1.0 + 1e-12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, c)


def test_sample_logits_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack(
        [sample_logits(logits, top_k=2, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    )
    assert set(draws.flatten().tolist()) <= {0, 1}
    draws = torch.stack(
        [sample_logits(logits, top_p=0.7, generator=torch.Generator().manual_seed(i)) for i in range(200)]
    )
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 < 0.7 ≤ 0.8
    greedy = sample_logits(logits * 1e3, temperature=1.0)
    assert greedy.item() == 0


def test_yaml_off_is_accepted_for_sad_mode():
    """YAML 1.1 turns a bare `off` into false; the config maps it back to "off"."""
    model = create_model("lasad_tiny", sad_mode=False)
    assert model.config.sad_mode == "off" and model.layers[0].attn.sad_mode == "off"


def test_lower_bounds_are_excluded_from_weight_decay_and_head_starts_at_zero():
    model = create_model("lasad_tiny")
    decay, no_decay = parameter_groups(model, 0.05)
    assert any(p is model.lower_bounds for p in no_decay["params"])
    assert torch.equal(model.output.weight, torch.zeros_like(model.output.weight))
    with pytest.raises(ValueError, match="mixer"):
        create_model("lasad_tiny", mixer="mamba")
    with pytest.raises(ValueError, match="expected codes"):
        model.loss({"tokens": torch.zeros(2, 5, dtype=torch.long), "label": torch.tensor([1, 2])})
    for bad in (dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            RasterSampling(**bad)
    with pytest.raises(ValueError, match="steps"):
        RasterSampling.create("raster", steps=8)
