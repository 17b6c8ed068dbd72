"""Building a world: argument checks, reuse of a matching world, the atomic write into place, and the
orchestration (plan the images, render them, write the JSON files and ``world.json``)."""

from __future__ import annotations

import os
import secrets
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ovd.data.fewshot import fewshot_subset
from ovd.errors import OvdError
from ovd.mini_world.annotations import ANNOTATION_VERSION, det_annotation_files, lvis_val
from ovd.mini_world.knobs import WorldKnobs, check_knobs
from ovd.mini_world.presets import MiniPreset
from ovd.mini_world.tasks import det_layout, run_tasks
from ovd.mini_world.versions import (
    GENERATOR_VERSION,
    check_version,
    coco_categories,
    mini_split,
    mini_vocabulary,
    presets,
)
from ovd.utils.io import read_json, write_json

_WORLD_FILES = (
    "world.json",
    "split.json",
    "web/train.json",
    "web/val.json",
    "det/train.json",
    "det/train_oracle.json",
    "det/val.json",
    "det/val_lvis.json",
)


def _check_args(preset: Any, seed: Any, version: Any) -> MiniPreset:
    table = presets(check_version(version))
    if not isinstance(preset, str) or preset not in table:
        raise OvdError(f"unknown mini-world preset {preset!r}; expected one of: {', '.join(table)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise OvdError(f"mini-world seed must be a non-negative integer, got {seed!r}")
    return table[preset]


def _existing_world(out: Path, p: MiniPreset, seed: int, version: int, knobs: WorldKnobs) -> dict | None:
    """The summary of a complete matching world in ``out``, else None. A world built with older
    annotations (``annotation_version`` below :data:`ANNOTATION_VERSION`) is refused with the way to
    rebuild it: its images are the same, its segmentations are not."""
    wj = out / "world.json"
    if not wj.is_file():
        return None
    try:
        world = read_json(wj, "mini-world description")
    except OvdError:
        return None
    if not isinstance(world, dict) or (world.get("version"), world.get("preset"), world.get("seed")) != (
        version,
        p.name,
        int(seed),
    ):
        return None
    if world.get("knobs", {}) != knobs.changed():
        return None
    if world.get("annotation_version", 1) != ANNOTATION_VERSION:
        raise OvdError(
            f"mini-world {out} was built with annotation version {world.get('annotation_version', 1)} "
            f"(each object's segmentation its box); this ovd writes version {ANNOTATION_VERSION} (the visible "
            f"silhouette). Rebuild it with overwrite=True (ovd data mini --overwrite): the images stay the same"
        )
    files = list(_WORLD_FILES) + [f"det/fewshot/{k}shot_seed{s}.json" for k in p.fewshot_shots for s in p.fewshot_seeds]
    if not all((out / f).is_file() for f in files):
        return None
    return world.get("summary")


def generate_mini_world(
    out_dir: str | os.PathLike,
    preset: str = "smoke",
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    version: int = GENERATOR_VERSION,
    knobs: WorldKnobs | dict | None = None,
) -> dict:
    """Generate the mini-world into ``out_dir`` and return its summary (counts).

    ``version`` 3 (the default): 65 kinds with atomic names; 2: the 36 "<colour> <shape>" classes,
    byte-identical to what generator v2 wrote. If ``out_dir`` already holds a complete world of the
    same preset, seed and version,
    it is reused as is (its summary is returned; nothing is rewritten) unless ``overwrite`` is set.
    ``knobs`` (a :class:`WorldKnobs` or a dict of its fields; v3 only) change the world's properties
    (knobs.py); the defaults give the v3 world unchanged, and a world made with other values
    records them in ``world.json``, so it is reused only for the same knobs.
    A non-empty ``out_dir`` holding anything else is an error unless ``overwrite=True``, which
    replaces it. The world is written into a temporary sibling directory and renamed into place at
    the end, so an interrupted run never leaves a half-written world.
    """
    p = _check_args(preset, seed, version)
    knobs = check_knobs(knobs, version)
    seed = int(seed)
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise OvdError(f"mini-world output {out} exists and is not a directory")
    if out.is_dir() and not overwrite:
        summary = _existing_world(out, p, seed, version, knobs)
        if summary is not None:
            return summary
        if any(out.iterdir()):
            raise OvdError(
                f"mini-world output {out} is not empty and holds no complete '{preset}' world "
                f"with seed {seed} (world version {version}{_knobs_note(knobs)}); choose an empty directory "
                f"or pass overwrite=True (--overwrite) to replace it"
            )
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.tmp-{token}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        summary = _generate_into(tmp, p, seed, progress, version, knobs)
        if out.exists():
            old = out.parent / f".{out.name}.old-{token}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise OvdError(f"cannot write mini-world to {out}: {e.strerror or e} ({e.filename or out})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _knobs_note(knobs: WorldKnobs) -> str:
    return "".join(f", {k}={v}" for k, v in knobs.changed().items())


def _generate_into(root: Path, p: MiniPreset, seed: int, progress: bool, version: int, knobs: WorldKnobs) -> dict:
    """Render every image into ``root``, write the JSON files, and return the summary."""
    split = mini_split(version)
    vocab = mini_vocabulary(version, knobs)
    novel_names = set(split["novel"])
    novel_ids = [c["id"] for c in vocab if c["name"] in novel_names]
    categories = coco_categories(version, knobs)

    web_meta, web_tasks = _plan_web(root, p, seed, version, knobs)
    det_meta, det_tasks = _plan_det(root, p, seed, version, knobs)
    results = run_tasks(web_tasks + det_tasks, f"mini-world {p.name}", progress)

    _write_web(root, web_meta, results[: len(web_tasks)], categories)
    det_files, dropped = det_annotation_files(det_meta, results[len(web_tasks) :], p.name, seed, categories, novel_ids)
    for name in ("train", "train_oracle", "val"):
        write_json(root / "det" / f"{name}.json", det_files[name])
    lvis = lvis_val(det_files["val"], det_files["train"])
    write_json(root / "det" / "val_lvis.json", lvis)
    fewshot_summary = _write_fewshot(root, det_files["train_oracle"], novel_ids, p)
    write_json(root / "split.json", split)

    summary = {  # key order is the order in world.json
        "classes": len(vocab),
        "base_classes": len(split["base"]),
        "novel_classes": len(split["novel"]),
        **_web_summary(p, web_meta),
        **_det_summary(p, det_meta, det_files, set(novel_ids)),
        "det_dropped_objects": dropped,
        "lvis_frequency": _lvis_frequency(lvis),
        "fewshot": fewshot_summary,
    }
    changed = knobs.changed()
    write_json(
        root / "world.json",
        {
            "version": version,
            "annotation_version": ANNOTATION_VERSION,
            "preset": p.name,
            "seed": seed,
            "params": asdict(p),
            **({"knobs": changed} if changed else {}),  # a default world's file stays as it was
            "classes": vocab,
            "split": split,
            "summary": summary,
        },
    )
    return summary


def _task_knobs(vocab: list[dict], knobs: WorldKnobs) -> dict | None:
    """What a render task needs of the knobs: None for a default world (the renderers' defaults)."""
    return {"vocab": vocab, "web_style": knobs.web_style} if knobs.changed() else None


def _plan_web(
    root: Path, p: MiniPreset, seed: int, version: int, knobs: WorldKnobs
) -> tuple[dict[str, list[dict]], list[tuple]]:
    """Web image records per split (captions come from rendering) and their render tasks.

    Image i of a split shows class ``i mod n_classes``; the non-class images follow the class images.
    """
    vocab = mini_vocabulary(version, knobs)
    task_knobs = _task_knobs(vocab, knobs)
    n_cls = len(vocab)
    tasks: list[tuple] = []
    web_meta: dict[str, list[dict]] = {}
    n_train = knobs.web_per_class or p.web_train_per_class
    for sp, per_cls in (("train", n_train), ("val", p.web_val_per_class)):
        (root / "web" / "images" / sp).mkdir(parents=True)
        recs = []
        for i in range(per_cls * n_cls):
            cls = vocab[i % n_cls]
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append(
                {
                    "id": i + 1,
                    "file_name": fn,
                    "width": p.web_size,
                    "height": p.web_size,
                    "category_id": cls["id"],
                }
            )
            tasks.append(("web", seed, sp, i, cls, p, str(root / "web" / "images" / fn), version, task_knobs))
        n_class = per_cls * n_cls
        for j in range(round(p.web_background_frac * n_class)):
            i = n_class + j
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append({"id": i + 1, "file_name": fn, "width": p.web_size, "height": p.web_size, "category_id": 0})
            tasks.append(("web", seed, sp, i, None, p, str(root / "web" / "images" / fn), version, task_knobs))
        web_meta[sp] = recs
    return web_meta, tasks


def _plan_det(
    root: Path, p: MiniPreset, seed: int, version: int, knobs: WorldKnobs
) -> tuple[dict[str, list[dict]], list[tuple]]:
    """Detection image records per split and their render tasks (each with its scene's class ids)."""
    task_knobs = _task_knobs(mini_vocabulary(version, knobs), knobs)
    tasks: list[tuple] = []
    det_meta: dict[str, list[dict]] = {}
    for sp, n_img in (("train", p.det_train_images), ("val", p.det_val_images)):
        (root / "det" / "images" / sp).mkdir(parents=True)
        layout = det_layout(seed, sp, n_img, p, len(mini_vocabulary(version)))
        recs = []
        for i in range(n_img):
            fn = f"{sp}/{i + 1:06d}.png"
            recs.append({"id": i + 1, "file_name": fn, "width": p.det_size, "height": p.det_size})
            tasks.append(("det", seed, sp, i, layout[i], p, str(root / "det" / "images" / fn), version, task_knobs))
        det_meta[sp] = recs
    return det_meta, tasks


def _write_web(root: Path, web_meta: dict[str, list[dict]], captions: list[str], categories: list[dict]) -> None:
    """``web/{train,val}.json``: the records with their captions (in task order: train, then val)."""
    k = 0
    for sp in ("train", "val"):
        for rec in web_meta[sp]:
            rec["caption"] = captions[k]
            k += 1
        write_json(root / "web" / f"{sp}.json", {"images": web_meta[sp], "categories": categories})


def _write_fewshot(root: Path, oracle: dict, novel_ids: list[int], p: MiniPreset) -> dict:
    """``det/fewshot/<k>shot_seed<s>.json`` for every shot count and seed; returns their sizes."""
    fewshot_summary = {}
    for kk in p.fewshot_shots:
        for s in p.fewshot_seeds:
            fs = fewshot_subset(oracle, novel_ids, kk, s, f"mini-world {kk}-shot novel split, sampling seed {s}")
            write_json(root / "det" / "fewshot" / f"{kk}shot_seed{s}.json", fs)
            fewshot_summary[f"{kk}shot_seed{s}"] = {
                "images": len(fs["images"]),
                "annotations": len(fs["annotations"]),
            }
    return fewshot_summary


def _web_summary(p: MiniPreset, web_meta: dict[str, list[dict]]) -> dict:
    return {
        "web_image_size": p.web_size,
        "web_train_images": len(web_meta["train"]),
        "web_val_images": len(web_meta["val"]),
        "web_train_nonclass_images": sum(r["category_id"] == 0 for r in web_meta["train"]),
        "web_val_nonclass_images": sum(r["category_id"] == 0 for r in web_meta["val"]),
    }


def _det_summary(p: MiniPreset, det_meta: dict[str, list[dict]], det_files: dict[str, dict], novel_set: set) -> dict:
    oracle = det_files["train_oracle"]["annotations"]
    return {
        "det_image_size": p.det_size,
        "det_train_images": len(det_meta["train"]),
        "det_val_images": len(det_meta["val"]),
        "det_train_annotations": len(det_files["train"]["annotations"]),
        "det_train_objects": len(oracle),
        "det_train_novel_objects": sum(a["category_id"] in novel_set for a in oracle),
        "det_val_annotations": len(det_files["val"]["annotations"]),
    }


def _lvis_frequency(lvis: dict) -> dict[str, int]:
    freq = Counter(c["frequency"] for c in lvis["categories"])
    return {f: freq.get(f, 0) for f in ("r", "c", "f")}
