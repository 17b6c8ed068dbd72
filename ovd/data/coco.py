"""COCO- and LVIS-format detection datasets, read and indexed through pycocotools / the lvis API.

Every check a user's file can fail happens here, once, with a message naming the file and the field;
later stages can then trust the records. Degenerate boxes (width or height <= 0) are *skipped with
one counted warning* when loading for training/mining (``drop_degenerate=True``, the default): real
annotation files occasionally contain them and they cannot be learned from. Evaluation keeps the
ground truth exactly as written (``drop_degenerate=False``), so metrics equal the official APIs'.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from ovd.data.boxes import xywh_to_xyxy
from ovd.data.masks import segmentation_problem
from ovd.data.validate import is_box, is_int, is_number, listing
from ovd.errors import OvdError
from ovd.utils.io import read_json


def is_lvis_format(data: dict) -> bool:
    """LVIS files carry per-category ``frequency`` and per-image negative/not-exhaustive lists."""
    cats = data.get("categories") or []
    imgs = data.get("images") or []
    cats_lvis = bool(cats) and all(isinstance(c, dict) and "frequency" in c for c in cats)
    imgs_lvis = bool(imgs) and all(isinstance(i, dict) and "neg_category_ids" in i for i in imgs)
    return cats_lvis or imgs_lvis


def validate_annotations(data: Any, path: str, drop_degenerate: bool, lvis: bool = False) -> tuple[dict, int]:
    """Check a COCO/LVIS dict; return (possibly filtered) data and the number of degenerate boxes dropped."""
    if not isinstance(data, dict):
        raise OvdError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise OvdError(f"{path}: missing top-level field '{key}'")
        if not isinstance(data[key], list):
            raise OvdError(f"{path}: field '{key}' must be a list, got {type(data[key]).__name__}")
    cat_ids = _check_categories(data["categories"], path, lvis)
    img_ids = _check_images(data["images"], path, lvis)
    kept, dropped, filled = _check_annotations(data["annotations"], path, img_ids, cat_ids, drop_degenerate)
    if dropped or filled:
        data = {**data, "annotations": kept}
    return data, dropped


def _check_categories(categories: list, path: str, lvis: bool) -> set[int]:
    """Integer ids, unique ids and names (and an LVIS frequency); the set of ids."""
    cat_ids: set[int] = set()
    names: dict[str, int] = {}
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise OvdError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {c!r:.120}")
        if c["id"] in cat_ids:
            raise OvdError(f"{path}: categories[{i}]: duplicate category id {c['id']}")
        if c["name"] in names:
            raise OvdError(
                f"{path}: categories[{i}]: duplicate category name '{c['name']}' (ids {names[c['name']]} and {c['id']})"
            )
        if lvis and c.get("frequency") not in ("r", "c", "f"):
            raise OvdError(
                f"{path}: categories[{i}] ('{c['name']}'): LVIS 'frequency' must be 'r', 'c' or 'f', "
                f"got {c.get('frequency')!r}"
            )
        cat_ids.add(c["id"])
        names[c["name"]] = c["id"]
    return cat_ids


def _check_images(images: list, path: str, lvis: bool) -> set[int]:
    """Integer unique ids, positive sizes (and LVIS' per-image lists); the set of ids."""
    img_ids: set[int] = set()
    for i, im in enumerate(images):
        if not isinstance(im, dict) or not is_int(im.get("id")):
            raise OvdError(f"{path}: images[{i}] needs an integer 'id', got {im!r:.120}")
        if im["id"] in img_ids:
            raise OvdError(f"{path}: images[{i}]: duplicate image id {im['id']}")
        for k in ("width", "height"):
            if k in im and not (is_number(im[k]) and im[k] > 0):
                raise OvdError(f"{path}: images[{i}] (id {im['id']}): '{k}' must be a positive number, got {im[k]!r}")
        if lvis:
            for k in ("neg_category_ids", "not_exhaustive_category_ids"):
                if not isinstance(im.get(k), list):
                    raise OvdError(f"{path}: images[{i}] (id {im['id']}): LVIS field '{k}' must be a list")
        img_ids.add(im["id"])
    return img_ids


def _check_annotations(anns: list, path: str, img_ids: set[int], cat_ids: set[int], drop_degenerate: bool):
    """Every annotation checked (all problems listed in one error); (kept, number dropped, filled?)."""
    bad: list[str] = []
    kept = []
    dropped = 0
    filled = False
    ann_ids: set[int] = set()
    for i, a in enumerate(anns):
        where = f"annotations[{i}]" + (f" (id {a.get('id')})" if isinstance(a, dict) and "id" in a else "")
        if not isinstance(a, dict):
            bad.append(f"{where}: not an object")
            continue
        if "id" in a:
            if not is_int(a["id"]):
                bad.append(f"{where}: 'id' must be an integer, got {a['id']!r:.40}")
            elif a["id"] in ann_ids:
                bad.append(f"{where}: duplicate annotation id")
            else:
                ann_ids.add(a["id"])
        for key, known, field_name in (("image_id", img_ids, "images"), ("category_id", cat_ids, "categories")):
            if not is_int(a.get(key)):
                bad.append(f"{where}: '{key}' must be an integer, got {a.get(key)!r:.40}")
            elif a[key] not in known:
                bad.append(f"{where}: {key} {a[key]} is not in '{field_name}'")
        bb = a.get("bbox")
        if not is_box(bb):
            bad.append(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bb!r:.80}")
            continue
        if bb[2] <= 0 or bb[3] <= 0:
            if drop_degenerate:
                dropped += 1
                continue
        if "area" not in a or "iscrowd" not in a:
            # pycocotools needs both and LVIS files have no 'iscrowd': fill the obvious values
            # (box area, not a crowd) rather than crash inside the evaluator.
            a = {**a, "area": a.get("area", bb[2] * bb[3]), "iscrowd": a.get("iscrowd", 0)}
            filled = True
        kept.append(a)
    if bad:
        raise OvdError(f"{path}: {len(bad)} bad annotation(s): {listing(bad)}")
    return kept, dropped, filled


@dataclass
class DetectionDataset:
    """A validated COCO/LVIS annotation file plus its pycocotools / lvis index (``.api``)."""

    path: Path
    data: dict
    api: Any
    is_lvis: bool
    image_root: Path | None = None
    num_dropped_degenerate: int = 0
    _by_image: dict = field(default_factory=dict, repr=False)

    # -- categories -------------------------------------------------------------------------------
    @property
    def categories(self) -> list[dict]:
        return self.data["categories"]

    @property
    def cat_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def cat_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def name_of(self, cat_id: int) -> str:
        return self.api.cats[cat_id]["name"]  # both COCO and LVIS index categories as .cats

    # -- images -----------------------------------------------------------------------------------
    @property
    def images(self) -> list[dict]:
        return self.data["images"]

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def annotations_of(self, image_id: int) -> list[dict]:
        if not self._by_image:
            for a in self.data["annotations"]:
                self._by_image.setdefault(a["image_id"], []).append(a)
        return self._by_image.get(image_id, [])

    def image_path(self, image: dict) -> Path | None:
        """``image_root / file_name``; LVIS v1 has no file_name, only ``coco_url`` (…/train2017/x.jpg),
        whose last two parts are the path under a COCO image root."""
        root = self.image_root if self.image_root is not None else self.path.parent
        if image.get("file_name"):
            return root / image["file_name"]
        if image.get("coco_url"):
            return root.joinpath(*str(image["coco_url"]).split("/")[-2:])
        return None

    def check_segmentations(self, crowd: bool = False, cat_ids=None) -> None:
        """Every annotation (of ``cat_ids`` if given; crowd regions too with ``crowd``) has a usable
        ``segmentation`` for its image's size (:func:`~ovd.data.masks.segmentation_problem`), else
        one :class:`OvdError` listing the bad ones. Checked only where masks are used (mask
        training, mask AP): a box-only run neither reads nor refuses a file's segmentations."""
        info = self.data.get("info") if isinstance(self.data.get("info"), dict) else {}
        if str(info.get("description", "")).startswith("mini-world") and info.get("annotation_version", 1) < 2:
            # mini-worlds built before annotation version 2 give each object its box's rectangle as
            # segmentation: valid polygons, wrong masks, so they are refused by name
            raise OvdError(
                f"{self.path}: a mini-world file from before silhouette segmentations (its masks are its "
                f"boxes); rebuild the world with `ovd data mini --overwrite` (the images stay the same)"
            )
        sizes = {im["id"]: (im.get("height"), im.get("width")) for im in self.images}
        bad: list[str] = []
        for i, a in enumerate(self.data["annotations"]):
            if (a.get("iscrowd", 0) and not crowd) or (cat_ids is not None and a["category_id"] not in cat_ids):
                continue
            seg = a.get("segmentation")
            why = segmentation_problem(seg, *sizes[a["image_id"]]) if seg is not None else "no 'segmentation'"
            if why:
                bad.append(f"annotations[{i}] (id {a.get('id')}, image {a['image_id']}): {why}")
        if bad:
            raise OvdError(f"{self.path}: {len(bad)} annotation(s) without a usable segmentation: {listing(bad)}")

    def record(self, index: int) -> dict:
        """Per-image record in the torchvision detection convention (boxes xyxy, labels = category
        ids; ``segmentations``: each box's COCO segmentation, unchecked and undecoded, or None)."""
        im = self.images[index]
        anns = [a for a in self.annotations_of(im["id"]) if not a.get("iscrowd", 0)]
        boxes = [xywh_to_xyxy(a["bbox"]) for a in anns]
        return {
            "image_id": im["id"],
            "file_name": im.get("file_name", ""),
            "path": self.image_path(im),
            "width": im.get("width"),
            "height": im.get("height"),
            "boxes": boxes,
            "labels": [a["category_id"] for a in anns],
            "segmentations": [a.get("segmentation") for a in anns],
        }


def _build_api(data: dict, is_lvis: bool):
    if is_lvis:
        from lvis import LVIS

        api = LVIS.__new__(LVIS)  # LVIS() only reads from a path; we already hold the validated dict
        api.logger = logging.getLogger("lvis.lvis")
        api.dataset = data
        api._create_index()
        return api
    api = COCO()
    api.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        api.createIndex()
    return api


def load_detection_dataset(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    lvis: bool | None = None,
    drop_degenerate: bool = True,
    check_images: bool = False,
) -> DetectionDataset:
    """Load a COCO- or LVIS-format annotation file (``lvis=None`` detects the format).

    ``check_images``: also open every image's header now (:func:`ovd.data.images.check_image_files`:
    exists, readable, size as annotated), for runs that will read every image later (training)."""
    path = Path(path)
    data = read_json(path, "annotation file")
    if not isinstance(data, dict):
        raise OvdError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories'")
    is_lvis = is_lvis_format(data) if lvis is None else bool(lvis)
    data, dropped = validate_annotations(data, str(path), drop_degenerate=drop_degenerate, lvis=is_lvis)
    if dropped:
        warnings.warn(f"{path}: skipped {dropped} annotation(s) with non-positive box width/height", stacklevel=2)
    api = _build_api(data, is_lvis)
    ds = DetectionDataset(
        path=path,
        data=data,
        api=api,
        is_lvis=is_lvis,
        image_root=Path(image_root) if image_root else None,
        num_dropped_degenerate=dropped,
    )
    if check_images:
        # Imported here on purpose: ovd.data.images imports torch (~2 s measured with -X importtime),
        # and `ovd eval` imports this module without ever needing torch (~0.06 s in all).
        from ovd.data.images import check_image_files

        check_image_files(ds)
    return ds
