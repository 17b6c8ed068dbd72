"""Small checks shared by every reader of a user's JSON (annotations, detections, proposals).

JSON has no integer type of its own and ``True`` is an ``int`` in Python: these helpers say what a
field must hold in the words of the error messages ("an integer", "a finite number").
"""

from __future__ import annotations

import math
from typing import Any

MAX_LISTED = 5  # offenders named in one error message before "and N more"


def is_int(v: Any) -> bool:
    """An integer, not a bool (JSON ``true`` would otherwise pass as 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float, not a bool (NaN and infinity are refused)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_box(v: Any) -> bool:
    """A JSON box: a list of exactly 4 finite numbers (``[x, y, w, h]`` or ``[x0, y0, x1, y1]``)."""
    return isinstance(v, list) and len(v) == 4 and all(is_number(x) for x in v)


def listing(items: list[str], most: int = MAX_LISTED) -> str:
    """The first ``most`` offenders joined by "; ", then "; and N more" where some were left out."""
    more = len(items) - most
    return "; ".join(items[:most]) + (f"; and {more} more" if more > 0 else "")
