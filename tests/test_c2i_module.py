"""LinaC2I in-process: bf16-mixed steps with clipping, EMA arithmetic, LR schedule, EMA sampling."""

import lightning as L
import pytest
import torch

from lina_pl.data.build import build
from lina_pl.data.datamodule import ShardDataModule
from lina_pl.data.sources import DigitsSource
from lina_pl.lightning.base import lr_factor
from lina_pl.lightning.c2i import LinaC2I


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits8")
    build(DigitsSource(resolution=8), out, shard_size=500)
    return out


def _module(**kw):
    return LinaC2I(model="lina_c2i_tiny", image_size=(8, 8), image_channels=1, num_classes=10, **kw)


def test_bf16_mixed_training_with_clipping_updates_weights_and_ema(shards):
    module = _module(ema_decay=0.5, lr=1e-3)
    before = [p.detach().clone() for p in module.model.parameters()]
    data = ShardDataModule(str(shards), batch_size=8, num_workers=0, samples_per_epoch=24)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_steps=3,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, data)
    assert trainer.global_step == 3
    changed = [not torch.equal(a, b) for a, b in zip(before, module.model.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    assert all(p.dtype == torch.float32 for p in module.model.parameters())  # fp32 master weights
    ema_gap = sum(
        (e - p).abs().sum() for e, p in zip(module.ema.parameters(), module.model.parameters(), strict=True)
    )
    assert torch.isfinite(ema_gap) and ema_gap > 0


def test_ema_update_is_a_lerp():
    module = _module(ema_decay=0.9)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    old = [p.detach().clone() for p in module.ema.parameters()]
    module.update_ema()
    for e, o, p in zip(module.ema.parameters(), old, module.model.parameters(), strict=True):
        assert torch.allclose(e, 0.9 * o + 0.1 * p, atol=1e-6)


def test_samples_come_from_the_ema_weights():
    module = _module()
    with torch.no_grad():
        for p in module.ema.head.parameters():
            p.normal_(std=0.5)
    labels = torch.tensor([1, 2])
    ema = module.sample_images(labels, steps=2, flow_steps=2, seed=1)
    live = module.sample_images(labels, steps=2, flow_steps=2, seed=1, use_ema=False)
    assert ema.shape == (2, 1, 8, 8) and ema.min() >= -1 and ema.max() <= 1
    assert not torch.allclose(ema, live)


def test_lr_schedule():
    assert lr_factor(0, 10, "constant", 100) == pytest.approx(0.001)
    assert lr_factor(5, 10, "constant", 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(50, 10, "constant", 100) == 1.0
    assert lr_factor(10, 10, "cosine", 110) == pytest.approx(1.0)
    assert lr_factor(60, 10, "cosine", 110) == pytest.approx(0.5)
    assert lr_factor(110, 10, "cosine", 110) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        _module(lr_schedule="step")


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown codec"):
        _module(codec="jpeg")
