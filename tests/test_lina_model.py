"""LINA generator: preset sizes, masking, schedules, flow head and sampler, CFG, learning."""

import math

import pytest
import torch

from lina_pl.models import LinaGenerator, LinaSampling, count_parameters, create_model
from lina_pl.nn.flow_head import FlowHead, euler_sample, euler_sigmas, flow_matching_loss
from lina_pl.sampling import cfg_scale, cosine_mask_counts, truncated_normal_mask_ratio


def batch(tokens, labels):
    return {"tokens": tokens, "label": labels}


@pytest.mark.parametrize(
    "name,grid,millions",
    [
        ("lina_c2i_d48w768", None, 362.35),
        ("lina_c2i_d48w1024", None, 643.30),
        ("lina_c2i_d48w1536", None, 1445.38),
        # T2I: a 2560 -> 1536 Phi-2 projection replaces the label table (lina.md §1.1: 1447.78M at 256 px);
        # at 512 / 1024 px only the absolute KV gates grow, by 16·16·(N₅₁₂ − N₂₅₆)·2 (≈1.448B / ≈1.450B)
        ("lina_t2i_d48w1536", None, 1447.78),
        ("lina_t2i_d48w1536", (32, 32), 1447.78 + 16 * 16 * (1280 - 320) * 2 / 1e6),
        ("lina_t2i_d48w1536", (64, 64), 1447.78 + 16 * 16 * (5120 - 320) * 2 / 1e6),
    ],
)
def test_paper_preset_parameter_counts(name, grid, millions):
    with torch.device("meta"):
        model = create_model(name, **({} if grid is None else {"grid": grid}))
    assert count_parameters(model) / 1e6 == pytest.approx(millions, rel=0.01)
    assert count_parameters(model) / 1e6 == pytest.approx(millions, abs=0.01)  # in fact exact to 10k


def test_ablation_configs_build_and_run():
    for overrides in (
        dict(decoder_mixer="inline"),
        dict(mixer="softmax", decoder_mixer="softmax"),
        dict(mixer="hybrid", decoder_mixer="hybrid", hybrid_every=2),
        dict(kv_gate="grid", conv_kernel_size=3),
        dict(kv_gate=None, conv_kernel_size=0, mask_per_sample=True),
    ):
        model = create_model("lina_c2i_tiny", **overrides)
        loss = model.loss(batch(torch.randn(2, 16, 4), torch.tensor([0, 1])))
        assert torch.isfinite(loss), overrides
    with pytest.raises(ValueError, match="mixer"):
        create_model("lina_c2i_tiny", mixer="mamba")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("lina_c2i_huge")


def test_non_square_grid_and_shape_errors():
    model = create_model("lina_c2i_tiny", grid=(3, 5), cond_grid=(2, 3))
    assert torch.isfinite(model.loss(batch(torch.randn(2, 15, 4), torch.tensor([3, 4]))))
    with pytest.raises(ValueError, match="expected tokens"):
        model.loss(batch(torch.randn(2, 16, 4), torch.tensor([3, 4])))


@pytest.mark.parametrize("position", ["sincos", "rope"])
def test_any_grid_trains_and_generates_with_grid_gates(position):
    """One model, several aspect ratios: the condition grid follows the image grid, grid KV gates resize,
    absolute gates refuse a grid they were not built for."""
    model = create_model("lina_c2i_tiny", kv_gate="grid", position=position)
    for grid in ((4, 4), (3, 5), (6, 2), (8, 8)):
        n = grid[0] * grid[1]
        loss = model.loss({"tokens": torch.randn(2, n, 4), "label": torch.tensor([1, 2]), "grid": grid})
        assert torch.isfinite(loss), grid
        assert model.layout(grid, torch.device("cpu")).cond_grid == (
            max(1, grid[0] // 2),
            max(1, grid[1] // 2),
        )
    out = model.eval().generate(
        {"label": torch.tensor([3])}, LinaSampling(steps=2, flow_steps=1), grid=(3, 5)
    )
    assert out.shape == (1, 15, 4)
    absolute = create_model("lina_c2i_tiny", kv_gate="absolute")
    with pytest.raises(ValueError, match="form='grid'"):
        absolute.loss({"tokens": torch.randn(2, 15, 4), "label": torch.tensor([1, 2]), "grid": (3, 5)})


def test_cosine_schedule_predicts_every_token_once():
    for n_tok, steps in ((256, 64), (64, 16), (16, 64), (7, 3)):
        counts = cosine_mask_counts(n_tok, steps)
        assert counts[0] == n_tok and counts[-1] == 0 and len(counts) == steps + 1
        assert all(a >= b for a, b in zip(counts, counts[1:], strict=False))
        assert sum(a - b for a, b in zip(counts, counts[1:], strict=False)) == n_tok
    assert cosine_mask_counts(256, 64)[1] == round(math.cos(math.pi / 128) * 256)


def test_generate_fills_each_position_exactly_once(monkeypatch):
    model = create_model("lina_c2i_tiny").eval()
    calls = torch.zeros(2, 16)

    def fake_sample(self, z, n, w, flow_steps, generator):
        return torch.ones(n, self.config.token_channels)

    original_scatter = torch.Tensor.scatter

    def counting_scatter(self, dim, index, src, *args, **kwargs):
        if self.shape == (2, 16, 4):
            calls.scatter_add_(1, index[..., 0], torch.ones_like(index[..., 0], dtype=calls.dtype))
        return original_scatter(self, dim, index, src, *args, **kwargs)

    monkeypatch.setattr(LinaGenerator, "_sample_tokens", fake_sample)
    monkeypatch.setattr(torch.Tensor, "scatter", counting_scatter)
    tokens = model.generate({"label": torch.tensor([1, 2])}, LinaSampling(steps=5, flow_steps=2))
    assert torch.equal(calls, torch.ones(2, 16))
    assert torch.equal(tokens, torch.ones_like(tokens))


def test_cfg_one_is_the_conditional_model():
    """At scale 1 the guided mix v_u + 1·(v_c − v_u) is the conditional velocity; generate skips it."""
    model = create_model("lina_c2i_tiny").double().eval()
    for p in model.head.parameters():  # non-trivial head
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(6, 32, dtype=torch.float64)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    conditional = model._sample_tokens(z[:3], 3, 1.0, 4, gen())
    guided_at_one = model._sample_tokens(z, 3, 1.0, 4, gen())
    assert torch.allclose(conditional.double(), guided_at_one.double(), atol=1e-12)
    guided = model._sample_tokens(z, 3, 3.0, 4, gen())
    assert not torch.allclose(conditional.double(), guided.double(), atol=1e-3)
    condition, options = {"label": torch.tensor([1, 5])}, LinaSampling(steps=3, flow_steps=2, cfg=1.0)
    a = model.generate(condition, options, generator=gen())
    b = model.generate(condition, options, generator=gen())
    assert torch.equal(a, b)


def test_cfg_schedules():
    assert cfg_scale(3.0, 0, 4, "constant") == 3.0
    assert [cfg_scale(3.0, k, 4, "linear") for k in range(4)] == [1.5, 2.0, 2.5, 3.0]
    with pytest.raises(ValueError):
        cfg_scale(2.0, 0, 4, "cosine")


def test_truncated_normal_mask_ratio():
    r = truncated_normal_mask_ratio((20000,), 0.7, 1.0, 0.25)
    assert r.min() >= 0.7 and r.max() <= 1.0
    # truncated N(1, 0.25) on [0.7, 1]: mean = 1 − 0.25·φ(0)−φ(−1.2) / (Φ(0) − Φ(−1.2)) ≈ 0.858
    phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    big_phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    expected = 1 - 0.25 * (phi(0) - phi(-1.2)) / (big_phi(0) - big_phi(-1.2))
    assert r.mean().item() == pytest.approx(expected, abs=0.005)


@pytest.mark.parametrize("per_sample", [False, True])
def test_sample_mask(per_sample):
    model = create_model("lina_c2i_tiny", mask_per_sample=per_sample)
    visible, masked = model.sample_mask(8, 16, "cpu")
    assert masked.shape == (8, 16) and visible.shape[0] == 8
    assert not masked.gather(1, visible).any()  # visible tokens are never loss targets
    counts = masked.sum(1)
    assert (counts >= round(0.7 * 16)).all()
    if not per_sample:
        assert (counts == counts[0]).all()


def test_flow_head_starts_at_zero_velocity_and_euler_is_exact_on_a_point_mass():
    head = FlowHead(token_channels=3, cond_dim=8, width=16, depth=2)
    v = head(torch.randn(5, 3), torch.rand(5), torch.randn(5, 8))
    assert torch.equal(v, torch.zeros_like(v))
    target = torch.tensor([[0.5, -0.25, 1.0]], dtype=torch.float64)
    # data = a point mass at `target`: the exact velocity is (x − target)/σ, Euler on a straight path is exact
    x = euler_sample(lambda x, s: (x - target) / s[:, None], torch.randn(4, 3, dtype=torch.float64), 7)
    assert torch.allclose(x, target.expand(4, 3), atol=1e-12)
    sig = euler_sigmas(5)
    assert sig[0] == 1.0 and sig[-1] == 0.0 and torch.isclose(sig[-2], torch.tensor(0.001))


def test_flow_loss_targets_velocity():
    """A head that outputs exactly ε − x₀ has zero loss (checks the target and the interpolation)."""
    x0 = torch.randn(64, 3)

    class Oracle(torch.nn.Module):
        def forward(self, x, sigma, z):
            s = sigma[:, None]
            noise = (x - (1 - s) * x0) / s.clamp_min(1e-12)
            return noise - x0

    torch.manual_seed(1)
    loss = flow_matching_loss(Oracle(), x0, torch.zeros(64, 1))
    assert loss.max() < 1e-6 or (loss.max() < 1e-3 and loss.mean() < 1e-5)


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = create_model("lina_c2i_tiny", condition_options={"dropout": 0.0})
    tokens, labels = torch.randn(8, 16, 4).clamp(-1, 1), torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(1)
    first = sum(model.loss(batch(tokens, labels)).item() for _ in range(5)) / 5
    for _ in range(150):
        loss = model.loss(batch(tokens, labels))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.manual_seed(1)
    last = sum(model.loss(batch(tokens, labels)).item() for _ in range(5)) / 5
    assert last < 0.8 * first  # the flow loss keeps an irreducible noise floor


def test_label_dropout_uses_the_null_class():
    model = create_model("lina_c2i_tiny", condition_options={"dropout": 0.999})
    condition = model.condition
    null = condition.null(10)
    torch.manual_seed(0)
    assert torch.equal(condition({"label": torch.arange(10)}), null)  # training: every row dropped
    assert not torch.equal(condition.eval()({"label": torch.arange(10)}), null)  # eval: never
    with pytest.raises(ValueError, match="dropout"):
        create_model("lina_c2i_tiny", condition_options={"dropout": 1.0})
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9"):
        condition({"label": torch.tensor([11])})


def test_sampling_options_are_typed_and_checked():
    with pytest.raises(ValueError, match="top_k"):
        LinaSampling.create("lina", top_k=3)
    for bad in (dict(steps=0), dict(flow_steps=0), dict(cfg=float("nan")), dict(cfg_schedule="cosine")):
        with pytest.raises(ValueError):
            LinaSampling(**bad)
    with pytest.raises(TypeError, match="LinaSampling"):
        create_model("lina_c2i_tiny").generate({"label": torch.tensor([1])}, object())


def test_rope_option_uses_rotations_instead_of_the_additive_embedding():
    torch.manual_seed(0)
    model = create_model("lina_c2i_tiny", position="rope").double()
    layout = model.layout((4, 4), torch.device("cpu"))
    assert layout.image_pos.abs().sum() == 0 and layout.image_rope.shape == (2, 2 * 2 + 16, 8)
    tokens, labels = torch.randn(2, 16, 4, dtype=torch.float64), torch.tensor([1, 2])
    assert torch.isfinite(model.loss(batch(tokens, labels)))
    # the encoder sees visible tokens in a random order: per-sample RoPE rows must follow the tokens, so
    # permuting the visible list changes nothing
    c = model.condition_tower(model.condition.eval()({"label": labels}), layout)
    visible = torch.tensor([[3, 7, 11], [0, 5, 9]])
    z = model.transformer(tokens, visible, c, layout)
    z_perm = model.transformer(tokens, visible[:, [2, 0, 1]], c, layout)
    assert torch.allclose(z, z_perm, atol=1e-10)
    with pytest.raises(ValueError, match="position"):
        create_model("lina_c2i_tiny", position="learned")
