"""Image reading with one clear error per bad file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ovd.errors import OvdError, describe

_GRAY16 = ("I;16", "I;16L", "I;16B", "I;16N")
_READ_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _bit_depth(im: Image.Image) -> int | None:
    """Bits per sample of an integer-mode ("I", "I;16…") image as stored in its file."""
    if im.mode in _GRAY16:
        return 16
    if im.mode == "I":
        if im.format == "PNG":  # older Pillow reads 16-bit grey PNGs as "I"
            return 16
        tags = getattr(im, "tag_v2", None)  # TIFF: BitsPerSample
        bits = tags.get(258) if tags is not None else None
        bits = bits[0] if isinstance(bits, tuple) else bits
        return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None
    return None


def pil_to_tensor(im: Image.Image, what: str = "image") -> torch.Tensor:
    """A PIL image of any common mode → (3, H, W) float tensor in [0, 1] (RGB).

    8-bit modes go through Pillow's conversion (grey replicated, palette looked up, alpha dropped,
    CMYK / YCbCr converted). 16-bit grey ("I;16", a 16-bit PNG) is scaled by its bit depth, v / 65535
    — Pillow's own ``convert("RGB")`` clips it at 255, i.e. an all-white image. Floating-point and
    unknown modes are refused."""
    mode = im.mode
    if mode in _GRAY16 or mode == "I":
        bits = _bit_depth(im)
        arr = np.asarray(im).astype(np.float64)
        if bits is None or (arr.size and (arr.min() < 0 or arr.max() > 2**bits - 1)):
            raise OvdError(
                f"cannot read {what}: {mode} integer pixels of unknown bit depth or outside it "
                f"(ovd reads 1-, 8- and 16-bit images)"
            )
        gray = torch.from_numpy(arr / (2**bits - 1)).float()
        return gray.unsqueeze(0).expand(3, -1, -1).contiguous()
    if mode in ("F", "I;32", "I;32B", "I;32L") or mode.startswith("F;"):
        raise OvdError(f"cannot read {what}: {mode} floating-point/32-bit pixels are not supported (use 8 or 16 bit)")
    if mode in ("P", "PA"):
        im = im.convert("RGBA")  # palette transparency: no warning, alpha dropped below like any other
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError:
            raise OvdError(f"cannot read {what}: image mode {mode} is not supported") from None
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def _pixels(im: Image.Image) -> str:
    return f"{im.size[0]}x{im.size[1]}"


def _open_checked(path: Path):
    """``Image.open`` with Pillow's decompression-bomb guard turned into a clear refusal: an image
    over ``Image.MAX_IMAGE_PIXELS`` (89 M pixels) is refused before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            size = _header_size(path)
            raise OvdError(
                f"image {path} is too large{f' ({size})' if size else ''}: over Pillow's limit of "
                f"{Image.MAX_IMAGE_PIXELS:,} pixels (a decompression bomb, or a damaged header)"
            ) from None


def _header_size(path: Path) -> str:
    """The WxH a file's header claims, read with the decompression-bomb guard off (header only)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            return _pixels(im)
    except Exception:  # only for the message
        return ""
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a (3, H, W) float tensor in [0, 1] (RGB); see :func:`pil_to_tensor`."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"image not found: {path}")
    try:
        with _open_checked(path) as im:
            return pil_to_tensor(im, f"image {path}")
    except _READ_ERRORS as e:
        raise OvdError(f"cannot read image {path}: {describe(e)}") from None


def _check_complete(im: Image.Image, path: Path) -> None:
    """Is the file whole? Without decoding where a cheaper test exists: a PNG's chunk checksums
    (``verify``); a JPEG's end-of-image marker near its end (decoded only when that is missing, as
    some writers pad after it). Other formats are decoded."""
    if im.format == "PNG":
        im.verify()
    elif im.format == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read()
        if b"\xff\xd9" not in tail:
            im.load()
    else:
        im.load()


def load_image_pil(path: str | os.PathLike) -> Image.Image:
    """:func:`load_image` as an 8-bit RGB PIL image (16-bit input rounded to 8 bits), for code that
    resizes with Pillow; the same checks and the same one-line errors."""
    return tensor_to_pil(load_image(path))


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """A (3, H, W) float image in [0, 1] as an 8-bit RGB PIL image (rounded, clamped)."""
    return Image.fromarray(x.detach().cpu().clamp(0, 1).mul(255).round_().to(torch.uint8).permute(1, 2, 0).numpy())


def check_images(items, where: str = "") -> int:
    """Cheap check of many image files before a long run uses them: each exists, its header opens
    with Pillow (no pixels decoded), it is not over the decompression-bomb limit, and its size
    matches the annotation's width/height where given. ``items``: (path, width, height) with
    width/height None when unknown; ``where`` ends the error's subject ("listed in train.json").
    One :class:`OvdError` naming the first bad files; returns the number checked."""
    bad: list[str] = []
    n = 0
    for path, width, height in items:
        n += 1
        if path is None:
            bad.append(f"image #{n}: no file name")
            continue
        path = Path(path)
        if not path.is_file():
            bad.append(f"image not found: {path}")
            continue
        try:
            with _open_checked(path) as im:
                size = im.size
                _check_complete(im, path)
        except OvdError as e:
            bad.append(str(e))
            continue
        except _READ_ERRORS as e:
            bad.append(f"cannot read image {path}: {describe(e, 80)}")
            continue
        if (width is not None and size[0] != width) or (height is not None and size[1] != height):
            bad.append(f"image {path} is {size[0]}x{size[1]}, its annotation says {width}x{height}")
    if bad:
        more = len(bad) - 3
        listing = "; ".join(bad[:3]) + (f"; and {more} more" if more > 0 else "")
        raise OvdError(f"{len(bad)} of {n} images{' ' + where if where else ''} cannot be used: {listing}")
    return n


def check_image_files(dataset) -> int:
    """:func:`check_images` over every image of a :class:`~ovd.data.coco.DetectionDataset`, so a
    corrupt or missing image stops a run at its start, not at the iteration that reaches it."""
    items = ((dataset.image_path(im), im.get("width"), im.get("height")) for im in dataset.images)
    return check_images(items, f"listed in {dataset.path}")
