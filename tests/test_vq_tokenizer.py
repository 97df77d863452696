"""LlamaGen's VQ tokenizer: checkpoint layout, architecture read from shapes, nearest-code quantisation
against a float64 reference, bad checkpoints, and a raster module training on its codes."""

import pytest
import torch
import torch.nn.functional as F

from lina_pl.codecs import create_codec
from lina_pl.codecs.llamagen_vq import VQConfig, VQModel
from lina_pl.lightning import GeneratorModule

TINY = VQConfig(
    codebook_size=64, codebook_dim=4, channels=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32
)


def save_checkpoint(path, cfg=TINY, seed=0, wrap="model"):
    """A random VQ in LlamaGen's checkpoint format, with the usage buffer its training code keeps."""
    torch.manual_seed(seed)
    state = VQModel(cfg).state_dict()
    for v in state.values():
        v.normal_(0, 0.1)
    state["quantize.codebook_used"] = torch.zeros(65536)
    torch.save({wrap: state, "steps": 0} if wrap else state, path)
    return state


def test_vq16_size_matches_reference():
    model = VQModel(VQConfig())  # reference/lasad.md §3.2: 72M parameters, ×16 downsampling
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(72e6, rel=0.01)
    assert VQConfig().downsample == 16


@pytest.mark.parametrize("wrap", ["model", "ema", None])
def test_architecture_is_read_from_the_checkpoint(tmp_path, wrap):
    cfg = VQConfig(**{**TINY.__dict__, "image_channels": 1, "num_res_blocks": 2})
    state = save_checkpoint(tmp_path / "vq.pt", cfg, wrap=wrap)
    tok = create_codec("llamagen_vq", path=str(tmp_path / "vq.pt"))
    assert tok.config == cfg and tok.channels == 1 and tok.codebook_size == 64 and tok.downsample == 2
    assert torch.equal(tok.model.quantize.embedding.weight, state["quantize.embedding.weight"])


def test_codes_are_the_nearest_unit_codebook_vectors(tmp_path):
    save_checkpoint(tmp_path / "vq.pt")
    tok = create_codec("llamagen_vq", path=str(tmp_path / "vq.pt"))
    images = torch.rand(3, 3, 12, 20) * 2 - 1  # non-square: a 6×10 grid
    codes = tok.encode(images)
    assert codes.shape == (3, 60) and codes.dtype == torch.int64 and tok.grid((12, 20)) == (6, 10)
    model = tok.model.double()
    with torch.no_grad():  # float64 reference: maximal cosine similarity = minimal distance of unit vectors
        z = model.quant_conv(model.encoder(images.double())).flatten(2).transpose(1, 2)
        cos = F.normalize(z, dim=-1) @ F.normalize(model.quantize.embedding.weight, dim=-1).T
    model.float()
    assert torch.equal(codes, cos.argmax(dim=-1))
    decoded = tok.decode(codes, (6, 10))
    assert decoded.shape == (3, 3, 12, 20) and decoded.abs().max() <= 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training runs under bf16 autocast: codes unchanged
        assert torch.equal(tok.encode(images), codes)


def test_bad_checkpoints_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="vq_ds16"):
        create_codec("llamagen_vq", path=str(tmp_path / "missing.pt"))
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a LlamaGen VQ"):
        create_codec("llamagen_vq", path=str(tmp_path / "other.pt"))
    state = save_checkpoint(tmp_path / "vq.pt", wrap=None)
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="unexpected.*decoder.extra"):
        create_codec("llamagen_vq", path=str(tmp_path / "extra.pt"))
    with pytest.raises(ValueError, match="exactly one option"):
        create_codec("kmeans", path="x.npz", l2_norm=True)
    with pytest.raises(ValueError, match="unknown codec"):
        create_codec("vqgan")


def test_raster_module_trains_and_samples_on_vq_codes(tmp_path):
    cfg = VQConfig(**{**TINY.__dict__, "image_channels": 1})
    save_checkpoint(tmp_path / "vq.pt", cfg)
    module = GeneratorModule(
        "lasad_tiny",
        codec="llamagen_vq",
        codec_options={"path": str(tmp_path / "vq.pt")},
        image_size=(8, 12),
        image_channels=1,
    )
    module.configure_model()
    assert module.generator.config.grid == (4, 6) and module.generator.config.vocab_size == 64
    batch = {"latent": torch.rand(4, 1, 8, 12) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    loss = module.loss(batch)
    loss.backward()
    assert (
        torch.isfinite(loss) and module.generator.output.weight.grad.abs().sum() > 0
    )  # zero-init head: it moves first
    assert not any(p.requires_grad for p in module.codec.model.parameters())
    images = module.sample_images({"label": torch.tensor([5, 6])}, module.sampling_options(cfg=2.0, top_k=8))
    assert images.shape == (2, 1, 8, 12) and images.abs().max() <= 1
    with pytest.raises(ValueError, match="3-channel"):
        save_checkpoint(tmp_path / "rgb.pt")
        GeneratorModule("lasad_tiny", codec="llamagen_vq", codec_options={"path": str(tmp_path / "rgb.pt")})
