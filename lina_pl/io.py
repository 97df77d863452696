"""Files a later run trusts: written atomically, read with one clear error.

A crash, a kill or a full disk never leaves a half-written output behind (:func:`atomic_write`), and a file
that is not what it should be (a text file, a truncated checkpoint) is one line naming it
(:func:`load_torch`), not a pickle or zip error from deep inside torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: the first bytes of a zip archive, which every torch.save file since torch 1.6 is
ZIP_MAGIC = b"PK\x03\x04"


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it over
    ``path``: readers see the old file or the complete new one, never a truncated one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp)  # the data on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp makes files private; outputs are as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # the rename itself durable; some network filesystems refuse this
        _fsync(path.parent)
    return path


def load_torch(path: str | Path, what: str = "checkpoint", **kwargs: Any) -> Any:
    """``torch.load(path)`` on the CPU; a missing, foreign or truncated file is one error naming it.

    ``kwargs`` go to ``torch.load`` (``mmap=True`` reads only the tensors that are used).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except Exception as err:  # torch reports bad files as pickle, zip, OS or runtime errors
        with open(path, "rb") as f:
            zipped = f.read(len(ZIP_MAGIC)) == ZIP_MAGIC
        if zipped:  # torch's zip errors go on for sentences; the first one says what broke
            cause = str(err).strip().split(". ")[0]
            problem = f"cannot be read ({type(err).__name__}: {cause}): truncated or corrupt, e.g. a cut copy"
        else:
            problem = "is not a torch file (a checkpoint is a zip archive written by torch.save)"
        raise ValueError(f"{what} {path} {problem}; give a complete file written by lina_pl") from err


def save_npz(path: str | Path, **arrays: np.ndarray) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """uint8 ``[H, W, C]`` (C = 1 or 3) to PNG."""
    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
