"""Image reading with one clear error per bad file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ovd.errors import OvdError


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3, H, W) float tensor in [0, 1] (RGB)."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise OvdError(f"cannot read image {path}: {e.__class__.__name__}: {e}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
