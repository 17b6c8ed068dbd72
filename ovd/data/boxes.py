"""Box format conversions between COCO JSON (``[x, y, w, h]``) and tensors (``[x0, y0, x1, y1]``).

Plain Python numbers in and out (lists, ``tensor.tolist()`` rows): every results file ovd writes
(detections, mined proposals) rounds its boxes here, so they all hold the same digits.
"""

from __future__ import annotations

from collections.abc import Sequence


def coco_bbox(xyxy: Sequence[float]) -> list[float]:
    """``[x0, y0, x1, y1]`` → COCO ``[x, y, w, h]``, each value rounded to 2 decimals."""
    x0, y0, x1, y1 = xyxy
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def xywh_to_xyxy(bbox: Sequence[float]) -> list[float]:
    """COCO ``[x, y, w, h]`` → ``[x0, y0, x1, y1]`` (not rounded). Raises ``ValueError`` /
    ``TypeError`` (from the unpacking) when ``bbox`` is not 4 values; callers name the record."""
    x, y, w, h = bbox
    return [x, y, x + w, y + h]
