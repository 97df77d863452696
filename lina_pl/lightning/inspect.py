"""What ``notebooks/inspect_samples.ipynb`` shows, as tested functions, so the notebook stays a thin script.

Samples (grids per class, a guidance sweep), LINA's generation order, the learned locality of LINA's decoder
(KV-gate maps, depthwise-conv kernels), LASAD's decay pattern over the token grid, and a demo checkpoint to
look at when none is given. Plots are matplotlib ``Figure`` objects (no pyplot state), which a notebook
displays as the value of a cell; matplotlib is imported only by the plotting functions.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn

from lina_pl.lightning.images import make_grid, to_uint8_nhwc
from lina_pl.lightning.module import GeneratorModule
from lina_pl.models.raster import RasterGenerator
from lina_pl.nn.attention import LasadAttention
from lina_pl.nn.locality import DepthwiseConvGrid, KVGate

#: the digits demo whose config ``train_demo`` shrinks (the repository's, beside the package)
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "c2i" / "demo.yaml"


def train_demo(
    out_dir: str | Path, steps: int, *, generator: str = "lina_c2i_demo", resolution: int = 16
) -> Path:
    """Train a small LINA on digits through ``lina fit`` (LightningCLI) and return its ``last.ckpt``.

    The demo config with ``steps`` optimizer steps in one epoch (validated and checkpointed at its end), a
    scalar logged every step, no FID evaluation, and an EMA short enough for the run (it starts from the
    initial weights, whose share at the end stays below e⁻⁵); ``out_dir`` gets the digits shards (built
    when missing), the composed ``config.yaml`` (rerun it with ``lina fit --config``) and the run ``run/``,
    which replaces an earlier one (its event files would otherwise merge into this run's scalars).
    """
    from lina_pl.data.build import build
    from lina_pl.data.shards import MANIFEST
    from lina_pl.data.sources import DigitsSource
    from lina_pl.lightning.cli import build_cli

    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    out_dir = Path(out_dir)
    shards = out_dir / f"digits{resolution}"
    if not (shards / MANIFEST).is_file():
        build(DigitsSource(resolution), shards, overwrite=True)
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    trainer = config["trainer"]
    trainer.update(
        max_epochs=1, check_val_every_n_epoch=1, log_every_n_steps=1, default_root_dir=str(out_dir / "run")
    )
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith(".Evaluation")]
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith(".EMA"):  # decay^steps ≤ e⁻⁵
            args = callback["init_args"]
            args["decay"] = max(0.0, min(args["decay"], 1 - 5 / steps))
    config["model"]["generator"] = generator
    data = config["data"]["init_args"]
    data.update(root=str(shards), num_workers=0, samples_per_epoch=steps * data["batch_size"])
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(out_dir / "run", ignore_errors=True)
    build_cli(["fit", "--config", str(path)])
    return out_dir / "run" / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------------------


def sample_grid(
    module: GeneratorModule, values: Sequence[Any], per_value: int, *, seed: int = 0, **options: Any
) -> np.ndarray:
    """A uint8 grid with one row per condition value (class or prompt), ``per_value`` samples each, drawn
    with the module's sampling options changed by ``options`` (``cfg=4``, ``steps=8``)."""
    batch = module.condition.display_batch(values, per_value)
    images = module.sample_images(batch, module.sampling_options(**options), seed=seed)
    return make_grid(to_uint8_nhwc(images), nrow=per_value, row_labels=[str(v) for v in values])


def cfg_sweep(
    module: GeneratorModule, values: Sequence[Any], scales: Sequence[float], *, seed: int = 0, **options: Any
) -> np.ndarray:
    """A uint8 grid with one row per guidance scale and one column per condition value; every row has the
    same seed, hence the same orders and noise, so the rows differ by the guidance alone."""
    batch = module.condition.display_batch(values, 1)
    rows = [
        to_uint8_nhwc(module.sample_images(batch, module.sampling_options(**options, cfg=s), seed=seed))
        for s in scales
    ]
    return make_grid(np.concatenate(rows), nrow=len(values), row_labels=[f"cfg {s:g}" for s in scales])


def sequence_to_grid(x: Tensor, grid: Sequence[int]) -> Tensor:
    """``[..., H·W]`` values of tokens in raster order -> ``[..., H, W]`` on the token grid."""
    h, w = grid
    if x.shape[-1] != h * w:
        raise ValueError(f"expected {h}×{w} = {h * w} tokens in the last dimension, got {tuple(x.shape)}")
    return x.unflatten(-1, (h, w))


def generation_order(
    module: GeneratorModule, values: Sequence[Any], *, seed: int = 0, **options: Any
) -> tuple[Tensor, Tensor]:
    """Samples of a LINA module for ``values`` (one each) and, from the same ``generate`` call, the AR step
    at which each token was revealed: ``(images [N, C, H, W], steps [N, h, w])`` on the token grid."""
    batch = module.condition.display_batch(values, 1)
    order = torch.full((len(values), module.grid[0] * module.grid[1]), -1, dtype=torch.long)

    def record(step: int, revealed: Tensor) -> None:
        order.scatter_(1, revealed.cpu(), step)

    images = module.sample_images(batch, module.sampling_options(**options), seed=seed, on_step=record)
    return images.cpu(), sequence_to_grid(order, module.grid)


def reveal_frames(images: Tensor, order: Tensor, steps: Sequence[int]) -> Tensor:
    """``images [N, C, H, W]`` as they stand after each of ``steps``: the pixels of tokens revealed later
    (``order [N, h, w]`` from :func:`generation_order`) are grey (0). Returns ``[N, len(steps), C, H, W]``."""
    (h, w), (gh, gw) = images.shape[-2:], order.shape[-2:]
    pixels = order.repeat_interleave(h // gh, dim=-2).repeat_interleave(w // gw, dim=-1)[:, None]
    frames = [images.masked_fill(pixels.to(images.device) > k, 0.0) for k in steps]
    return torch.stack(frames, dim=1)


# ---------------------------------------------------------------------------------------------------------
# LINA's locality: KV gates and depthwise convolutions
# ---------------------------------------------------------------------------------------------------------


def kv_gate_maps(model: nn.Module) -> dict[str, Tensor]:
    """Every KV gate's learned scales on the image tokens, ``[heads, H, W]`` per key and value gate, named
    ``<gate module>.key`` / ``.value`` (condition tokens are left out; either gate form)."""
    maps = {}
    for name, gate in model.named_modules():
        if isinstance(gate, KVGate):
            for kind, scales in zip(("key", "value"), gate(gate.n_cond, gate.grid_hw), strict=True):
                per_head = scales.detach()[0, gate.n_cond :, :, 0].t()  # [1, N, H, 1] -> [H, image tokens]
                maps[f"{name}.{kind}"] = sequence_to_grid(per_head.float().cpu(), gate.grid_hw)
    return maps


def dwconv_kernels(model: nn.Module) -> dict[str, Tensor]:
    """Every depthwise conv's kernels over the token grid, ``[channels, k, k]``, by module name."""
    return {
        name: conv.conv.weight.detach()[:, 0].float().cpu()
        for name, conv in model.named_modules()
        if isinstance(conv, DepthwiseConvGrid)
    }


def tile(maps: Tensor, ncols: int, pad: int = 1) -> Tensor:
    """``[N, h, w]`` maps side by side in one ``[rows·(h+pad)−pad, ncols·(w+pad)−pad]`` image, NaN between
    them (blank in a plot): many small kernels in one picture."""
    n, h, w = maps.shape
    rows = math.ceil(n / ncols)
    out = torch.full((rows * (h + pad) - pad, ncols * (w + pad) - pad), float("nan"))
    for i, m in enumerate(maps):
        r, c = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = m
    return out


# ---------------------------------------------------------------------------------------------------------
# LASAD's decay
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def lasad_log_decays(model: RasterGenerator, codes: Tensor, condition: Mapping[str, Any]) -> Tensor:
    """Each LASAD layer's log-decay (≤ 0) when each token of ``codes [B, N]`` enters the state, after the
    spatial-aware mask, averaged over heads and key channels (the log of a geometric mean decay):
    ``[layers, B, H, W]`` on the token grid. One teacher-forced pass over ``[condition, all N codes]``.

    Why averaged: a layer has heads × key channels decays per token; their mean shows where the layer
    forgets, and the spatial mask (a decay of exactly 1, log 0, once per raster row) shows as a column.
    """
    layers = [m for m in model.modules() if isinstance(m, LasadAttention)]
    if not layers:
        raise ValueError("the model has no LASAD layers (mixer 'lasad')")
    found: list[Tensor] = []

    def capture(attn: LasadAttention, args: tuple, kwargs: dict) -> None:
        found.append(attn.log_decays(args[0], 0, **kwargs)[1].mean(dim=(-2, -1)))

    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in layers]
    was_training = model.training
    model.eval()
    try:
        prefix = model.condition(condition)
        model.step(torch.cat([prefix, model.tok_embeddings(codes)], dim=1), None, 0, keep_state=False)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    tokens = torch.stack(found)[:, :, prefix.shape[1] :]
    return sequence_to_grid(tokens.float().cpu(), model.config.grid)


def state_weights(log_decays: Tensor, query: tuple[int, int]) -> Tensor:
    """How much of each earlier token the recurrent state still holds once the token at ``query`` (row,
    column) has entered it: ``exp(Σ log λ)`` over the tokens after it, in (0, 1] (1 at ``query``, about 0
    across a ``reset`` decay), 0 for the tokens after ``query``. ``log_decays [..., H, W]`` as from
    :func:`lasad_log_decays`."""
    h, w = log_decays.shape[-2:]
    t = query[0] * w + query[1]
    if not (0 <= query[0] < h and 0 <= query[1] < w):
        raise ValueError(f"query {tuple(query)} lies outside the {h}×{w} grid")
    cumulative = log_decays.flatten(-2).double().cumsum(-1)
    weights = (cumulative[..., t : t + 1] - cumulative).exp()
    weights[..., t + 1 :] = 0.0
    return sequence_to_grid(weights.to(log_decays.dtype), (h, w))


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------


def plot_image(image: np.ndarray, title: str = ""):
    """A uint8 ``[H, W, C]`` image (a sample grid) as a figure, at one screen pixel per image pixel or
    more."""
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    fig = Figure(figsize=(max(width / 100, 4), max(height / 100, 4) + 0.4), layout="constrained")
    ax = fig.subplots()
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title)
    ax.set_axis_off()
    return fig


def plot_maps(
    maps: Sequence[Tensor] | Tensor,
    titles: Sequence[str] | None = None,
    *,
    ncols: int = 4,
    cmap: str = "viridis",
    symmetric: bool = False,
    label: str = "",
    title: str = "",
):
    """Heat maps on one colour scale (centred on 0 when ``symmetric``) with one colour bar called
    ``label``: gate maps, kernels, decays, generation orders."""
    from matplotlib.figure import Figure

    arrays = [np.asarray(m, dtype=np.float64) for m in maps]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    low, high = float(finite.min()), float(finite.max())
    if symmetric:
        high = max(abs(low), abs(high))
        low = -high
    ncols = min(ncols, len(arrays))
    rows = math.ceil(len(arrays) / ncols)
    width = 2.0 * min(max(arrays[0].shape[1] / arrays[0].shape[0], 1.0), 4.0)  # wide tiles get wide panels
    fig = Figure(figsize=(width * ncols + 1.2, 2.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(arrays):
            image = ax.imshow(arrays[i], cmap=cmap, vmin=low, vmax=high)
            ax.set_title(titles[i] if titles else "", fontsize=8)
    fig.colorbar(image, ax=axes, label=label, shrink=0.8)
    fig.suptitle(title)
    return fig


def plot_scalars(scalars: Mapping[str, Sequence[tuple[int, float]]], ncols: int = 3):
    """One line plot per TensorBoard tag (as from :func:`lina_pl.lightning.scalars.read_scalars`) against
    the step."""
    from matplotlib.figure import Figure

    tags = sorted(scalars)
    if not tags:
        raise ValueError("no scalars to plot")
    ncols = min(ncols, len(tags))
    rows = math.ceil(len(tags) / ncols)
    fig = Figure(figsize=(4 * ncols, 2.8 * rows), layout="constrained")
    axes = fig.subplots(rows, ncols, squeeze=False)
    for ax in axes.flat[len(tags) :]:
        ax.set_axis_off()
    for ax, tag in zip(axes.flat, tags, strict=False):
        steps, values = zip(*scalars[tag], strict=True)
        ax.plot(steps, values, marker="." if len(steps) < 30 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
    return fig
