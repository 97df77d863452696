"""GeneratorModule and its callbacks in-process: bf16-mixed steps with clipping, the fp32 EMA callback
(arithmetic, validation swap, checkpoint), LR schedule, sampling options, eager config errors."""

import lightning as L
import pytest
import torch

from lina_pl.data.build import build
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.sources import DigitsSource
from lina_pl.lightning import EMA, GeneratorModule
from lina_pl.lightning.callbacks import EMA_KEY
from lina_pl.lightning.checkpoint import load_module
from lina_pl.lightning.module import lr_factor


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits8")
    build(DigitsSource(resolution=8), out, shard_size=500)
    return out


def _module(**kw):
    options = dict(generator="lina_c2i_tiny", image_size=(8, 8), image_channels=1, num_classes=10)
    module = GeneratorModule(**(options | kw))
    module.configure_model()
    return module


def _trainer(tmp_path, **kw):
    options = dict(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    return L.Trainer(**(options | kw))


def test_bf16_mixed_training_with_clipping_updates_weights_and_a_fp32_ema(shards, tmp_path):
    module = _module(lr=1e-3)
    before = [p.detach().clone() for p in module.generator.parameters()]
    data = ShardDataModule(str(shards), batch_size=8, num_workers=0, samples_per_epoch=24)
    ema = EMA(decay=0.5)
    trainer = _trainer(tmp_path, precision="bf16-mixed", gradient_clip_val=1.0, callbacks=[ema])
    trainer.fit(module, data)
    assert trainer.global_step == 3
    changed = [not torch.equal(a, b) for a, b in zip(before, module.generator.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    assert all(p.dtype == torch.float32 for p in module.generator.parameters())  # fp32 master weights
    assert all(w.dtype == torch.float32 for w in ema.weights.values())
    live = dict(module.generator.named_parameters())
    gap = sum((w - live[n]).abs().sum() for n, w in ema.weights.items())
    assert torch.isfinite(gap) and gap > 0
    # the checkpoint carries the EMA; `lina sample` loads it into the generator (or the live weights)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=False)[EMA_KEY]
    assert set(saved) == set(live)
    loaded = load_module(path)
    for name, p in loaded.generator.named_parameters():
        assert torch.equal(p, saved[name])
    live_loaded = dict(load_module(path, use_ema=False).generator.named_parameters())
    assert all(torch.equal(live_loaded[n], p.detach()) for n, p in live.items())


def test_ema_update_is_a_lerp_every_n_steps():
    module = _module()
    ema = EMA(decay=0.9, every_n_steps=2)
    ema.on_train_start(None, module)
    old = {n: w.clone() for n, w in ema.weights.items()}
    with torch.no_grad():
        for p in module.generator.parameters():
            p.add_(1.0)
    trainer = type("T", (), {"global_step": 1})()
    ema.on_train_batch_end(trainer, module)  # step 1: not due
    assert all(torch.equal(ema.weights[n], old[n]) for n in old)
    trainer.global_step = 2
    ema.on_train_batch_end(trainer, module)
    ema.on_train_batch_end(trainer, module)  # no optimizer step since: no second update
    for name, p in module.generator.named_parameters():
        assert torch.allclose(ema.weights[name], 0.9 * old[name] + 0.1 * p, atol=1e-6)


def test_validation_and_sampling_use_the_ema_weights():
    module = _module()
    ema = EMA(decay=0.9)
    ema.on_train_start(None, module)
    with torch.no_grad():
        for name, w in ema.weights.items():
            if name.startswith("head."):
                w.normal_(std=0.5)
    condition = {"label": torch.tensor([1, 2])}
    options = module.sampling_options(steps=2, flow_steps=2)
    live = module.sample_images(condition, options, seed=1)
    live_params = {n: p.detach().clone() for n, p in module.generator.named_parameters()}
    ema.on_validation_start(None, module)
    swapped = module.sample_images(condition, options, seed=1)
    ema.on_validation_end(None, module)
    assert swapped.shape == (2, 1, 8, 8) and swapped.min() >= -1 and swapped.max() <= 1
    assert not torch.allclose(swapped, live)
    assert all(torch.equal(p, live_params[n]) for n, p in module.generator.named_parameters())


def test_lr_schedule():
    assert lr_factor(0, 10, "constant", 100) == pytest.approx(0.001)
    assert lr_factor(5, 10, "constant", 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(50, 10, "constant", 100) == 1.0
    assert lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.5)
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        _module(lr_schedule="step")


def test_bad_configs_fail_when_the_module_is_built():
    with pytest.raises(ValueError, match="unknown codec"):
        _module(codec="jpeg")
    with pytest.raises(ValueError, match="unknown model"):
        _module(generator="lina_c2i_huge")
    with pytest.raises(ValueError, match="discrete"):  # a raster model on a continuous codec
        _module(generator="lasad_tiny")
    with pytest.raises(ValueError, match="top_k"):  # a raster option on LINA
        _module(sampling={"top_k": 3})
    with pytest.raises(ValueError, match="steps must be"):
        _module(sampling={"steps": 0})
    with pytest.raises(ValueError, match="fields are"):  # a typo in generator_options names the fields
        _module(generator_options={"deapth": 3})
    with pytest.raises(ValueError, match="not divisible"):
        _module(codec_options={"patch_size": 3})
    with pytest.raises(ValueError, match="10 classes"):
        _module(condition_options={"num_classes": 7})


def test_sampling_options_merge_defaults_and_overrides():
    module = _module(sampling={"steps": 5, "cfg": 2.0})
    options = module.sampling_options(flow_steps=3)
    assert (options.steps, options.cfg, options.flow_steps, options.cfg_schedule) == (5, 2.0, 3, "linear")


@pytest.mark.parametrize("form", ["grid", "absolute"])
def test_init_from_a_lower_resolution_checkpoint(tmp_path, form):
    """The curriculum: a 4×4-grid run warm-starts an 8×8-grid model; shape-compatible tensors are copied,
    grid gates are interpolated (or reset on request), absolute gates go back to 1, and the rest is listed."""
    from lina_pl.lightning.init_from import source_weights, transfer_weights

    low = _module(generator_options={"kv_gate": form})
    with torch.no_grad():
        for p in low.generator.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trainer = _trainer(tmp_path)
    trainer.strategy.connect(low)
    trainer.save_checkpoint(tmp_path / "low.ckpt")
    source = source_weights(tmp_path / "low.ckpt")
    for gates in ("resize", "reset"):
        high = GeneratorModule(
            generator="lina_c2i_tiny",
            image_size=(16, 16),
            num_classes=10,
            generator_options={"kv_gate": form},
        )
        high.configure_model()
        report = transfer_weights(high.generator, source, gates)
        high_params = dict(high.generator.named_parameters())
        assert report["copied"] and not report["missing"] and not report["kept"]
        for name in report["copied"]:
            assert torch.equal(high_params[name], source[name]), name
        gate = high.generator.decoder_blocks[0].attn.kv_gate
        prefix = "decoder_blocks.0.attn.kv_gate"
        if form == "grid" and gates == "resize":
            assert f"{prefix}.key" in report["resized"] and gate.key.shape[1:] == (8, 8)
            corners = gate.key[:, [0, -1]][:, :, [0, -1]]  # align_corners: the corners keep their values
            assert torch.allclose(corners, source[f"{prefix}.key"][:, [0, -1]][:, :, [0, -1]])
        else:
            assert f"{prefix}.key" in report["reset"]
            assert torch.equal(gate.key, torch.full_like(gate.key, 1.0 if form == "absolute" else 0.0))
    with pytest.raises(FileNotFoundError, match="init_from checkpoint not found"):
        source_weights(tmp_path / "missing.ckpt")
