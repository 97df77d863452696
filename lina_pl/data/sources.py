"""Image sources for shards: sklearn digits and ImageNet folders (class data), digit scenes and captioned
folders (text data).

A source is an index of ``(key, condition)`` items whose images are loaded on demand, already cropped and
resized to their size bucket, so the shard writer can split by index before touching any pixels. The
condition of an item is its class index (``condition == "class"``) or its caption (``"text"``).
"""

from __future__ import annotations

import math
import os
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
#: extension of the caption file next to an image (``cat.jpg`` -> ``cat.txt``)
CAPTION_EXTENSION = ".txt"

Size = tuple[int, int]


def image_to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """A uint8 image (PIL or ``H×W[×C]`` array) -> float32 ``[C, H, W]`` in ``[-1, 1]``, as codecs take."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def parse_size(text: str) -> Size:
    """``"224x288"`` -> ``(224, 288)`` (pixel height × width)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise ValueError(f"size {text!r} is not HxW with positive integers, e.g. 256x256 or 224x288")
    return int(match[1]), int(match[2])


def closest_size(width: int, height: int, sizes: Sequence[Size]) -> Size:
    """The bucket ``(H, W)`` whose aspect ratio is closest to the image's (in log ratio; first on ties)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def center_crop_resize(image: Image.Image, size: int | Size) -> Image.Image:
    """Largest centred crop of the target's aspect ratio, resized (bicubic) to ``size`` (a side, or
    ``(H, W)``), so aspect ratios are never distorted."""
    height, width = (size, size) if isinstance(size, int) else size
    iw, ih = image.size
    if iw * height > ih * width:  # wider than the target: crop the sides
        cw, ch = max(1, round(ih * width / height)), ih
    else:
        cw, ch = iw, max(1, round(iw * height / width))
    left, top = (iw - cw) // 2, (ih - ch) // 2
    crop = image.crop((left, top, left + cw, top + ch))
    return crop.resize((width, height), Image.Resampling.BICUBIC)


class ImageSource(ABC):
    """Keys and conditions of an image collection; ``load(i)`` gives item ``i``'s image at its bucket size.

    Class data (``condition == "class"``) has ``labels`` and ``class_names``; text data has ``captions`` (and
    no classes). ``sizes`` are the ``(H, W)`` pixel buckets an image may be resized to.
    """

    name: str
    #: directory the images come from (None for bundled or generated data)
    root: Path | None = None
    keys: list[str]
    condition: str = "class"
    labels: list[int] | None = None
    captions: list[str] | None = None
    class_names: list[str]
    sizes: list[Size]
    #: PIL mode of the loaded images: "L" (1 channel) or "RGB" (3 channels)
    mode: str

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def channels(self) -> int:
        return len(self.mode)

    @property
    def conditions(self) -> list:
        """Per item: the class index (class data) or the caption (text data)."""
        return self.labels if self.condition == "class" else self.captions

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Item ``index`` cropped and resized to one of ``sizes``, in ``mode``."""

    def fixed_split(self) -> dict[str, np.ndarray] | None:
        """Indices of the train and val items when the source defines its own split (else None: the
        builder splits by ``--val-fraction``)."""
        return None

    def samples(self, indices: Iterable[int] | None = None) -> Iterator[tuple[str, Image.Image, int | str]]:
        """Yield ``(key, image, class index or caption)`` for ``indices`` (all items by default), in order."""
        conditions = self.conditions
        for i in range(len(self)) if indices is None else indices:
            yield self.keys[i], self.load(i), conditions[i]


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
        self.sizes = [(resolution, resolution)]

    def load(self, index: int) -> Image.Image:
        image = Image.fromarray(self._pixels[index])
        return image.resize(self.sizes[0][::-1], Image.Resampling.BILINEAR)


class DigitScenesSource(ImageSource):
    """Digit scenes (:mod:`lina_pl.data.digit_scenes`): 32×32 RGB compositions of handwritten digits with
    GenEval-style captions. Its own split: ``train_size`` scenes of the train digits, and ``val_size``
    evaluation scenes of the held-out digits, whose captions are ``make_prompts(val_size, seed)``.

    The train scenes use seed ``seed + 1`` so that their layouts do not repeat the evaluation scenes'.
    ``resolution`` other than 32 resizes each scene (nearest neighbour for whole multiples, keeping the
    pixel blocks exact; bicubic otherwise).
    """

    name = "digit-scenes"
    mode = "RGB"

    def __init__(self, train_size: int = 20000, val_size: int = 1000, seed: int = 0, resolution: int = 32):
        from lina_pl.data import digit_scenes

        if train_size < 1 or val_size < 0:
            raise ValueError(f"--train-size must be ≥ 1 and --val-size ≥ 0, got {train_size} and {val_size}")
        self.class_names = []
        self.condition = "text"
        self.sizes = [(resolution, resolution)]
        self.train_size = train_size
        images, self.captions, self.keys = [], [], []
        for split, n, scene_seed in (("train", train_size, seed + 1), ("eval", val_size, seed)):
            for i, (image, caption) in enumerate(digit_scenes.scenes(split, n, scene_seed)):
                images.append(image)
                self.captions.append(caption)
                self.keys.append(f"scene_{split}_{i:06d}")
        self._pixels = np.stack(images)

    def fixed_split(self) -> dict[str, np.ndarray]:
        return {"train": np.arange(self.train_size), "val": np.arange(self.train_size, len(self))}

    def load(self, index: int) -> Image.Image:
        image = Image.fromarray(self._pixels[index])
        side = self.sizes[0][0]
        if side == image.width:
            return image
        nearest = side % image.width == 0
        return image.resize((side, side), Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC)


class ImageFolderSource(ImageSource):
    """An image folder, class data or captioned.

    Captioned: when any image under ``root`` (at any depth) has a sidecar ``<same name>.txt``, every image
    there is an item, its caption is that file (utf-8, stripped), and every image must have one. Otherwise
    ImageNet layout ``root/<class_name>/<image>``; classes are the sub-folders sorted by name.

    Each image is centre-cropped to the aspect ratio of the closest of ``sizes`` (default: the square
    ``resolution``) and resized to it.
    """

    name = "image-folder"
    mode = "RGB"

    def __init__(self, root: str | Path, resolution: int = 256, sizes: Sequence[Size] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(
                f"image folder {root} does not exist (expected root/<class_name>/<images>, "
                "or images with <name>.txt captions)"
            )
        self.root = root
        self.sizes = [tuple(s) for s in sizes] if sizes else [(resolution, resolution)]
        files = _files_under(root)
        images = sorted(p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS)
        if any(_caption_path(p) in files for p in images):
            self._init_captioned(images, files)
        else:
            self._init_classes(root)
        self.keys = _unique_keys([p.relative_to(root) for p in self.paths])

    def _init_captioned(self, images: list[Path], files: set[Path]) -> None:
        missing = [p for p in images if _caption_path(p) not in files]
        if missing:
            raise ValueError(
                f"{missing[0]} has no caption file {_caption_path(missing[0]).name}: in a captioned folder "
                f"every image needs one ({len(missing)} of {len(images)} images lack it)"
            )
        self.condition, self.class_names, self.paths, self.captions = "text", [], images, []
        for path in images:
            try:
                self.captions.append(_caption_path(path).read_text(encoding="utf-8").strip())
            except UnicodeDecodeError as exn:
                raise ValueError(f"caption file {_caption_path(path)} is not utf-8 text ({exn})") from exn

    def _init_classes(self, root: Path) -> None:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
        if not class_dirs:
            raise ValueError(
                f"image folder {root} has no class sub-folders (expected root/<class_name>/<images>) "
                "and no captioned images (<name>.txt next to <name>.jpg)"
            )
        self.class_names = [d.name for d in class_dirs]
        self.paths, self.labels = [], []
        for label, class_dir in enumerate(class_dirs):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(
                    f"class folder {class_dir} has no images with extensions {', '.join(IMAGE_EXTENSIONS)}"
                )
            self.paths += files
            self.labels += [label] * len(files)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as image:
            size = closest_size(image.width, image.height, self.sizes)
            return center_crop_resize(image.convert("RGB"), size)


def _caption_path(image_path: Path) -> Path:
    return image_path.with_suffix(CAPTION_EXTENSION)


def _files_under(root: Path) -> set[Path]:
    """Every file below ``root`` (one directory walk, so finding sidecar captions costs no extra stats)."""
    return {Path(d) / name for d, _, names in os.walk(root) for name in names}


def _unique_keys(relative_paths: Sequence[Path]) -> list[str]:
    """webdataset keys from paths: no dots or slashes (they would split a sample), traceable to the file."""
    keys = [re.sub(r"[^A-Za-z0-9_-]", "_", str(p.with_suffix(""))) for p in relative_paths]
    seen: dict[str, Path] = {}
    for key, path in zip(keys, relative_paths, strict=True):
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} map to the same sample key {key!r}; rename one of them")
        seen[key] = path
    return keys


def create_source(
    name: str,
    root: str | None = None,
    resolution: int | None = None,
    *,
    sizes: Sequence[Size] | None = None,
    train_size: int | None = None,
    val_size: int | None = None,
    seed: int = 0,
) -> ImageSource:
    """The source called ``name`` (``digits``, ``digit-scenes`` or ``image-folder``); None means its default.

    ``sizes`` (aspect buckets) is for image folders only; ``train_size``, ``val_size`` and ``seed`` make the
    digit scenes.
    """
    kwargs = {} if resolution is None else {"resolution": resolution}
    if sizes and name != "image-folder":
        raise ValueError("--sizes is only used with --source image-folder")
    if (train_size, val_size) != (None, None) and name != "digit-scenes":
        raise ValueError("--train-size and --val-size are only used with --source digit-scenes")
    if name == "digits":
        return DigitsSource(**kwargs)
    if name == "digit-scenes":
        counts = {k: v for k, v in (("train_size", train_size), ("val_size", val_size)) if v is not None}
        return DigitScenesSource(**counts, seed=seed, **kwargs)
    if name == "image-folder":
        if root is None:
            raise ValueError(
                "the image-folder source needs --root DIR (ImageNet layout: root/<class>/<images>)"
            )
        return ImageFolderSource(root, **kwargs, sizes=sizes)
    raise ValueError(f"unknown source {name!r}; choose digits, digit-scenes or image-folder")
