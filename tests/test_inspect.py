"""The inspection notebook's functions on tiny untrained models: generation order, KV-gate maps, DWConv
kernels, LASAD decays, sample grids."""

import pytest
import torch

from lina_pl.lightning import GeneratorModule
from lina_pl.lightning.images import MIN_CELL
from lina_pl.lightning.inspect import (
    cfg_sweep,
    dwconv_kernels,
    generation_order,
    kv_gate_maps,
    lasad_log_decays,
    reveal_frames,
    sequence_to_grid,
    state_weights,
    tile,
)
from lina_pl.models import create_model
from lina_pl.nn import functional as LF
from lina_pl.sampling import cosine_mask_counts

FAST = dict(steps=8, flow_steps=2)


@pytest.fixture(scope="module")
def module():
    """A tiny LINA on 8×8 images in 2×2 patches (a 4×4 token grid), its zero-initialised flow head made
    random so that samples depend on the condition."""
    module = GeneratorModule(
        "lina_c2i_tiny", codec_options={"patch_size": 2}, image_size=(8, 8), num_classes=10
    )
    module.configure_model()
    with torch.no_grad():
        for p in module.generator.head.parameters():
            p.normal_(std=0.2)
    return module.eval()


def test_generation_order_reveals_every_token_once_on_the_cosine_schedule(module):
    images, order = generation_order(module, [0, 3, 7], cfg=2.0, **FAST)
    assert images.shape == (3, 1, 8, 8) and order.shape == (3, 4, 4)
    counts = cosine_mask_counts(16, FAST["steps"])
    per_step = [counts[k] - counts[k + 1] for k in range(FAST["steps"])]
    for sample in order.flatten(1):
        assert sample.min() >= 0 and sample.max() < FAST["steps"]
        assert torch.bincount(sample, minlength=FAST["steps"]).tolist() == per_step
    # the hook sees each token exactly once, and watching changes nothing
    revealed = []
    batch = module.condition.display_batch([0, 3, 7], 1)
    options = module.sampling_options(cfg=2.0, **FAST)
    hooked = module.sample_images(batch, options, on_step=lambda k, idx: revealed.append(idx))
    assert torch.equal(torch.cat(revealed, dim=1).sort(dim=1).values, torch.arange(16).expand(3, -1))
    assert torch.equal(hooked, module.sample_images(batch, options)) and torch.equal(hooked, images)


def test_reveal_frames_hide_the_tokens_revealed_later(module):
    images, order = generation_order(module, [1, 2], **FAST)
    frames = reveal_frames(images, order, [0, 3, FAST["steps"] - 1])
    assert frames.shape == (2, 3, 1, 8, 8)
    assert torch.equal(frames[:, -1], images)
    hidden = order.repeat_interleave(2, -2).repeat_interleave(2, -1)[:, None] > 3
    assert torch.equal(frames[:, 1], images.masked_fill(hidden, 0.0))


def test_cfg_sweep_rows_differ_by_guidance_only(module):
    grid = cfg_sweep(module, [0, 1, 2], [1.0, 1.0, 4.0], **FAST)
    cell = MIN_CELL + 2  # an 8-px sample enlarged to 64 px, 2 px of padding
    assert grid.shape[0] == 3 * cell + 2 and grid.shape[2] == 1
    right = grid.shape[1] - 3 * cell
    rows = [grid[2 + r * cell : (r + 1) * cell, right:] for r in range(3)]
    assert (rows[0] == rows[1]).all() and not (rows[0] == rows[2]).all()


@pytest.mark.parametrize("form", ["absolute", "grid"])
def test_kv_gate_maps_are_the_learned_gates_on_the_grid(form):
    model = create_model("lina_c2i_tiny", kv_gate=form)
    gate = model.decoder_blocks[0].attn.kv_gate
    with torch.no_grad():
        for p in gate.parameters():
            p.normal_()
    maps = kv_gate_maps(model)
    name = "decoder_blocks.0.attn.kv_gate"
    assert sorted(maps) == [f"{name}.key", f"{name}.value"]
    assert maps[f"{name}.key"].shape == (2, 4, 4) and not maps[f"{name}.key"].requires_grad  # heads × grid
    n_cond = gate.n_cond
    expected = gate.key[:, n_cond:].reshape(2, 4, 4) if form == "absolute" else gate.key.exp()
    assert torch.allclose(maps[f"{name}.key"], expected.detach())


def test_dwconv_kernels_and_tile():
    model = create_model("lina_c2i_tiny")
    kernels = dwconv_kernels(model)
    assert list(kernels) == ["decoder_blocks.0.attn.conv"]
    weight = model.decoder_blocks[0].attn.conv.conv.weight
    assert kernels["decoder_blocks.0.attn.conv"].shape == (32, 5, 5)
    assert not kernels["decoder_blocks.0.attn.conv"].requires_grad
    assert torch.equal(kernels["decoder_blocks.0.attn.conv"], weight[:, 0].detach())
    tiled = tile(kernels["decoder_blocks.0.attn.conv"], ncols=8)
    assert tiled.shape == (4 * 6 - 1, 8 * 6 - 1)
    assert torch.equal(tiled[6:11, 12:17], weight[10, 0].detach()) and tiled[5].isnan().all()


def _lasad(**options):
    model = create_model("lasad_tiny", grid=(3, 4), **options).eval()
    with torch.no_grad():
        model.lower_bounds.normal_()
    return model


def test_lasad_log_decays_show_the_spatial_mask_once_per_row():
    model = _lasad()
    codes, condition = torch.randint(0, 64, (2, 12)), {"label": torch.tensor([1, 5])}
    decays = lasad_log_decays(model, codes, condition)
    assert decays.shape == (2, 2, 3, 4)  # layers, batch, grid
    assert torch.isfinite(decays).all() and (decays <= 0).all() and not decays.requires_grad
    assert (decays[..., -1] == 0).all() and (decays[..., :-1] < 0).all()  # row_last: λ = 1 at the row end
    # layer 0 (no lower bound) by hand: its attention input is the normed [class token, codes]
    x = torch.cat([model.condition(condition), model.tok_embeddings(codes)], dim=1)
    layer = model.layers[0]
    normed = LF.rms_norm(x, layer.attention_norm.weight, layer.attention_norm.eps)
    _, log_decay = layer.attn.log_decays(normed, 0, n_cond=1, grid_hw=(3, 4))
    assert torch.allclose(decays[0], log_decay[:, 1:].mean(dim=(-2, -1)).view(2, 3, 4).detach())
    reset = lasad_log_decays(_lasad(sad_mode="reset"), codes, condition)
    assert (reset[..., -1] == LF.RESET_LOG_DECAY).all()
    assert (lasad_log_decays(_lasad(sad_mode="off"), codes, condition) < 0).all()
    with pytest.raises(ValueError, match="no LASAD layers"):
        lasad_log_decays(create_model("llamagen_tiny"), codes, condition)


def test_state_weights_fade_with_raster_distance():
    decays = lasad_log_decays(
        _lasad(sad_mode="off"), torch.randint(0, 64, (1, 12)), {"label": torch.tensor([2])}
    )
    weights = state_weights(decays, (1, 2))  # the 7th token in raster order
    flat = weights.flatten(-2)
    assert weights.shape == decays.shape
    assert (flat[..., :7] > 0).all() and (flat[..., :7] <= 1).all() and (flat[..., 7:] == 0).all()
    assert (flat[..., 6] == 1).all() and (flat[..., :7].diff(dim=-1) > 0).all()  # fading back in time
    with pytest.raises(ValueError, match="outside"):
        state_weights(decays, (3, 0))


def test_sequence_to_grid_checks_the_length():
    assert sequence_to_grid(torch.arange(12), (3, 4))[2, 1] == 9
    with pytest.raises(ValueError, match="3×4 = 12 tokens"):
        sequence_to_grid(torch.arange(10), (3, 4))
