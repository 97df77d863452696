"""The ``digits`` feature network: a small CNN trained on scikit-learn's real digits, for FID/KID/IS/P-R.

Why: Inception-v3 was trained on ImageNet photographs; on 16×16 grey digits its features say little and
its weights cannot be downloaded here. This network is trained, deterministically and in seconds on a CPU,
on the *train* digits of :func:`lina_pl.data.digit_scenes.digit_split` (the eval digits stay held out), and
cached (:func:`load_digits_net`). It classifies held-out real digits with about 98% accuracy.

Input: any uint8 ``[N, C, H, W]`` the package makes. Colour images become grey by taking the brightest
channel (a digit in a digit scene is one palette colour: its brightness, not its luminance, is the ink —
a blue digit would be almost black in luminance), then every image is resized (bilinear, antialiased) to
16×16, the size of the digits demo. Outputs: ``pool`` = the 64 activations of the penultimate layer
(scaled by one constant fixed after training: their mean square over the training digits is 1),
``logits`` = the 10 class scores, ``spatial`` = the first :data:`SPATIAL_CHANNELS` channels of the 8×8
mid-level map, 2·8·8 = 128 values (as sFID takes the first 7 of 192 channels of Inception's 17×17
``mixed_6/conv`` map).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lina_pl.io import atomic_write
from lina_pl.metrics.features import FeatureNetwork, Features, cache_dir

#: side of the images the network sees
SIZE = 16
#: width of the penultimate layer: the FID/KID/precision-recall features
NUM_FEATURES = 64
#: channels of the 8×8 mid-level map kept as sFID features
SPATIAL_CHANNELS = 2
#: the training recipe (part of this file, whose hash keys the cached weights)
TRAIN_CONFIG = {"seed": 0, "epochs": 12, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "shift": 1}


class DigitsNet(FeatureNetwork):
    """conv(16)·pool → conv(32)·pool → linear(64) → linear(10), ReLU after each but the last."""

    name = "digits"

    def __init__(self, key: str = "untrained"):
        super().__init__()
        self.key = key
        self.num_features = NUM_FEATURES
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * (SIZE // 4) ** 2, NUM_FEATURES)
        self.classifier = nn.Linear(NUM_FEATURES, 10)
        # set after training so that the features' mean square over the training digits is 1, the order
        # of magnitude of Inception's pool_3 features, which KID's polynomial kernel assumes
        self.register_buffer("scale", torch.ones(()))

    @staticmethod
    def prepare(images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` -> float ``[N, 1, 16, 16]`` in [-1, 1] (brightest channel, resized)."""
        x = images.float().amax(dim=1, keepdim=True) / 255.0
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x * 2 - 1

    def _forward(self, x: Tensor) -> Features:
        mid = F.max_pool2d(F.relu(self.conv1(x)), 2)  # [N, 16, 8, 8]
        hidden = F.relu(self.hidden(F.max_pool2d(F.relu(self.conv2(mid)), 2).flatten(1)))
        return Features(hidden * self.scale, self.classifier(hidden), mid[:, :SPATIAL_CHANNELS].flatten(1))

    def forward(self, images: Tensor) -> Features:
        return self._forward(self.prepare(images))


def _training_digits() -> tuple[Tensor, Tensor]:
    """The train digits exactly as the digits shards hold them (uint8 ``[N, 1, 16, 16]``) and their labels."""
    from lina_pl.data.digit_scenes import digit_split
    from lina_pl.data.sources import DigitsSource

    idx = digit_split()["train"]
    source = DigitsSource(resolution=SIZE)
    pixels = np.stack([np.array(source.load(int(i))) for i in idx])
    return torch.from_numpy(pixels).unsqueeze(1), torch.from_numpy(np.asarray(source.labels)[idx])


def _shift(x: Tensor, pixels: int, generator: torch.Generator) -> Tensor:
    """Translate each image by up to ``pixels`` in each direction (black padding): the only augmentation."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, value=-1.0)  # -1: the black background
    offsets = torch.randint(0, 2 * pixels + 1, (2, len(x)), generator=generator)
    out = torch.empty_like(x)
    for dy, dx in offsets.unique(dim=1).T.tolist():
        sel = (offsets[0] == dy) & (offsets[1] == dx)
        out[sel] = padded[sel, :, dy : dy + h, dx : dx + w]
    return out


def train_digits_net(key: str = "untrained") -> DigitsNet:
    """Train the network from scratch (a few seconds on one CPU core); the same weights on every call.

    Runs on one thread with its own random streams, so it neither depends on nor disturbs the caller's
    global seed or thread count.
    """
    config = TRAIN_CONFIG
    images, labels = _training_digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order: the same weights whatever the machine's core count
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config["seed"])
            net = DigitsNet(key)
            generator = torch.Generator().manual_seed(config["seed"])
            x = DigitsNet.prepare(images)
            optimizer = torch.optim.AdamW(
                net.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
            )
            steps = config["epochs"] * -(-len(x) // config["batch_size"])
            schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config["lr"], total_steps=steps)
            for _ in range(config["epochs"]):
                order = torch.randperm(len(x), generator=generator)
                for i in range(0, len(x), config["batch_size"]):
                    batch = order[i : i + config["batch_size"]]
                    logits = net._forward(_shift(x[batch], config["shift"], generator)).logits
                    loss = F.cross_entropy(logits, labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            with torch.no_grad():
                net.scale.copy_(net._forward(x).pool.square().mean().rsqrt())
    finally:
        torch.set_num_threads(threads)
    return net.eval().requires_grad_(False)


def weights_key() -> str:
    """Hash of this file (the network, its training code and :data:`TRAIN_CONFIG`): any change of it trains
    and caches a new network, and keys new reference statistics."""
    return f"digits-{hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]}"


def load_digits_net() -> DigitsNet:
    """The trained network from :func:`cache_dir`; trained and cached (atomically) when the cache has no
    file for the current :func:`weights_key`."""
    key = weights_key()
    path = cache_dir() / f"{key}.pt"
    if not path.is_file():
        net = train_digits_net(key=key)
        state_dict = net.state_dict()
        atomic_write(path, lambda tmp: torch.save(state_dict, tmp))
        return net
    try:
        net = DigitsNet(key)
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # torch reports damaged files as pickle, zip or runtime errors
        raise ValueError(
            f"cached digits network {path} cannot be read ({err}); delete it to retrain"
        ) from err
    return net.eval().requires_grad_(False)
