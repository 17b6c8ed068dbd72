"""Instance segmentations in COCO's three forms (polygons, uncompressed RLE, compressed RLE).

Reading and writing go through pycocotools (``frPyObjects``, ``merge``, ``decode``, ``encode``), as
its ``annToMask`` / the lvis API's ``ann_to_mask`` do, so a mask here is the mask the official
evaluators see. What pycocotools does not do is say *why* a segmentation is unusable: it reads a
polygon of two points as a box, and stops on a bad RLE with "Invalid RLE mask representation".
:func:`segmentation_problem` checks a segmentation against its image's size first, so that every
reader can refuse bad input with one line naming the record.
"""

from __future__ import annotations

import warnings

import numpy as np
import pycocotools.mask as mask_utils

from ovd.data.validate import is_int, is_number

MASK_THRESHOLD = 0.5  # torchvision's Mask R-CNN convention: a pixel is in the mask at probability >= 0.5


def rle_string_counts(s: str) -> list[int] | None:
    """The run lengths of a compressed RLE string, or None if it is malformed.

    Hand-written (pycocotools' ``rleFrString`` in Python) because pycocotools exposes the counts of
    a compressed RLE only by decoding the whole mask: checking a file's RLEs up front would then
    cost a full-image buffer per annotation."""
    counts: list[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None  # the string ends inside a number
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def segmentation_problem(seg, height: int | None, width: int | None) -> str | None:
    """What is wrong with ``seg`` as the segmentation of an object in a ``height`` x ``width``
    image, in words for an error message; None when it is usable.

    Polygons: a non-empty list of ``[x1, y1, x2, y2, ...]``, each at least 3 points of finite
    numbers. RLE: ``{"size": [height, width], "counts": ...}`` — the image's size, and run lengths
    (a list, or pycocotools' compressed string) that cover exactly height x width pixels."""
    if isinstance(seg, list):
        if not seg:
            return "empty polygon list"
        for k, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(is_number(v) for v in poly):
                return f"polygon {k} must be a list of finite numbers [x1, y1, x2, y2, ...], got {poly!r:.60}"
            if len(poly) % 2:
                return f"polygon {k} has an odd number of coordinates ({len(poly)})"
            if len(poly) < 6:
                return f"polygon {k} has {len(poly) // 2} point(s); a polygon needs at least 3"
        if height is None or width is None:
            return "the image has no 'width' / 'height' to rasterise its polygons at"
        return None
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) and v > 0 for v in size)):
            return f"RLE 'size' must be [height, width], got {size!r:.40}"
        if height is not None and width is not None and size != [height, width]:
            return f"RLE size {size} is not the image's [height, width] [{height}, {width}]"
        if isinstance(counts, list):
            if not all(is_int(c) and c >= 0 for c in counts):
                return "uncompressed RLE 'counts' must be non-negative integers"
        elif isinstance(counts, str):
            counts = rle_string_counts(counts)
            if counts is None or any(c < 0 for c in counts):
                return "compressed RLE 'counts' is not a valid RLE string"
        else:
            return "RLE 'counts' must be a list of integers (uncompressed) or a string (compressed)"
        if sum(counts) != size[0] * size[1]:
            return f"RLE counts cover {sum(counts)} pixels, not height x width = {size[0] * size[1]}"
        return None
    return f"expected polygons [[x1, y1, ...], ...] or an RLE {{'size', 'counts'}}, got {type(seg).__name__}"


def to_rle(seg, height: int, width: int) -> dict:
    """A checked segmentation as one compressed RLE (pycocotools' ``annToRLE``)."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return {"size": seg["size"], "counts": seg["counts"].encode("ascii")}


def decode(seg, height: int, width: int) -> np.ndarray:
    """A checked segmentation as a (height, width) uint8 mask of 0 / 1 (pycocotools' ``annToMask``)."""
    with warnings.catch_warnings():  # pycocotools 2.0.11 under numpy 2: a DeprecationWarning on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(to_rle(seg, height, width))


def encode(masks) -> list[dict]:
    """(N, H, W) boolean masks (numpy or torch) → N compressed RLEs as JSON objects (``counts`` a
    string), the COCO results format."""
    arr = np.asarray(masks.cpu() if hasattr(masks, "cpu") else masks, dtype=np.uint8)
    if arr.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {arr.shape}")
    if len(arr) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def compressed(seg, height: int, width: int) -> dict:
    """A checked segmentation as a compressed RLE JSON object (the form results files hold)."""
    r = to_rle(seg, height, width)
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
