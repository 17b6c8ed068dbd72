"""Open-vocabulary base/novel splits: named ones (COCO 48/17, LVIS rare) or a user file.

A split is a pair of name lists; it is *resolved* against a dataset's categories to category ids.
Names are matched exactly (COCO 2017 spellings: "tv", "couch", "motorcycle", "airplane").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ovd.config import safe_load_unique
from ovd.errors import OvdError

# The OVR-CNN / ViLD / EZSD split. The other 15 COCO classes are in neither group and not evaluated.
COCO_OVD_NOVEL_17 = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard",
    "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)  # fmt: skip
COCO_OVD_BASE_48 = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot",
    "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven",
    "toaster", "refrigerator", "book", "clock", "vase", "toothbrush",
)  # fmt: skip

NAMED_SPLITS = ("coco_ovd_48_17", "lvis_rare")


@dataclass(frozen=True)
class Split:
    """Resolved split: names and category ids of each group, in dataset category order."""

    name: str
    base_names: tuple[str, ...]
    novel_names: tuple[str, ...]
    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]

    @property
    def all_ids(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.base_ids) | set(self.novel_ids)))

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.base_names + self.novel_names


def _check_names(names: object, field: str, source: str) -> list[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        raise OvdError(f"split {source}: '{field}' must be a list of non-empty class names")
    seen, dups = set(), []
    for n in names:
        if n in seen and n not in dups:
            dups.append(n)
        seen.add(n)
    if dups:
        raise OvdError(f"split {source}: duplicate class name(s) in '{field}': {', '.join(dups)}")
    return list(names)


def read_split_file(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Read ``{base: [names], novel: [names]}`` from YAML or JSON."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"split file not found: {path} (named splits: {', '.join(NAMED_SPLITS)})")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else safe_load_unique(text, f"split file {path}")
    except json.JSONDecodeError as e:
        raise OvdError(f"split file {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise OvdError(
            f"split file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or 'parse error'}"
        ) from None
    if not isinstance(data, dict) or set(data) - {"base", "novel"} or not {"base", "novel"} <= set(data):
        raise OvdError(f"split file {path}: expected exactly the fields 'base' and 'novel' (lists of class names)")
    base = _check_names(data["base"], "base", str(path))
    novel = _check_names(data["novel"], "novel", str(path))
    both = [n for n in base if n in set(novel)]
    if both:
        raise OvdError(f"split file {path}: class name(s) in both 'base' and 'novel': {', '.join(both)}")
    return base, novel


def resolve_split(spec: str, categories: list[dict], source: str = "annotation file") -> Split:
    """Resolve a split name or file against ``categories`` (the dataset's, with ids and names)."""
    by_name = {c["name"]: c for c in categories}
    if spec == "coco_ovd_48_17":
        base, novel = list(COCO_OVD_BASE_48), list(COCO_OVD_NOVEL_17)
    elif spec == "lvis_rare":
        missing = [c["name"] for c in categories if c.get("frequency") not in ("r", "c", "f")]
        if missing:
            raise OvdError(
                f"split lvis_rare needs LVIS categories with 'frequency' r/c/f; {source} has none for: "
                f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            )
        novel = [c["name"] for c in categories if c["frequency"] == "r"]
        base = [c["name"] for c in categories if c["frequency"] in ("c", "f")]
    else:
        if not (spec.endswith((".json", ".yaml", ".yml")) or os.path.sep in spec or Path(spec).exists()):
            raise OvdError(f"unknown split '{spec}': use one of {', '.join(NAMED_SPLITS)} or a YAML/JSON split file")
        base, novel = read_split_file(spec)
    unknown = [n for n in base + novel if n not in by_name]
    if unknown:
        raise OvdError(
            f"split {spec}: {len(unknown)} class name(s) not among the categories of {source}: {', '.join(unknown)}"
        )
    order = {c["name"]: i for i, c in enumerate(categories)}
    base.sort(key=order.__getitem__)
    novel.sort(key=order.__getitem__)
    return Split(
        name=Path(spec).stem if spec not in NAMED_SPLITS else spec,
        base_names=tuple(base),
        novel_names=tuple(novel),
        base_ids=tuple(by_name[n]["id"] for n in base),
        novel_ids=tuple(by_name[n]["id"] for n in novel),
    )
