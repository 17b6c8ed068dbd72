"""``ovd detect`` behind the command line: which images (files, folders, globs), which vocabulary
(``--classes`` / ``--classes-file`` / ``--text-embeddings``), which outputs (``--out``,
``--results``, ``--gt``, ``--save-png``), and the pass over the images with a
:class:`~ovd.engine.predictor.Detector`. The library's ``Detector`` knows nothing of these flags.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from ovd.data.boxes import coco_bbox
from ovd.data.images import check_images
from ovd.data.loader import ImageFiles, make_loader
from ovd.data.masks import encode
from ovd.engine.draw import draw_detections
from ovd.engine.predictor import Detector
from ovd.errors import OvdError
from ovd.utils.io import atomic_path, check_writable, read_json, write_json
from ovd.vlm.clip import default_text_clean
from ovd.vlm.vocab import load_vocabulary, resolve_vocabulary

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def expand_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from command-line inputs, in order: a file as given (any extension: a non-image
    fails when read), a folder's image files (extensions :data:`IMAGE_EXTENSIONS`, any case; not
    recursive) sorted by name, a glob pattern's image files sorted (``**`` recurses). A file met
    twice is kept once. A folder or pattern without images is an error."""
    out: list[Path] = []
    seen: set[Path] = set()
    for arg in inputs:
        arg = str(arg)
        p = Path(arg)
        if p.is_dir():
            found = sorted((q for q in p.iterdir() if q.is_file() and _is_image_name(q)), key=lambda q: q.name)
            if not found:
                raise OvdError(f"folder {p} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        elif not p.exists() and _GLOB_CHARS & set(arg):
            hits = (Path(q) for q in glob.glob(arg, recursive=True))
            found = sorted(q for q in hits if q.is_file() and _is_image_name(q))
            if not found:
                raise OvdError(f"no image files match {arg}")
        else:
            found = [p]  # a missing file is reported by check_images, with the others
        for q in found:
            key = q.resolve() if q.exists() else q
            if key not in seen:
                seen.add(key)
                out.append(q)
    if not out:
        raise OvdError("no images given")
    return out


def match_ground_truth(gt: str | os.PathLike, paths: Sequence[Path], names: Sequence[str]):
    """Image ids and sizes for ``paths`` and category ids for ``names`` from a COCO GT file.

    Images are matched by file name: the GT ``file_name`` (LVIS: the last two parts of ``coco_url``)
    must equal the end of the image's path (``val/000002.png`` matches ``.../images/val/000002.png``;
    a bare ``000002.png`` matches any folder). Class names are matched exactly, else as the CLIP
    tokenizer reads them (case, spaces). Every image and name must match (one error listing the
    first misses)."""
    data = read_json(gt, "ground-truth file")
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("categories"), list)
    ):
        raise OvdError(f"{gt}: not a COCO ground-truth file (needs 'images' and 'categories' lists)")
    by_name: dict[str, dict] = {}
    for i, im in enumerate(data["images"]):
        fn = im.get("file_name") if isinstance(im, dict) else None
        if isinstance(im, dict) and not fn and isinstance(im.get("coco_url"), str):
            fn = "/".join(im["coco_url"].split("/")[-2:])
        if not isinstance(fn, str) or not fn or not isinstance(im.get("id"), int):
            raise OvdError(f"{gt}: images[{i}] needs an integer 'id' and a 'file_name' (or 'coco_url')")
        by_name[fn.replace("\\", "/").removeprefix("./")] = im
    images, missing = [], []
    for p in paths:
        parts = p.as_posix().split("/")
        hit = next((by_name["/".join(parts[k:])] for k in range(len(parts)) if "/".join(parts[k:]) in by_name), None)
        if hit is None:
            missing.append(str(p))
        images.append(hit)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        listing = ", ".join(missing[:3])
        raise OvdError(f"{len(missing)} image(s) are not in {gt} (matched by file name): {listing}{more}")
    cats: dict[str, int] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or not isinstance(c.get("id"), int):
            raise OvdError(f"{gt}: categories[{i}] needs an integer 'id' and a string 'name'")
        cats.setdefault(c["name"], c["id"])
    clean = default_text_clean()
    loose = {clean(n): i for n, i in reversed(list(cats.items()))}
    cat_ids, unknown = [], []
    for n in names:
        cid = cats.get(n, loose.get(clean(n)))
        if cid is None:
            unknown.append(n)
        cat_ids.append(cid)
    if unknown:
        raise OvdError(f"class name(s) not among the categories of {gt}: {', '.join(unknown[:5])}")
    return images, cat_ids


def _detect_outputs(score_thr: float, out, results, gt, save_png: bool) -> tuple[Path | None, Path | None]:
    """``ovd detect``'s output options checked before any work: (drawing folder or None, results file
    or None)."""
    if not 0.0 <= score_thr <= 1.0:
        raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
    if gt is not None and results is None:
        raise OvdError("--gt only matters with --results (it gives the results file its image and category ids)")
    draw = results is None or save_png
    out_dir = Path(out) if (draw and out) else None
    if draw and out_dir is None:
        raise OvdError("--save-png needs --out, the folder for the drawings")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise OvdError(f"--out {out_dir} exists and is not a folder")
    res_path = Path(results) if results is not None else None
    if res_path is not None and (res_path.is_dir() or res_path.suffix.lower() != ".json"):
        raise OvdError(f"--results {res_path}: expected a .json file path")
    if res_path is not None:
        check_writable(res_path, "--results")
    if out_dir is not None:
        check_writable(out_dir, "--out", folder=True)
    return out_dir, res_path


def _write_drawing(out_dir: Path, path: Path, img: torch.Tensor, pred: dict, names: list[str] | None) -> None:
    """``OUT/<stem>.png`` with the boxes drawn (enlarged, see :mod:`ovd.engine.draw`), and (``names`` given:
    per-image mode) ``OUT/<stem>.json``."""
    if names is not None:
        rec = {
            "image": str(path),
            "width": int(img.shape[-1]),
            "height": int(img.shape[-2]),
            "classes": names,
            "detections": [
                {"bbox": coco_bbox(b), "score": round(s, 5), "category_name": n}
                for b, s, n in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["names"])
            ],
        }
        if "masks" in pred:
            for d, rle in zip(rec["detections"], encode(pred["masks"])):
                d["segmentation"] = rle
        write_json(out_dir / f"{path.stem}.json", rec)
    drawn = draw_detections(img, pred)
    with atomic_path(out_dir / f"{path.stem}.png") as tmp:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ~90 lines, a dozen of them docstring: every check before the detector loads, then one pass over the
# images that fills both output modes; split, the checks and the pass would share a dozen locals
def run_detect(
    images: Sequence[str],
    ckpt: str,
    classes: str | Sequence[str] | None = None,
    score_thr: float = 0.3,
    out: str | None = "detections",
    clip=None,
    *,
    classes_file: str | None = None,
    text_embeddings: str | None = None,
    results: str | None = None,
    gt: str | None = None,
    save_png: bool = False,
    progress: bool = False,
    batch_size: int = 1,
    workers: int = 0,
) -> dict:
    """``ovd detect``. Inputs: image files, folders (their images, sorted) and glob patterns.

    Without ``results``: per image ``OUT/<stem>.json`` (boxes xywh, scores, names) and
    ``OUT/<stem>.png``. With ``results``: one COCO result list (``image_id``, ``category_id``, ``bbox``
    xywh, ``score``) for ``ovd eval`` — ids from ``gt`` (matched by file name and class name) when
    given, else images numbered 1.. in input order and classes 1.. in vocabulary order, written
    beside it as ``<results stem>.categories.json`` (``images`` + ``categories``, COCO style); the
    drawings only with ``save_png`` (into ``out``). Images stream through a ``DataLoader``
    (``workers`` processes decoding) and the detector ``batch_size`` at a time (1: the numbers of
    :meth:`Detector.predict`); every input is checked (exists, header readable, size as in ``gt``)
    before the detector is loaded, and the results file is written once at the end (atomically)."""
    if batch_size < 1 or workers < 0:
        raise OvdError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size} and {workers}")
    kind, vocab = resolve_vocabulary(classes, classes_file, text_embeddings)
    out_dir, res_path = _detect_outputs(score_thr, out, results, gt, save_png)
    paths = expand_images(images)
    if out_dir is not None:
        dup = sorted(s for s, n in Counter(p.stem for p in paths).items() if n > 1)
        if dup:
            raise OvdError(f"several images share the name {dup[0]}: outputs would overwrite each other")
    gt_images = cat_ids = None
    if gt is not None:  # a stored vocabulary's names come from the file, before the detector loads
        gt_images, cat_ids = match_ground_truth(gt, paths, vocab if kind == "names" else load_vocabulary(vocab).names)
    sizes = [(im.get("width"), im.get("height")) for im in gt_images] if gt_images else [(None, None)] * len(paths)
    where = f"given to detect{f' (sizes from {gt})' if gt else ''}"
    check_images([(p, w, h) for p, (w, h) in zip(paths, sizes)], where)

    det = Detector.from_checkpoint(ckpt, clip=clip, text_embeddings=vocab if kind == "file" else None)
    names = det.set_classes(vocab) if kind == "names" else det.classes
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OvdError(f"cannot create output folder {out_dir}: {e.strerror or e}") from None
    if cat_ids is None:
        cat_ids = list(range(1, len(names) + 1))
    coco: list[dict] = []
    per_image: list[dict] = []
    image_records: list[dict] = []
    device = next(det.model.parameters()).device
    bar = tqdm(total=len(paths), desc="detect", unit="img", disable=not progress)
    for batch in make_loader(ImageFiles(paths), workers=workers, batch_size=batch_size, device=device):
        bar.update(len(batch))
        for (img, k), pred in zip(batch, det.predict_batch([img for img, _ in batch], score_thr=score_thr)):
            p = paths[k]
            width, height = int(img.shape[-1]), int(img.shape[-2])
            image_id = gt_images[k]["id"] if gt_images else k + 1
            image_records.append({"id": image_id, "file_name": str(p), "width": width, "height": height})
            boxes, scores, labels = pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()
            if res_path is not None:
                segms = encode(pred["masks"]) if "masks" in pred else [None] * len(boxes)
                for b, s, lab, seg in zip(boxes, scores, labels, segms):
                    d = {"image_id": image_id, "category_id": cat_ids[lab], "bbox": coco_bbox(b), "score": round(s, 5)}
                    coco.append(d if seg is None else {**d, "segmentation": seg})
            if out_dir is not None:
                _write_drawing(out_dir, p, img, pred, names if res_path is None else None)
            per_image.append({"image": str(p), "image_id": image_id, "detections": len(boxes),
                              "json": str(out_dir / f"{p.stem}.json") if res_path is None else None})  # fmt: skip
    bar.close()
    summary = {"images": len(paths), "classes": len(names), "detections": sum(r["detections"] for r in per_image),
               "per_image": per_image}  # fmt: skip
    if res_path is not None:
        if gt is None:
            side = res_path.with_name(f"{res_path.stem}.categories.json")
            write_json(side, {"images": image_records,
                              "categories": [{"id": i, "name": n} for i, n in zip(cat_ids, names)]})  # fmt: skip
            summary["categories"] = str(side)
        write_json(res_path, coco, indent=None)
        summary["results"] = str(res_path)
    if out_dir is not None:
        summary["out"] = str(out_dir)
    return summary
