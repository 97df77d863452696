"""Every shipped config builds its model and its data module; the paper recipes hold the papers' values.

A recipe's first line is the command that runs it, ``# lina fit --config BASE --config RECIPE``; these tests
compose exactly those files, in that order (a config without such a line runs alone). Cluster paths do not
exist here, so only the path-like values — the data root, the codec's weights, the run directory — are
replaced with tiny local stand-ins of the same format (shards with the recipe's token grid and class count,
a random VAE / VQ / k-means tokenizer of the recipe's shape); everything else is the shipped value. The
generator is built on the meta device, so a 1.4B preset costs nothing, and configs that run on a CPU are
also built for real and take one loss on a batch of their data.
"""

import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lina_pl.codecs import create_codec
from lina_pl.codecs.kmeans import KMeansTokenizer
from lina_pl.codecs.llamagen_vq import VQConfig, VQModel
from lina_pl.data.build import build
from lina_pl.data.sources import DigitScenesSource, DigitsSource
from lina_pl.lightning import EMA, SampleGrid
from lina_pl.lightning.cli import LinaCLI, build_cli
from lina_pl.models import create_model
from lina_pl.text.encoder import shared_text_encoder

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "# lina fit "


def composed_files(path: Path) -> list[Path]:
    """The files ``path``'s first-line command composes (just ``path`` when it has no such line)."""
    first = path.read_text().splitlines()[0]
    if not first.startswith(COMMAND):
        return [path]
    args = shlex.split(first[len(COMMAND) :])
    assert args[::2] == ["--config"] * (len(args) // 2) and len(args) % 2 == 0, f"{path}: {first!r}"
    return [ROOT / arg for arg in args[1::2]]


# configs/trainer/ holds strategies, composed with any run as a further --config (tested below)
STRATEGIES = sorted((ROOT / "configs/trainer").glob("*.yaml"))
# configs/ablations/ holds `lina ablate` suites, not configs (test_ablate.py builds their variants)
SUITES = sorted((ROOT / "configs/ablations").glob("*.yaml"))
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(STRATEGIES) - set(SUITES))
COMPOSED = {path: composed_files(path) for path in CONFIGS}
BASES = {base for files in COMPOSED.values() for base in files[:-1]}
# every config that is a run (alone or composed), by name: "c2i/demo", "raster/lasad_b", ...
RUNS = {
    str(p.relative_to(ROOT / "configs").with_suffix("")): files
    for p, files in COMPOSED.items()
    if p not in BASES
}

LINA_RECIPES = {"c2i/lina_d48w768": 64, "c2i/lina_d48w1024": 48, "c2i/lina_d48w1536": 24}  # per-GPU batch
LINA_CFG = {"c2i/lina_d48w768": 2.5, "c2i/lina_d48w1024": 2.5, "c2i/lina_d48w1536": 2.4}
LASAD_CFG = {"raster/lasad_b": 2.0, "raster/lasad_l": 2.0, "raster/lasad_xl": 1.75, "raster/lasad_xxl": 1.75}
# the T2I curriculum (reference/lina.md §3.6, §4.2): token grid, per-GPU batch (× 48 GPUs), lr, warm start
T2I_STAGES = {
    "t2i/stage256": ((16, 16), 16, 2e-4, None),
    "t2i/stage512": ((32, 32), 4, 1e-4, "runs/t2i_stage256/checkpoints/last.ckpt"),
    "t2i/stage1024": ((64, 64), 1, 5e-5, "runs/t2i_stage512/checkpoints/last.ckpt"),
}
# trainable parameters, reference/lina.md §1.2 and reference/lasad.md §2.5
PAPER_PARAMETERS = {
    "lina_c2i_d48w768": 362.35e6,
    "lina_c2i_d48w1024": 643.30e6,
    "lina_c2i_d48w1536": 1445.4e6,
    "lina_t2i_d48w1536": 1447.78e6,
    "lasad_b": 110.9e6,
    "lasad_l": 343.0e6,
    "lasad_xl": 774.8e6,
    "lasad_xxl": 1411.1e6,
}


def test_configs_are_runs_or_bases_of_existing_files():
    assert {"c2i/demo", "raster/demo", "t2i/demo", *LINA_RECIPES, *LASAD_CFG, *T2I_STAGES} <= set(RUNS)
    bases = {"c2i/imagenet.yaml", "raster/imagenet.yaml", "t2i/sdxl_phi2.yaml"}
    assert {ROOT / "configs" / base for base in bases} == BASES
    for path, files in COMPOSED.items():
        assert files[-1] == path, f"{path}'s first line must end with --config {path.relative_to(ROOT)}"
        assert all(f.is_file() for f in files), files
    assert not any(len(COMPOSED[base]) > 1 for base in BASES), "a base composes nothing itself"


# ---------------------------------------------------------------------------------------------------------
# stand-ins for the cluster paths
# ---------------------------------------------------------------------------------------------------------


class ImageNetDigits(DigitsSource):
    """The first ``n`` digits at ``resolution`` px, filed under ImageNet's 1000 class indices."""

    def __init__(self, n: int, resolution: int):
        super().__init__(resolution)
        self.labels, self.keys = self.labels[:n], self.keys[:n]
        self.class_names = [f"n{i:08d}" for i in range(1000)]


def save_vq(path: Path) -> Path:
    """A random LlamaGen VQ with VQ-16's codebook (16384 × 8) but stride 2: 32 px -> 16×16 codes."""
    torch.manual_seed(0)
    cfg = VQConfig(channels=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32)
    state = VQModel(cfg).state_dict()
    for v in state.values():
        v.normal_(0, 0.1)
    torch.save({"model": state}, path)
    return path


def save_vae(path: Path, latent_channels: int = 16) -> Path:
    """A random AutoencoderKL with KL-16's 16 latent channels (or SDXL's 4) but stride 2: 32 px -> 16×16
    latents."""
    import diffusers

    torch.manual_seed(0)
    diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Per codec: (data root, codec path or None), each the format its configs expect."""
    tmp = tmp_path_factory.mktemp("stand_ins")
    digits = tmp / "digits"
    build(DigitsSource(), digits)  # the demos' 16-px PNG shards
    # `lina tokenizer fit`'s defaults (256 codes of 2×2 patches), random: fitting is test_raster_training's
    kmeans = KMeansTokenizer(torch.rand(256, 4) * 2 - 1, 2, 1).save(tmp / "tok.npz")
    imagenet = ImageNetDigits(30, resolution=32)
    vae, vq = save_vae(tmp / "vae"), save_vq(tmp / "vq.pt")
    build(imagenet, tmp / "latents", codec=create_codec("diffusers", path=str(vae)), val_fraction=0.5)
    build(imagenet, tmp / "codes", codec=create_codec("llamagen_vq", path=str(vq)), val_fraction=0.5)
    # text: digit scenes with MiniLM features (the T2I demo); SDXL-shaped latents of captioned scenes at the
    # curriculum's token grids 16², 32², 64² (a stride-2 VAE stands in for SDXL's stride 8: ¼ of the pixels)
    scenes = tmp / "scenes"
    build(DigitScenesSource(8, 4), scenes, text_encoder=shared_text_encoder("bundled:minilm", max_length=16))
    sdxl = save_vae(tmp / "sdxl", latent_channels=4)
    stand_ins = {"t2i:patchify": (scenes, None)}
    for pixels in (256, 512, 1024):
        out = tmp / f"scene_latents{pixels}"
        build(
            DigitScenesSource(2, 2, resolution=pixels // 4),
            out,
            codec=create_codec("diffusers", path=str(sdxl)),
        )
        stand_ins[f"t2i:diffusers:{pixels}"] = (out, sdxl)
    return stand_ins | {
        "patchify": (digits, None),
        "kmeans": (digits, kmeans),
        "diffusers": (tmp / "latents", vae),
        "llamagen_vq": (tmp / "codes", vq),
    }


def stand_in_key(name: str, codec: str) -> str:
    """Which stand-in a run uses: by codec, for text runs by codec and resolution (``t2i/stage512``)."""
    if not name.startswith("t2i/"):
        return codec
    pixels = "".join(ch for ch in name.rsplit("stage", 1)[-1] if ch.isdigit()) if "stage" in name else ""
    return ":".join(filter(None, ("t2i", codec, pixels)))


def replace(doc: dict, dotted: str, value) -> None:
    """Set ``doc[a][b][c] = value`` for ``dotted == "a.b.c"`` where the file has that key."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        doc = doc.get(key) if isinstance(doc, dict) else None
    if isinstance(doc, dict) and leaf in doc:
        doc[leaf] = value


def localize(name: str, stand_ins: dict, out_dir: Path, edit=None) -> list[str]:
    """Copies of ``RUNS[name]``'s files with the path-like values replaced; ``edit(docs)`` may change more."""
    docs = [yaml.safe_load(path.read_text()) for path in RUNS[name]]
    codec = [d["model"]["codec"] for d in docs if "codec" in d.get("model", {})][-1]
    root, codec_path = stand_ins[stand_in_key(name, codec)]
    for doc in docs:
        replace(doc, "data.init_args.root", str(root))
        replace(doc, "model.codec_options.path", str(codec_path))
        replace(doc, "trainer.default_root_dir", str(out_dir / "run"))
    if edit is not None:
        edit(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    args = []
    for i, (path, doc) in enumerate(zip(RUNS[name], docs, strict=True)):
        local = out_dir / f"{i}_{path.name}"
        local.write_text(yaml.safe_dump(doc, sort_keys=False))
        args += ["--config", str(local)]
    return args


def instantiate(args: list[str]) -> LinaCLI:
    """The CLI's model, data module and callbacks, without a Trainer (the recipes name 32 GPUs):
    ``cli.trainer`` is the parsed trainer section with its logger and callbacks instantiated."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lina"])  # LightningCLI warns when pytest's own arguments are there too
        patch.setattr(
            LinaCLI, "instantiate_trainer", lambda self, **kw: self._get(self.config_init, "trainer")
        )
        return build_cli(args, run=False)


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def composed(stand_ins, tmp_path_factory):
    """``composed(name)``: the instantiated CLI of a run config (once per module), generator on meta."""
    cache = {}

    def get(name: str) -> LinaCLI:
        if name not in cache:
            cli = instantiate(localize(name, stand_ins, tmp_path_factory.mktemp(name.replace("/", "_"))))
            with torch.device("meta"):
                cli.model.configure_model()
            cache[name] = cli
        return cache[name]

    return get


# ---------------------------------------------------------------------------------------------------------
# every config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STRATEGIES, ids=lambda p: p.stem)
def test_strategy_configs_compose_with_a_run(path, stand_ins, tmp_path):
    """Each strategy file parses on top of a run and sets the strategy (2-process fits of ddp and fsdp2
    run in test_training_cli.py; DeepSpeed needs CUDA)."""
    cli = instantiate(localize("c2i/demo", stand_ins, tmp_path) + ["--config", str(path)])
    strategy = cli.trainer.strategy
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    expected = {"single": "auto", "ddp": "DDPStrategy", "fsdp2": "FSDP2Strategy"}
    assert name == expected.get(path.stem, path.stem)
    assert cli.model.hparams.generator == "lina_c2i_demo"  # the run's model is untouched


@pytest.mark.parametrize("name", sorted(RUNS))
def test_config_builds_its_model_and_data(name, composed, stand_ins, tmp_path):
    cli = composed(name)
    module, data = cli.model, cli.datamodule
    hp = module.hparams
    # the preset's architecture: the codec's token shape and the data's class count are the preset's own
    if name in LINA_RECIPES or name in LASAD_CFG or name in T2I_STAGES:
        with torch.device("meta"):
            bare = create_model(hp.generator)
        assert parameters(module.generator) == pytest.approx(parameters(bare), rel=0.01)  # + KV gates
        assert parameters(bare) == pytest.approx(PAPER_PARAMETERS[hp.generator], rel=0.01)
    # the data module reads the stand-in and its batches become the generator's tokens
    batch = next(iter(data.val_dataloader()))
    tokens = module.codec.batch_tokens(batch["latent"])
    assert tokens.shape[1] == math.prod(module.generator.config.grid)
    assert tuple(module.generator.config.grid) == tuple(module.grid)
    # the run directory holds the logs and the checkpoints
    run_dir = cli.config.trainer.default_root_dir
    assert Path(cli.trainer.logger.log_dir) == Path(run_dir, "tensorboard")
    (checkpoint,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "ModelCheckpoint"]
    assert Path(checkpoint.dirpath) == Path(run_dir, "checkpoints").resolve()
    if cli.config.trainer.accelerator == "cpu":  # runs here: build it for real and take a loss
        real = instantiate(localize(name, stand_ins, tmp_path))
        real.model.configure_model()
        loss = real.model.loss(next(iter(real.datamodule.val_dataloader())))
        assert torch.isfinite(loss)


@pytest.mark.parametrize(("name", "field"), [("c2i/demo", "decoder_depth"), ("raster/demo", "depth")])
def test_a_misspelt_generator_option_names_the_valid_fields(name, field, stand_ins, tmp_path):
    def misspell(docs):
        docs[-1]["model"].setdefault("generator_options", {})["deapth"] = 3

    with pytest.raises(ValueError, match=rf"'deapth'.* fields are .*\b{field}\b"):
        cli = instantiate(localize(name, stand_ins, tmp_path, edit=misspell))
        with torch.device("meta"):
            cli.model.configure_model()


# ---------------------------------------------------------------------------------------------------------
# the paper recipes
# ---------------------------------------------------------------------------------------------------------


def callbacks(cli: LinaCLI, kind: type) -> list:
    return [c for c in cli.trainer.callbacks if isinstance(c, kind)]


def global_batch(cli: LinaCLI) -> int:
    return cli.datamodule.batch_size * cli.trainer.devices * cli.trainer.num_nodes


@pytest.mark.parametrize("name", sorted(LINA_RECIPES))
def test_lina_recipes_follow_the_reference(name, composed):
    """reference/lina.md §4: AdamW lr 8e-4, wd 0.02, 10k warm-up then constant, EMA 0.99 every 100 steps,
    bf16, 32 GPUs; 64 AR steps, 25 Euler steps, CFG ramped from 1."""
    cli = composed(name)
    hp = cli.model.hparams
    assert hp.generator == "lina_c2i_" + name.split("/")[1].removeprefix("lina_")
    assert (hp.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule) == (8e-4, 0.02, 10000, "constant")
    assert (tuple(hp.betas), hp.decay_biases) == ((0.9, 0.95), True)
    (ema,) = callbacks(cli, EMA)
    assert (ema.decay, ema.every_n_steps) == (0.99, 100)
    assert cli.trainer.precision == "bf16-mixed" and cli.trainer.gradient_clip_val is None
    assert global_batch(cli) == LINA_RECIPES[name] * 32
    sampling = cli.model.default_sampling
    assert (sampling.steps, sampling.flow_steps, sampling.cfg, sampling.cfg_schedule) == (
        64,
        25,
        LINA_CFG[name],
        "linear",
    )
    assert cli.model.codec.describe()["name"] == "diffusers" and cli.datamodule.latent_scale == 0.2325
    assert len(callbacks(cli, SampleGrid)) == 1


@pytest.mark.parametrize("name", sorted(LASAD_CFG))
def test_lasad_recipes_follow_the_reference(name, composed):
    """reference/lasad.md §3.3 (LlamaGen's train_c2i.py): AdamW (0.9, 0.95) lr 1e-4 constant, no warm-up,
    wd 0.05 on ≥2-D weights only, clip 1.0, bf16, 300 epochs, no EMA, global batch 256; CFG 2.0 (B, L) or
    1.75 (XL, XXL) on logits."""
    cli = composed(name)
    hp = cli.model.hparams
    assert hp.generator == name.split("/")[1] and hp.codec == "llamagen_vq"
    assert (hp.lr, hp.weight_decay, tuple(hp.betas), hp.decay_biases) == (1e-4, 0.05, (0.9, 0.95), False)
    assert (hp.warmup_steps, hp.lr_schedule) == (0, "constant")
    assert not callbacks(cli, EMA)
    trainer = cli.trainer
    assert (trainer.precision, trainer.gradient_clip_val, trainer.max_epochs) == ("bf16-mixed", 1.0, 300)
    assert global_batch(cli) == 256
    assert cli.model.default_sampling.cfg == LASAD_CFG[name]
    assert len(callbacks(cli, SampleGrid)) == 1


@pytest.mark.parametrize("name", sorted(T2I_STAGES))
def test_t2i_curriculum_follows_the_reference(name, composed):
    """reference/lina.md §3.6, §4.2, §5.4: 256 → 512 → 1024 px, each stage from the previous one's EMA,
    48 GPUs, lr 2e-4 / 1e-4 / 5e-5, EMA 0.99 every 100 steps, bf16; 128 AR steps, 25 Euler, constant CFG 7."""
    grid, per_gpu, lr, init_from = T2I_STAGES[name]
    cli = composed(name)
    hp = cli.model.hparams
    assert hp.generator == "lina_t2i_d48w1536" and tuple(cli.model.generator.config.grid) == grid
    assert cli.model.generator.config.cond_grid == (grid[0] // 2, grid[1] // 2)
    assert (hp.lr, hp.warmup_steps, hp.init_from) == (lr, 10000, init_from)
    assert global_batch(cli) == per_gpu * 48
    (ema,) = callbacks(cli, EMA)
    assert (ema.decay, ema.every_n_steps) == (0.99, 100)
    sampling = cli.model.default_sampling
    assert (sampling.steps, sampling.flow_steps, sampling.cfg, sampling.cfg_schedule) == (
        128,
        25,
        7.0,
        "constant",
    )
    assert cli.datamodule.condition == "text" and cli.trainer.precision == "bf16-mixed"
