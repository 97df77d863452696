"""Every shipped config parses against the real classes (no instantiation: paths are cluster paths)."""

from pathlib import Path

import pytest
import yaml

from lina_pl.lightning.cli import build_cli
from lina_pl.models import PRESETS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["model"] in PRESETS


def test_paper_recipes_follow_the_reference():
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS if p.stem.startswith("lina_d48")}
    assert set(recipes) == {"lina_d48w768", "lina_d48w1024", "lina_d48w1536"}
    per_gpu = {"lina_d48w768": 64, "lina_d48w1024": 48, "lina_d48w1536": 24}
    for name, cfg in recipes.items():
        model = cfg["model"]["init_args"]
        assert (model["lr"], model["weight_decay"], model["warmup_steps"]) == (8e-4, 0.02, 10000)
        assert (model["ema_decay"], model["ema_interval"]) == (0.99, 100)
        assert cfg["trainer"]["precision"] == "bf16-mixed"
        global_batch = (
            cfg["data"]["init_args"]["batch_size"] * cfg["trainer"]["devices"] * cfg["trainer"]["num_nodes"]
        )
        assert global_batch == per_gpu[name] * 32


def test_lasad_recipes_follow_the_reference():
    recipes = {p.stem: yaml.safe_load(p.read_text()) for p in CONFIGS if p.parent.name == "lasad"}
    assert {"lasad_b", "lasad_l", "lasad_xl", "lasad_xxl"} < set(recipes)
    cfg_scale = {"lasad_b": 2.0, "lasad_l": 2.0, "lasad_xl": 1.75, "lasad_xxl": 1.75}
    for name, scale in cfg_scale.items():
        cfg = recipes[name]
        model = cfg["model"]["init_args"]
        assert model["model"] == name and model["tokenizer"] == "llamagen_vq"
        assert (model["lr"], model["weight_decay"], model["betas"]) == (1e-4, 0.05, [0.9, 0.95])
        assert (model["warmup_steps"], model["lr_schedule"], model["ema_decay"]) == (0, "constant", None)
        assert model["sample_cfg"] == scale
        trainer = cfg["trainer"]
        assert (trainer["precision"], trainer["gradient_clip_val"], trainer["max_epochs"]) == (
            "bf16-mixed",
            1.0,
            300,
        )
        global_batch = cfg["data"]["init_args"]["batch_size"] * trainer["devices"] * trainer["num_nodes"]
        assert global_batch == 256
