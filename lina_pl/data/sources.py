"""Labelled image sources for class-to-image shards: sklearn digits (offline smoke data) and ImageNet folders.

A source is an index of ``(key, class_index)`` items whose images are loaded on demand, already square and at
the target resolution, so the shard writer can split by index before touching any pixels.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

#: file extensions read from an image folder (compared lower-case)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def image_to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """A uint8 image (PIL or ``H×W[×C]`` array) -> float32 ``[C, H, W]`` in ``[-1, 1]``, as codecs take."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageSource(ABC):
    """Keys, labels and class names of a labelled image collection; ``load(i)`` gives item ``i``'s image."""

    name: str
    #: directory the images come from (None for bundled data)
    root: Path | None = None
    keys: list[str]
    labels: list[int]
    class_names: list[str]
    resolution: int
    #: PIL mode of the loaded images: "L" (1 channel) or "RGB" (3 channels)
    mode: str

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def channels(self) -> int:
        return len(self.mode)

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Item ``index`` as a square ``resolution``² image in ``mode``."""

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[tuple[str, Image.Image, int]]:
        """Yield ``(key, image, class_index)`` for ``indices`` (all items by default), in that order."""
        for i in range(len(self)) if indices is None else indices:
            yield self.keys[i], self.load(i), self.labels[i]


class DigitsSource(ImageSource):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes), upsampled: real shapes, tiny size."""

    name = "digits"
    mode = "L"

    def __init__(self, resolution: int = 16):
        from sklearn.datasets import load_digits

        digits = load_digits()
        # values are ink counts 0..16; map them onto the full uint8 range
        self._pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.labels = [int(t) for t in digits.target]
        self.keys = [f"digits_{i:05d}" for i in range(len(self.labels))]
        self.class_names = [str(int(name)) for name in digits.target_names]
        self.resolution = resolution

    def load(self, index: int) -> Image.Image:
        image = Image.fromarray(self._pixels[index])
        return image.resize((self.resolution, self.resolution), Image.Resampling.BILINEAR)


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """Largest centred square, resized (bicubic) to ``resolution``², so aspect ratios are never distorted."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = image.crop((left, top, left + side, top + side))
    return square.resize((resolution, resolution), Image.Resampling.BICUBIC)


class ImageFolderSource(ImageSource):
    """ImageNet layout ``root/<class_name>/<image>``; classes are the sub-folders sorted by name."""

    name = "image-folder"
    mode = "RGB"

    def __init__(self, root: str | Path, resolution: int = 256):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {root} does not exist (expected root/<class_name>/<images>)"
            )
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
        if not class_dirs:
            raise ValueError(
                f"image folder {root} has no class sub-folders (expected root/<class_name>/<images>)"
            )
        self.root = root
        self.resolution = resolution
        self.class_names = [d.name for d in class_dirs]
        self.paths: list[Path] = []
        self.labels = []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(
                    f"class folder {class_dir} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}"
                )
            self.paths += files
            self.labels += [label] * len(files)
        self.keys = _unique_keys([p.relative_to(root) for p in self.paths])

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            return center_crop_resize(image.convert("RGB"), self.resolution)


def _unique_keys(relative_paths: Sequence[Path]) -> list[str]:
    """webdataset keys from paths: no dots or slashes (they would split a sample), traceable to the file."""
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", str(p.with_suffix(""))) for p in relative_paths]
    seen: dict[str, Path] = {}
    for key, path in zip(keys, relative_paths, strict=True):
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} map to the same sample key {key!r}; rename one of them")
        seen[key] = path
    return keys


def create_source(name: str, root: str | None = None, resolution: int | None = None) -> ImageSource:
    """The source called ``name`` (``digits`` or ``image-folder``) at ``resolution`` (None: its default)."""
    kwargs = {} if resolution is None else {"resolution": resolution}
    if name == "digits":
        return DigitsSource(**kwargs)
    if name == "image-folder":
        if root is None:
            raise ValueError(
                "the image-folder source needs --root DIR (ImageNet layout: root/<class>/<images>)"
            )
        return ImageFolderSource(root, **kwargs)
    raise ValueError(f"unknown source {name!r}; choose digits or image-folder")
