"""Small hand-made COCO / LVIS ground truth and detections, shared by the data and eval tests.

Everything here is plain data built independently of ``ovd``: the tests compare what ``ovd``
computes from these files with what the official APIs compute from the same files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import traceback
from pathlib import Path
from types import ModuleType

from safetensors import safe_open

from ovd.config_schema import WorldConfig
from ovd.mini_world.knobs import WORLD_KNOBS

REPO = Path(__file__).resolve().parents[1]

# The OVR-CNN / ViLD COCO open-vocabulary split as published (COCO 2017 spellings), written out here
# independently of ovd.data.splits so the tests check ovd's copy against it.
OFFICIAL_NOVEL_17 = {
    "airplane": 5, "bus": 6, "cat": 17, "dog": 18, "cow": 21, "elephant": 22, "umbrella": 28, "tie": 32,
    "snowboard": 36, "skateboard": 41, "cup": 47, "knife": 49, "cake": 61, "couch": 63, "keyboard": 76,
    "sink": 81, "scissors": 87,
}  # fmt: skip
OFFICIAL_BASE_48 = {
    "person": 1, "bicycle": 2, "car": 3, "motorcycle": 4, "train": 7, "truck": 8, "boat": 9, "bench": 15,
    "bird": 16, "horse": 19, "sheep": 20, "bear": 23, "zebra": 24, "giraffe": 25, "backpack": 27,
    "handbag": 31, "suitcase": 33, "frisbee": 34, "skis": 35, "kite": 38, "surfboard": 42, "bottle": 44,
    "fork": 48, "spoon": 50, "bowl": 51, "banana": 52, "apple": 53, "sandwich": 54, "orange": 55,
    "broccoli": 56, "carrot": 57, "pizza": 59, "donut": 60, "chair": 62, "bed": 65, "toilet": 70, "tv": 72,
    "laptop": 73, "mouse": 74, "remote": 75, "microwave": 78, "oven": 79, "toaster": 80,
    "refrigerator": 82, "book": 84, "clock": 85, "vase": 86, "toothbrush": 90,
}  # fmt: skip
OFFICIAL_NEITHER_15 = {
    "traffic light": 10, "fire hydrant": 11, "stop sign": 13, "parking meter": 14, "sports ball": 37,
    "baseball bat": 39, "baseball glove": 40, "tennis racket": 43, "wine glass": 46, "hot dog": 58,
    "potted plant": 64, "dining table": 67, "cell phone": 77, "teddy bear": 88, "hair drier": 89,
}  # fmt: skip


def dump(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def load_make_eval_example() -> ModuleType:
    """Import tools/make_eval_example.py (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_eval_example", REPO / "tools" / "make_eval_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- COCO ------------------------------------------------------------------------------------------
# Non-contiguous ids so that an id/index mix-up shows. Split used with them: base = {alpha, beta},
# novel = {gamma, delta}, "omega" is in neither group, "empty" has no ground truth at all.
CATS = [(3, "alpha"), (7, "beta"), (11, "gamma"), (12, "delta"), (20, "omega"), (31, "empty")]
CAT_ID = {n: i for i, n in CATS}
SPLIT = {"base": ["alpha", "beta"], "novel": ["gamma", "delta"]}


def ann(ann_id: int, image_id: int, cat_id: int, bbox, **extra) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "bbox": list(bbox),
            "area": float(bbox[2] * bbox[3]), "iscrowd": 0, **extra}  # fmt: skip


def coco_gt(num_images: int = 5, seed: int = 1, with_omega: bool = True) -> dict:
    """A few images with boxes of every size range (small / medium / large) for the first 5 categories."""
    rng = random.Random(seed)
    images = [{"id": 100 + k, "file_name": f"img{k}.jpg", "width": 320, "height": 240} for k in range(num_images)]
    anns: list[dict] = []
    names = ["alpha", "beta", "gamma", "delta"] + (["omega"] if with_omega else [])
    for im in images:
        for name in names:
            for _ in range(rng.randint(1, 2)):
                side = rng.choice([20.0, 60.0, 120.0])  # small, medium, large for COCO area ranges
                w, h = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
                x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
                anns.append(ann(len(anns) + 1, im["id"], CAT_ID[name], [round(v, 2) for v in (x, y, w, h)]))
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": n} for i, n in CATS]}


def det(a: dict, score: float, cat_id: int | None = None, shift: float = 0.0) -> dict:
    """A detection on annotation ``a``'s box, shifted by ``shift`` of its width/height."""
    x, y, w, h = a["bbox"]
    return {"image_id": a["image_id"], "category_id": a["category_id"] if cat_id is None else cat_id,
            "bbox": [x + shift * w, y + shift * h, w, h], "score": score}  # fmt: skip


def false_positives(gt: dict, n: int, seed: int, cat_ids: list[int]) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = rng.choice(gt["images"])
        w, h = rng.uniform(10, 80), rng.uniform(10, 80)
        out.append({"image_id": im["id"], "category_id": rng.choice(cat_ids),
                    "bbox": [rng.uniform(0, 320 - w), rng.uniform(0, 240 - h), w, h],
                    "score": round(rng.uniform(0.05, 0.95), 3)})  # fmt: skip
    return out


def scenario(gt: dict, kind: str, seed: int = 0) -> list[dict]:
    """Detections for ``gt``: perfect | partial | confused | false_pos | mixed."""
    rng = random.Random(seed)
    anns = gt["annotations"]
    ids = [i for i, _ in CATS]
    if kind == "perfect":
        return [det(a, round(rng.uniform(0.5, 1.0), 3)) for a in anns]
    if kind == "partial":  # a third missed, a third badly localised (IoU below 0.5 / around 0.7)
        out = []
        for k, a in enumerate(anns):
            if k % 3 == 0:
                continue
            shift = 0.0 if k % 3 == 1 else rng.choice([0.1, 0.2, 0.4])
            out.append(det(a, round(rng.uniform(0.2, 1.0), 3), shift=shift))
        return out
    if kind == "confused":  # every box exact but labelled with another category
        out = []
        for a in anns:
            wrong = [i for i in ids if i != a["category_id"]]
            out.append(det(a, round(rng.uniform(0.2, 1.0), 3), cat_id=rng.choice(wrong)))
        return out
    if kind == "false_pos":  # perfect detections plus high- and low-scoring false positives
        return scenario(gt, "perfect", seed) + false_positives(gt, 12, seed + 1, ids)
    if kind == "mixed":
        out = scenario(gt, "partial", seed)
        out += [det(a, 0.55, cat_id=CAT_ID["alpha"]) for a in anns[1::4] if a["category_id"] != CAT_ID["alpha"]]
        return out + false_positives(gt, 8, seed + 2, ids)
    raise ValueError(kind)


# --- LVIS ------------------------------------------------------------------------------------------
LVIS_CATS = [(1, "aardvark", "r"), (2, "abacus", "c"), (4, "accordion", "f"), (5, "acorn", "r"),
             (9, "airbag", "f"), (10, "alarm", "c"), (13, "alcohol", "r")]  # fmt: skip


def lvis_gt(num_images: int = 6, seed: int = 3) -> dict:
    """LVIS-format GT: per-image negative and not-exhaustive category lists, r/c/f frequencies."""
    rng = random.Random(seed)
    cat_ids = [c[0] for c in LVIS_CATS]
    images, anns = [], []
    for k in range(num_images):
        img_id = 500 + k
        present = rng.sample(cat_ids[:-1], 3)  # category 13 never has ground truth
        rest = [c for c in cat_ids if c not in present]
        neg = rest[: len(rest) // 2 + 1]
        not_ex = [present[0]] if k % 2 else []
        images.append({"id": img_id, "file_name": f"l{k}.jpg", "width": 400, "height": 300,
                       "neg_category_ids": neg, "not_exhaustive_category_ids": not_ex})  # fmt: skip
        for c in present:
            for _ in range(rng.randint(1, 2)):
                side = rng.choice([25.0, 70.0, 150.0])
                w, h = side * rng.uniform(0.8, 1.2), side * rng.uniform(0.8, 1.2)
                x, y = rng.uniform(0, 400 - w), rng.uniform(0, 300 - h)
                a = ann(len(anns) + 1, img_id, c, [round(v, 2) for v in (x, y, w, h)])
                del a["iscrowd"]
                anns.append(a)
    cats = [{"id": i, "name": n, "frequency": f, "synset": f"{n}.n.01"} for i, n, f in LVIS_CATS]
    return {"images": images, "annotations": anns, "categories": cats}


def lvis_dets(gt: dict, seed: int = 4) -> list[dict]:
    """Found, mislocalised, missed and confused boxes plus false positives on negative categories."""
    rng = random.Random(seed)
    out = []
    for k, a in enumerate(gt["annotations"]):
        r = k % 4
        if r == 0:
            out.append(det(a, round(rng.uniform(0.5, 1.0), 3)))
        elif r == 1:
            out.append(det(a, round(rng.uniform(0.2, 0.9), 3), shift=rng.choice([0.1, 0.35])))
        elif r == 2:
            other = [c[0] for c in LVIS_CATS if c[0] != a["category_id"]]
            out.append(det(a, round(rng.uniform(0.2, 0.9), 3), cat_id=rng.choice(other)))
    for im in gt["images"]:
        for c in im["neg_category_ids"][:2]:
            out.append({"image_id": im["id"], "category_id": c, "bbox": [10.0, 20.0, 50.0, 40.0],
                        "score": round(rng.uniform(0.1, 0.8), 3)})  # fmt: skip
    return out


def visible_lines(text: str) -> list[str]:
    """The non-empty lines a terminal would show: within a line, a carriage return (a progress bar
    redrawing or erasing itself) leaves only what was written after it."""
    return [ln.split("\r")[-1].strip() for ln in text.split("\n") if ln.split("\r")[-1].strip()]


def run_err(capsys, *argv: str) -> str:
    """Run the CLI expecting a user error: exit 2 and stderr exactly one ``ovd: error: ...`` line —
    nothing else shown (no traceback, warning or leftover progress bar)."""
    from ovd.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2, f"expected exit status 2, got {rc}; stderr: {err[-500:]}"
    lines = visible_lines(err)
    assert len(lines) == 1 and lines[0].startswith("ovd: error: ") and "Traceback" not in err, err[-800:]
    return lines[0]


def tiny_clip_cfg(embed_dim: int = 32, layers: int = 1, width: int = 32, vision_layers: int | None = None) -> dict:
    """The open_clip config of a tiny CLIP: 32-px images, ``layers`` transformer blocks per tower
    (``vision_layers`` overrides the image tower's), image-tower ``width``."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": 32, "layers": layers if vision_layers is None else vision_layers, "width": width,
            "head_width": 32, "patch_size": 8,
        },
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": layers},
    }  # fmt: skip


#: the tiny CLIP of the CLIP, adapter, miner and feature-cache tests: two blocks per tower, a 64-wide image tower
TWO_BLOCK_CLIP = {"layers": 2, "width": 64}


def tiny_clip_dir(folder, embed_dim: int = 32, seed: int = 0, **size):
    """A randomly initialised tiny open_clip CLIP saved as a local-dir model (a real checkpoint).
    ``size``: :func:`tiny_clip_cfg`'s ``layers`` / ``width`` / ``vision_layers`` (default 1 layer, width 32)."""
    import open_clip
    import torch

    from ovd.vlm.clip import save_local_dir

    torch.manual_seed(seed)
    cfg = tiny_clip_cfg(embed_dim, **size)
    return save_local_dir(
        open_clip.model.CLIP(**cfg), folder, cfg, 32, open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
    )


def subset_json(src, dst, n: int):
    """The first ``n`` images of a COCO file (and their annotations) written to ``dst``."""
    data = json.loads(Path(src).read_text())
    keep = {im["id"] for im in data["images"][:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    Path(dst).write_text(json.dumps(data))
    return Path(dst)


def run_until(cfg, iteration: int) -> dict:
    """Run training up to ``iteration`` (``train.max_iters``: the supported way to stop early),
    as a killed run would have left it: last.pt there, no final.pt."""
    from ovd.engine.trainer import run_train

    cfg.train.max_iters = iteration
    try:
        report = run_train(cfg, progress=False)
    finally:
        cfg.train.max_iters = 0
    assert not report["complete"] and report["iterations"] == iteration
    return report


# The session's mini_world fixture is v2 (see conftest.py); the smoke preset's world knobs exist for
# v3 only, so a run on it sets them back to their defaults.
V2_WORLD = ["world.version=2", *(f"world.{k}={getattr(WorldConfig(), k)}" for k in WORLD_KNOBS)]

# A seconds-sized `ovd run` (tiny CLIP, few iterations, v2 world) for the pipeline tests.
SMALL = [
    *V2_WORLD,
    "pretrain.epochs=1",
    "pretrain.vision_layers=1",
    "pretrain.text_layers=1",
    "pretrain.vision_width=32",
    "pretrain.text_width=32",
    "pretrain.vision_head_width=32",
    "pretrain.text_heads=2",
    "pretrain.embed_dim=32",
    "adapter.epochs=1",
    "adapter.max_crops=64",
    "miner.topk=5",
    "model.min_size=96",
    "model.max_size=96",
    "model.box_batch_size_per_image=32",
    "train.batch_size=2",
    "train.epochs=1",  # 100 train images: 50 iterations
    "train.warmup_iters=1",
]


def flip_last_bytes(path) -> None:
    """Corrupt a safetensors chunk inside its last tensor: header and size stay as they were, so
    only a full check (re-hashing the tensors) can notice."""
    raw = bytearray(Path(path).read_bytes())
    raw[-3] ^= 0xFF
    Path(path).write_bytes(bytes(raw))


# --- forked commands (crash-point tests) ---------------------------------------------------------------
def run_child(argv: list[str], crash_at: int | None = None, crash_log: Path | None = None) -> int:
    """``ovd ARGV`` in a forked process: its exit status, or minus the signal that killed it."""
    pid = os.fork()
    if pid == 0:  # child
        rc = 99
        try:
            import ovd.utils.io as io

            io._crash_count = 0
            for key, val in (("OVD_CRASH_AT", crash_at), ("OVD_CRASH_LOG", crash_log)):
                os.environ.pop(key, None)
                if val is not None:
                    os.environ[key] = str(val)
            from ovd.cli import main

            rc = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def crash_points(argv: list[str], log: Path) -> list[str]:
    """The crash points of one uninterrupted run of ``argv`` (which completes it)."""
    log.unlink(missing_ok=True)
    assert run_child(argv, crash_log=log) == 0
    return [ln.split(" ", 1)[1] for ln in log.read_text().splitlines()]


# --- a tiny open-vocabulary detector and its targets (the model tests) ------------------------------------
TINY_D = 32  # region / text embedding dimension
TINY_GT = [
    [[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 100.0, 70.0], [20.0, 80.0, 70.0, 120.0]],
    [[5.0, 5.0, 40.0, 40.0], [50.0, 50.0, 120.0, 110.0]],
]
TINY_LABELS = [[1, 3, 4], [2, 1]]


def tiny_detector(seed: int = 0, *, fpn_channels: int = 256, representation_size: int = 1024, vocabulary: int = 0,
                  **kwargs):  # fmt: skip
    """An OVFasterRCNN on 128 px images (ResNet-18 FPN, all layers trainable, score threshold 0),
    initialised from ``seed``; ``vocabulary``: that many random class texts (fixed, seed 9);
    ``kwargs`` go to OVFasterRCNN (``distill_weight``, ``semantic_regression``, ``mask_head``, ...)."""
    import torch

    from ovd.modeling.backbones import build_backbone
    from ovd.modeling.detector import OVFasterRCNN

    torch.manual_seed(seed)
    bb, anchors = build_backbone("resnet18_fpn_small", trainable_layers=5, fpn_channels=fpn_channels)
    settings = dict(min_size=128, max_size=128, rpn_batch_size_per_image=32, box_batch_size_per_image=32,
                    box_score_thresh=0.0, representation_size=representation_size)  # fmt: skip
    m = OVFasterRCNN(bb, TINY_D, anchor_sizes=anchors, **{**settings, **kwargs})
    if vocabulary:
        m.set_vocabulary(torch.randn(vocabulary, TINY_D, generator=torch.Generator().manual_seed(9)))
    return m


def tiny_images(n: int = 2, size: int = 128) -> list:
    import torch

    return [torch.rand(3, size, size, generator=torch.Generator().manual_seed(s)) for s in (2, 3)[:n]]


def tiny_targets(distill: bool = False, masks: bool = False, size: int = 128) -> list[dict]:
    """Targets of :func:`tiny_images` (boxes for 128 px; ``size`` scales them): ``distill`` adds two
    cached distillation boxes per image, ``masks`` an ellipse inscribed in each box (uint8 N x H x W)."""
    import torch

    out = []
    for boxes, labels in zip(TINY_GT, TINY_LABELS):
        b = torch.tensor(boxes) * size / 128
        t = {"boxes": b, "labels": torch.tensor(labels)}
        if masks:
            y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
            c = ((b[:, :2] + b[:, 2:]) / 2)[:, :, None, None]  # (N, 2, 1, 1) centres x, y
            r = ((b[:, 2:] - b[:, :2]) / 2)[:, :, None, None]  # radii
            inside = ((x - c[:, 0]) / r[:, 0]) ** 2 + ((y - c[:, 1]) / r[:, 1]) ** 2
            t["masks"] = (inside <= 1).to(torch.uint8)
        out.append(t)
    if distill:
        g = torch.Generator().manual_seed(1)
        for t in out:
            t.update(
                distill_boxes=torch.tensor([[0.0, 0.0, 30.0, 30.0], [40.0, 40.0, 90.0, 100.0]]) * size / 128,
                distill_embeddings=torch.randn(2, TINY_D, generator=g),
                distill_weights=torch.tensor([1.0, 0.5]),
            )
    return out


KILLED = -signal.SIGKILL  # run_child's status of a command killed at a crash point


def temp_files(folder: Path) -> list[str]:
    """Temporary files a writer left anywhere under ``folder``."""
    return sorted(p.name for p in folder.rglob("*.tmp"))


def folder_state(folder: Path) -> dict:
    """Every file of a cache folder as content: JSON parsed; safetensors as (metadata, tensors as
    bytes) — safetensors writes its metadata map in an order that changes from process to process."""
    out = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix == ".safetensors":
            with safe_open(str(p), framework="pt") as f:
                out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
        else:
            out[p.name] = json.loads(p.read_text())
    return out


# --- child processes (torchrun) ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """The environment of a child ``ovd`` process: one thread, this checkout first on the path, and
    none of an enclosing torchrun's variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# --- the official COCO / LVIS evaluation APIs, called directly (what ovd eval must equal) ----------------
def coco_direct(gt_path, dets_path, cat_ids, iou_type: str = "bbox") -> tuple[float, float]:
    """pycocotools' AP and AP50 over ``cat_ids``."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
        res = coco.loadRes(str(dets_path))
        ev = COCOeval(coco, res, iou_type)
        ev.params.catIds = list(cat_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def lvis_direct(gt_path, dets: list[dict], cat_ids=None, iou_type: str = "bbox") -> dict:
    """The lvis API's results (``LVISEval``) over ``cat_ids`` (all when None)."""
    import copy
    import warnings

    import lvis

    from ovd.evaluation.lvis_compat import patch_lvis

    patch_lvis()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = lvis.LVISEval(str(gt_path), copy.deepcopy(dets), iou_type)
        if cat_ids is not None:
            ev.params.cat_ids = sorted(cat_ids)
        ev.run()
    return dict(ev.get_results())


def same(ours, official: float) -> bool:
    """Our value equals the official one; the APIs' -1 ("no ground truth") is our None."""
    import pytest

    if official < 0:
        return ours is None
    return ours is not None and ours == pytest.approx(official, abs=1e-12)
