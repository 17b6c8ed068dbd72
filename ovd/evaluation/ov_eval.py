"""Open-vocabulary evaluation: official COCO / LVIS box AP, split into base and novel groups.

COCO-format ground truth: pycocotools' COCOeval, run once per group with ``params.catIds``
restricted to the group's category ids (the OVR-CNN / ViLD / EZSD protocol). With a split, "all"
means base ∪ novel of that split; without one, every category of the ground truth.
LVIS-format ground truth: the lvis API's LVISEval (AP, AP50, APr, APc, APf, ...), plus base/novel
groups the same way when a split is given.

Box AP (``iou_type="bbox"``, the default) and mask AP (``"segm"``: pycocotools'
``COCOeval(iouType="segm")``, the lvis API's ``LVISEval(iou_type="segm")``), or both
(``("bbox", "segm")``). Box metrics keep their plain names (``AP``, ``AP50_novel``, ``APr`` ...);
mask metrics carry the same names prefixed ``mask_`` (``mask_AP``, ``mask_AP50_novel``,
``mask_APr`` ...), so one metrics file can hold both.

Values are fractions in [0, 1], as the official APIs return them. A group with no ground truth at
all has no defined AP: the APIs return -1 there, which we report as ``None`` (JSON ``null``)
instead of a number that could be averaged by mistake.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import warnings
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ovd.data.coco import DetectionDataset, load_detection_dataset
from ovd.data.masks import compressed, segmentation_problem
from ovd.data.splits import Split, resolve_split
from ovd.data.validate import is_box, is_int, is_number, listing
from ovd.errors import OvdError
from ovd.evaluation.lvis_compat import patch_lvis
from ovd.utils.io import read_json

COCO_KEYS = ("AP", "AP50")
IOU_TYPES = ("bbox", "segm")
MASK_PREFIX = "mask_"  # segm metrics: the box metrics' names with this prefix


def parse_iou_types(iou_type: str | tuple | list) -> tuple[str, ...]:
    """``"bbox"``, ``"segm"``, ``"bbox,segm"`` (or a list of them) → the types in IOU_TYPES order."""
    parts = iou_type.split(",") if isinstance(iou_type, str) else list(iou_type)
    parts = [str(p).strip() for p in parts if str(p).strip()]
    bad = [p for p in parts if p not in IOU_TYPES]
    if bad or not parts:
        raise OvdError(f"iou type {iou_type!r}: expected bbox, segm or bbox,segm")
    return tuple(t for t in IOU_TYPES if t in parts)


def load_detections(
    dets: str | os.PathLike | list, gt: DetectionDataset, iou_types: tuple[str, ...] = ("bbox",)
) -> list[dict]:
    """Read and check a COCO result list (``image_id``, ``category_id``, ``bbox`` xywh, ``score``;
    with ``"segm"`` in ``iou_types`` also ``segmentation``, an RLE or polygons of the image's size).

    For mask AP alone ``bbox`` may be left out (by every detection, as pycocotools requires: it
    then takes the mask's box). Segmentations come back as compressed RLE, the form the official
    results loaders take (they read polygons and uncompressed RLE as the same mask)."""
    source = str(dets) if not isinstance(dets, list) else "detections"
    data = read_json(dets, "detections file") if not isinstance(dets, list) else dets
    if isinstance(data, dict) and "annotations" in data:
        raise OvdError(f"{source}: this looks like an annotation file; detections must be a JSON list of results")
    if not isinstance(data, list):
        raise OvdError(f"{source}: detections must be a JSON list of {{image_id, category_id, bbox, score}}")
    img_ids = set(gt.image_ids)
    cat_ids = set(gt.cat_ids)
    segm = "segm" in iou_types
    need_box = not segm or "bbox" in iou_types or any(isinstance(d, dict) and "bbox" in d for d in data)
    sizes = {im["id"]: (im.get("height"), im.get("width")) for im in gt.images}
    bad: list[str] = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            bad.append(f"[{i}]: not an object")
            continue
        if not is_int(d.get("image_id")):
            bad.append(f"[{i}]: 'image_id' must be an integer, got {d.get('image_id')!r}")
        elif d["image_id"] not in img_ids:
            bad.append(f"[{i}]: image_id {d['image_id']} is not an image of {gt.path}")
        if not is_int(d.get("category_id")):
            bad.append(f"[{i}]: 'category_id' must be an integer, got {d.get('category_id')!r}")
        elif d["category_id"] not in cat_ids:
            bad.append(f"[{i}]: category_id {d['category_id']} is not a category of {gt.path}")
        bb = d.get("bbox")
        if not need_box:
            pass
        elif not is_box(bb):
            why = " (for mask AP every detection has one or none)" if segm else ""
            bad.append(f"[{i}]: 'bbox' must be 4 finite numbers [x, y, w, h]{why}, got {bb!r:.80}")
        elif bb[2] <= 0 or bb[3] <= 0:
            # the official APIs silently drop such a box (as if never detected): refuse instead
            bad.append(f"[{i}]: 'bbox' [x, y, w, h] needs width and height > 0, got {bb!r:.80}")
        if not is_number(d.get("score")):
            bad.append(f"[{i}]: 'score' must be a finite number, got {d.get('score')!r}")
        if segm:
            h, w = sizes.get(d.get("image_id"), (None, None))
            why = segmentation_problem(d.get("segmentation"), h, w) if "segmentation" in d else "no 'segmentation'"
            if why:
                bad.append(f"[{i}]: 'segmentation': {why}")
    if bad:
        raise OvdError(f"{source}: {len(bad)} bad detection(s): {listing(bad)}")
    # The official APIs write into the dicts they are given (area, id, segmentation); keep ours clean.
    out = copy.deepcopy(data)
    if segm:
        for d in out:
            h, w = sizes[d["image_id"]]
            d["segmentation"] = compressed(d["segmentation"], h, w)
    return out


def _undefined_to_none(v: float) -> float | None:
    v = float(v)
    return None if v < 0 or math.isnan(v) else v


# --- COCO -------------------------------------------------------------------------------------------
def _coco_results(gt: DetectionDataset, dets: list[dict]):
    with contextlib.redirect_stdout(io.StringIO()):
        if dets:
            return gt.api.loadRes(dets)
        # loadRes cannot take an empty list; an empty result set is an index with no annotations.
        res = COCO()
        res.dataset = {"images": gt.images, "categories": gt.categories, "annotations": []}
        res.createIndex()
        return res


def _coco_ap(gt: DetectionDataset, res, cat_ids: list[int], iou_type: str = "bbox") -> tuple[float | None, ...]:
    ev = COCOeval(gt.api, res, iou_type)
    ev.params.catIds = list(cat_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return _undefined_to_none(ev.stats[0]), _undefined_to_none(ev.stats[1])


# --- LVIS -------------------------------------------------------------------------------------------
def _lvis_results(gt: DetectionDataset, dets: list[dict]):
    from lvis import LVISResults

    if dets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls logger.warn
            return LVISResults(gt.api, dets, max_dets=300)
    res = LVISResults.__new__(LVISResults)  # LVISResults() cannot take an empty list either
    res.logger = logging.getLogger("lvis.results")
    res.dataset = copy.deepcopy(gt.api.dataset)
    res.dataset["annotations"] = []
    res._create_index()
    return res


def _lvis_eval(gt: DetectionDataset, res, cat_ids: list[int] | None, iou_type: str = "bbox") -> dict:
    from lvis import LVISEval

    patch_lvis()
    ev = LVISEval(gt.api, res, iou_type)
    if cat_ids is not None:
        ev.params.cat_ids = sorted(cat_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ev.run()
    return {k: _undefined_to_none(v) for k, v in ev.get_results().items()}


# --- entry point ------------------------------------------------------------------------------------
def evaluate_detections(
    gt: str | os.PathLike | DetectionDataset,
    dets: str | os.PathLike | list,
    split: str | Split | None = None,
    lvis: bool | None = None,
    iou_type: str | tuple | list = "bbox",
) -> dict[str, Any]:
    """Box and/or mask AP of ``dets`` against ``gt``; base/novel groups when ``split`` is given.

    ``lvis=None`` detects the ground-truth format from the file. ``iou_type``: ``"bbox"``,
    ``"segm"`` or ``"bbox,segm"`` (mask metrics are prefixed ``mask_``, see the module doc).
    """
    iou_types = parse_iou_types(iou_type)
    if not isinstance(gt, DetectionDataset):
        gt = load_detection_dataset(gt, lvis=lvis, drop_degenerate=False)
    elif lvis is not None and bool(lvis) != gt.is_lvis:
        gt = load_detection_dataset(gt.path, lvis=lvis, drop_degenerate=False)
    if not gt.categories:
        raise OvdError(f"{gt.path}: no categories to evaluate")
    if "segm" in iou_types:
        gt.check_segmentations(crowd=True)
    if isinstance(split, str) and split:
        split = resolve_split(split, gt.categories, source=str(gt.path))
    det_list = load_detections(dets, gt, iou_types)

    metrics: dict[str, Any] = {}
    for t in iou_types:
        prefix = MASK_PREFIX if t == "segm" else ""
        # the official loaders write into the list (area, id, a box outline as segmentation): one copy per type
        one = _evaluate_one(gt, copy.deepcopy(det_list) if len(iou_types) > 1 else det_list, split, t)
        metrics.update({prefix + k: v for k, v in one.items()})
    return metrics


def _evaluate_one(gt: DetectionDataset, det_list: list[dict], split: Split | None, iou_type: str) -> dict[str, Any]:
    if gt.is_lvis:
        res = _lvis_results(gt, det_list)
        metrics = _lvis_eval(gt, res, None, iou_type)
        if split:
            for group, ids in (("base", split.base_ids), ("novel", split.novel_ids)):
                r = _lvis_eval(gt, res, list(ids), iou_type)
                metrics[f"AP_{group}"] = r["AP"]
                metrics[f"AP50_{group}"] = r["AP50"]
        return metrics

    res = _coco_results(gt, det_list)
    groups = [("", list(split.all_ids) if split else gt.cat_ids)]
    if split:
        groups += [("_base", list(split.base_ids)), ("_novel", list(split.novel_ids))]
    metrics: dict[str, Any] = {}
    for suffix, ids in groups:
        ap, ap50 = _coco_ap(gt, res, ids, iou_type)
        metrics[f"AP{suffix}"] = ap
        metrics[f"AP50{suffix}"] = ap50
    return metrics


def format_metrics(metrics: dict[str, Any]) -> str:
    """A readable table: one row per group (all / base / novel) with box AP / AP50 and, where
    present, mask AP / AP50; then any further metrics."""

    def fmt(v: Any) -> str:
        return "   n/a" if v is None else f"{v:6.4f}"

    kinds = [(p, head) for p, head in (("", "AP      AP50"), (MASK_PREFIX, "  mask AP  mask AP50"))
             if any(k.startswith(p + "AP") and k[len(p):] in _GROUP_KEYS for k in metrics)]  # fmt: skip
    rows = ["group      " + "  ".join(head for _, head in kinds)] if kinds else []
    shown = set()
    for group, suf in (("all", ""), ("base", "_base"), ("novel", "_novel")):
        if not any(f"{p}AP{suf}" in metrics for p, _ in kinds):
            continue
        cells = []
        for p, _ in kinds:
            pad = "   " if p else ""
            cells.append(f"{pad}{fmt(metrics.get(f'{p}AP{suf}'))}  {pad}{fmt(metrics.get(f'{p}AP50{suf}'))}")
            shown |= {f"{p}AP{suf}", f"{p}AP50{suf}"}
        rows.append(f"{group:<8} " + "  ".join(cells))
    rest = [k for k in metrics if k not in shown]
    if rest:
        rows.append("")
        rows += [f"{k:<10} {fmt(metrics[k])}" for k in rest]
    return "\n".join(rows)


_GROUP_KEYS = {f"AP{g}{s}" for g in ("", "50") for s in ("", "_base", "_novel")}
