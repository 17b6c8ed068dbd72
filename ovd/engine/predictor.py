"""Prompting a trained detector with any class names: the ``Detector`` API behind ``ovd detect``.

    det = Detector.from_checkpoint("work_dirs/mini-smoke/train/final.pt")
    out = det.predict("scene.png", classes=["red circle", "blue star"])
    out["boxes"], out["scores"], out["names"]

The vocabulary is data: ``classes`` are turned into CLIP text embeddings (cached per vocabulary by
:class:`~ovd.vlm.clip.ClipModel`) and handed to the zero-shot classifier; nothing is retrained.
The CLIP used for the text is the one recorded in the checkpoint (or one passed in).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import draw_bounding_boxes

from ovd.data.boxes import coco_bbox
from ovd.data.images import load_image, pil_to_tensor
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.utils.io import atomic_path, check_writable, write_json
from ovd.vlm.clip import ClipModel, describe_clash, tokenizer_clean, vocabulary_clash
from ovd.vlm.vocab import check_vocabulary_clip, load_vocabulary, read_classes_file, text_fingerprint


def parse_classes(classes: str | Sequence[str], clean=None) -> list[str]:
    """Class names from a list or a comma-separated string; empty or duplicate names are errors.

    Duplicates are found the way the CLIP tokenizer reads names (``clean``: its cleaning function,
    default open_clip's: lower-cased, whitespace collapsed), so "red square" and "Red Square" —
    one text embedding — are refused rather than silently becoming two identical classes."""
    try:
        names = classes.split(",") if isinstance(classes, str) else list(classes)
    except TypeError:
        names = None
    if names is None or not all(isinstance(c, str) for c in names):
        raise OvdError(f"classes must be a comma-separated string or a list of strings, got {classes!r:.80}")
    names = [c.strip() for c in names]
    names = [c for c in names if c]
    if not names:
        raise OvdError("empty class list: give at least one class name, e.g. --classes 'red circle,blue star'")
    clash = vocabulary_clash(names, clean)
    if clash:
        raise OvdError(f"duplicate class names: {describe_clash(clash)}")
    return names


def as_image_tensor(image) -> torch.Tensor:
    """A path, PIL image, HxWx3 uint8 array or 3xHxW float tensor in [0, 1] → 3xHxW float tensor."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    if isinstance(image, Image.Image):
        return pil_to_tensor(image, "PIL image")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise OvdError(f"expected an HxWx3 image array, got shape {image.shape}")
        scale = 255.0 if image.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / scale
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise OvdError(f"expected a 3xHxW image tensor, got shape {tuple(image.shape)}")
        return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    raise OvdError(f"cannot use a {type(image).__name__} as an image (path, PIL image, array or tensor)")


class Detector:
    """A trained open-vocabulary detector plus the CLIP text tower that turns names into classes.

    The text tower is loaded on first use: a detector prompted only with a stored vocabulary
    (:meth:`set_classes_from_file`, ``from_checkpoint(..., text_embeddings=F)``) never loads it."""

    def __init__(
        self,
        model: torch.nn.Module,
        clip,
        templates: Sequence[str],
        meta: dict | None = None,
        clip_loader=None,
        name: str = "detector",
    ):
        self.model = model.eval()
        self._clip = clip
        self._clip_loader = clip_loader
        self.templates = list(templates)
        self.meta = meta or {}
        self.name = name
        self.classes: list[str] = []
        self.vocabulary_file: Path | None = None  # the stored vocabulary in use, if any
        self._vocab_key: tuple | None = None

    @property
    def clip(self):
        """The CLIP whose text tower embeds class names (loaded on first use)."""
        if self._clip is None:
            if self._clip_loader is None:
                raise OvdError(f"{self.name} has no CLIP model to embed class names: pass clip= (a ClipModel)")
            self._clip = self._clip_loader()
        return self._clip

    @property
    def embed_dim(self) -> int:
        return int(self.meta.get("embed_dim") or self.model.roi_heads.classifier.embed_dim)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        clip=None,
        device: str = "cpu",
        text_embeddings: str | os.PathLike | None = None,
    ) -> Detector:
        """Load ``path`` (an ``ovd train`` checkpoint). ``clip``: a ClipModel, or None for the one the
        checkpoint was trained with (its open_clip model + weights, recorded at training time).
        ``text_embeddings``: a stored vocabulary (``ovd vocab embed``) to detect from the start; the
        CLIP is then not loaded until class names need embedding. Without it the detector starts
        with the base classes it was trained on."""
        state = load_checkpoint(path)
        meta = state["meta"]
        model = model_from_checkpoint(state, path).to(device)
        dim = int(meta["embed_dim"])
        spec = meta.get("clip_spec")

        def load_clip():
            if not spec:
                raise OvdError(f"{path} records no CLIP model: pass clip= (a ClipModel) explicitly")
            c = ClipModel.load(spec["model"], spec["pretrained"] or None, device=device)
            c.check_dim(dim, f"detector {path}")
            return c

        if clip is not None:
            clip.check_dim(dim, f"detector {path}")
        det = cls(model, clip, meta.get("templates") or ["a photo of a {}."], meta, load_clip, f"detector {path}")
        if text_embeddings is not None:
            det.set_classes_from_file(text_embeddings)
        else:
            det.clip  # noqa: B018 - load (and check) the CLIP now: a wrong one fails here, not at the first image
            if meta.get("base_names"):
                det.set_classes(meta["base_names"])
        return det

    def set_classes(self, classes: str | Sequence[str]) -> list[str]:
        """Detect these classes from now on (names → CLIP text embeddings → classifier)."""
        tok = getattr(self.clip, "tokenizer", None)
        names = parse_classes(classes, tokenizer_clean(tok) if tok is not None else None)
        key = ("names", tuple(names), tuple(self.templates))
        if key != self._vocab_key:
            self.model.set_vocabulary(self.clip.encode_text(names, self.templates))
            self.classes, self.vocabulary_file, self._vocab_key = names, None, key
        return names

    def set_classes_from_file(self, path: str | os.PathLike) -> list[str]:
        """Detect the classes of a stored vocabulary (``ovd vocab embed`` / ``clip.text_embeddings``
        format) from now on, with its embeddings as stored: no text tower runs. A file of another
        dimension, or recording another CLIP than the detector's, is one :class:`OvdError`."""
        vocab = load_vocabulary(path)
        fingerprint, source = self._clip_identity()
        check_vocabulary_clip(vocab, self.embed_dim, fingerprint, source, self.name)
        self.model.set_vocabulary(vocab.embeddings)
        self.classes, self.vocabulary_file = list(vocab.names), Path(path)
        self._vocab_key = ("file", str(Path(path).resolve()))
        return self.classes

    def _clip_identity(self) -> tuple[str | None, str | None]:
        """(text fingerprint, source) of the CLIP this detector was trained with: the checkpoint's
        record first (its region embeddings live in that CLIP's space), else the loaded CLIP's."""
        src = str(self.meta.get("clip") or "")
        inputs = self.meta.get("inputs") if isinstance(self.meta.get("inputs"), dict) else {}
        if src.startswith("text-embeddings:"):  # trained from a stored vocabulary: that file's CLIP
            try:
                v = load_vocabulary(src[len("text-embeddings:") :])
                return v.clip_fingerprint, v.clip_source
            except OvdError:
                pass
        elif inputs.get("clip.fingerprint"):
            return str(inputs["clip.fingerprint"]), inputs.get("clip.source")
        if self._clip is not None:
            return text_fingerprint(self._clip), self._clip.source
        return None, None

    @torch.no_grad()
    def predict(self, image, classes: str | Sequence[str] | None = None, score_thr: float = 0.05) -> dict:
        """Detections of one image: ``boxes`` (N, 4) xyxy in input pixels, ``scores``, ``labels``
        (0-based index into ``names``) and ``names`` (class name per box), highest score first
        (ties keep the model's order, as ``ovd test`` writes them)."""
        if classes is not None:
            self.set_classes(classes)
        if not self.classes:
            raise OvdError(f"{self.name} has no vocabulary yet: pass classes=[...] or call set_classes_from_file")
        if not 0.0 <= score_thr <= 1.0:
            raise OvdError(f"score threshold must be in [0, 1], got {score_thr}")
        x = as_image_tensor(image).to(next(self.model.parameters()).device)
        out = self.model([x])[0]
        keep = out["scores"] >= score_thr
        order = torch.sort(out["scores"][keep], descending=True, stable=True).indices
        boxes, scores = out["boxes"][keep][order].cpu(), out["scores"][keep][order].cpu()
        labels = (out["labels"][keep][order] - 1).cpu()
        return {"boxes": boxes, "scores": scores, "labels": labels, "names": [self.classes[i] for i in labels]}


def draw_detections(image: torch.Tensor, pred: dict, width: int = 2) -> torch.Tensor:
    """uint8 (3, H, W) image with labelled boxes (torchvision's ``draw_bounding_boxes``)."""
    img = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if len(pred["boxes"]) == 0:
        return img
    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    labels = [f"{n} {s:.2f}" for n, s in zip(pred["names"], pred["scores"].tolist())]
    colors = [palette[int(k) % len(palette)] for k in pred["labels"]]
    return draw_bounding_boxes(img, pred["boxes"], labels=labels, colors=colors, width=width)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def expand_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from command-line inputs, in order: a file as given (any extension: a non-image
    fails when read), a folder's image files (extensions :data:`IMAGE_EXTENSIONS`, any case; not
    recursive) sorted by name, a glob pattern's image files sorted (``**`` recurses). A file met
    twice is kept once. A folder or pattern without images is an error."""
    import glob

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


def resolve_vocabulary(
    classes: str | Sequence[str] | None = None,
    classes_file: str | os.PathLike | None = None,
    text_embeddings: str | os.PathLike | None = None,
) -> tuple[str, object]:
    """Exactly one of the three ways to name the classes → ("names", [names]) or ("file", path)."""
    given = [k for k, v in (("--classes", classes), ("--classes-file", classes_file),
                            ("--text-embeddings", text_embeddings)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise OvdError(
            "give exactly one of --classes, --classes-file and --text-embeddings"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    if classes is not None:
        return "names", parse_classes(classes)
    if classes_file is not None:
        return "names", read_classes_file(classes_file)
    if not Path(text_embeddings).is_file():
        raise OvdError(f"text embeddings file not found: {text_embeddings}")
    return "file", Path(text_embeddings)


def match_ground_truth(gt: str | os.PathLike, paths: Sequence[Path], names: Sequence[str]):
    """Image ids and sizes for ``paths`` and category ids for ``names`` from a COCO GT file.

    Images are matched by file name: the GT ``file_name`` (LVIS: the last two parts of ``coco_url``)
    must equal the end of the image's path (``val/000002.png`` matches ``.../images/val/000002.png``;
    a bare ``000002.png`` matches any folder). Class names are matched exactly, else as the CLIP
    tokenizer reads them (case, spaces). Every image and name must match (one error listing the
    first misses)."""
    from ovd.utils.io import read_json

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
    from ovd.vlm.clip import default_text_clean

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
    """``OUT/<stem>.png`` with the boxes drawn, and (``names`` given: per-image mode) ``OUT/<stem>.json``."""
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
        write_json(out_dir / f"{path.stem}.json", rec)
    drawn = draw_detections(img, pred)
    with atomic_path(out_dir / f"{path.stem}.png") as tmp:
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ~85 lines, a dozen of them docstring: one pass over the images that fills both output modes
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
) -> dict:
    """``ovd detect``. Inputs: image files, folders (their images, sorted) and glob patterns.

    Without ``results``: per image ``OUT/<stem>.json`` (boxes xywh, scores, names) and
    ``OUT/<stem>.png``. With ``results``: one COCO result list (``image_id``, ``category_id``, ``bbox``
    xywh, ``score``) for ``ovd eval`` — ids from ``gt`` (matched by file name and class name) when
    given, else images numbered 1.. in input order and classes 1.. in vocabulary order, written
    beside it as ``<results stem>.categories.json`` (``images`` + ``categories``, COCO style); the
    drawings only with ``save_png`` (into ``out``). Images stream one at a time; every input is
    checked (exists, header readable, size as in ``gt``) before the detector is loaded, and the
    results file is written once at the end (atomically)."""
    from tqdm import tqdm

    from ovd.data.images import check_images

    kind, vocab = resolve_vocabulary(classes, classes_file, text_embeddings)
    out_dir, res_path = _detect_outputs(score_thr, out, results, gt, save_png)
    paths = expand_images(images)
    if out_dir is not None:
        from collections import Counter

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
    for k, p in enumerate(tqdm(paths, desc="detect", unit="img", disable=not progress)):
        img = load_image(p)
        pred = det.predict(img, score_thr=score_thr)
        width, height = int(img.shape[-1]), int(img.shape[-2])
        image_id = gt_images[k]["id"] if gt_images else k + 1
        image_records.append({"id": image_id, "file_name": str(p), "width": width, "height": height})
        boxes, scores, labels = pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()
        if res_path is not None:
            coco.extend(
                {"image_id": image_id, "category_id": cat_ids[lab], "bbox": coco_bbox(b), "score": round(s, 5)}
                for b, s, lab in zip(boxes, scores, labels)
            )
        if out_dir is not None:
            _write_drawing(out_dir, p, img, pred, names if res_path is None else None)
        per_image.append({"image": str(p), "image_id": image_id, "detections": len(boxes),
                          "json": str(out_dir / f"{p.stem}.json") if res_path is None else None})  # fmt: skip
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
