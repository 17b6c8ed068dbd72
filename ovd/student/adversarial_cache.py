"""IKD's adversarial images made once per training image and kept on disk (``student.adversarial_source: cache``).

The released IKD code makes its adversarial set before training (``tools/ta_GT.py ... --gen_adv_aug``:
one DI-FGSM image per training image against the teacher and its GT, written as image files) and
reads it during training through the ordinary data pipeline. ``adversarial_source: step`` instead
makes fresh adversarial copies of every batch (5 teacher forward + backward passes per step); the
cache pays those passes once per image rather than once per image per epoch, and one cache serves
every student of the same teacher, attack settings and seed (the table's ``adv`` and ``both`` rows).

Layout: ``<student.adversarial_cache_dir>/<key>/<image_id>.png`` (8-bit RGB: the clean images are
8-bit and every DI-FGSM step moves a pixel by a multiple of the 2/255 step inside the 8/255 ball, so
the rounding is exact up to float error) and ``complete.json`` written last. ``key`` hashes the
teacher file, the attack settings, the seed and the training images, so a changed input never
reads a stale image. A killed build resumes: each image file is written atomically and a batch whose
files all exist is not made again; each batch's random draws come from (seed, batch index) alone.

During training a batch's adversarial images are the cached images of its image ids, flipped when
the loader flipped the clean image (found by which orientation lies within eps of the clean batch
image: a cached image that matches neither is one error, not a silent mismatch). They are looked
up before the frequency augmentation, whose noise and crop therefore reach only the clean images,
as the released code's separate adversarial pipeline never sees them either.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ovd.data.images import load_image, tensor_to_pil
from ovd.errors import OvdError
from ovd.student.augment import attack_settings, difgsm
from ovd.utils.io import atomic_path, file_sha1, read_json, write_json

ATTACK_KEYS = ("adversarial_eps", "adversarial_step", "adversarial_steps", "adversarial_decay",
               "adversarial_resize_rate", "adversarial_diversity_prob")  # fmt: skip
COMPLETE = "complete.json"
FORMAT = "ovd-adversarial-cache/1"


def cache_key(teacher_path: str, s, seed: int, image_ids: list) -> dict:
    """What the cached images depend on, and its 16-hex-digit digest (the folder name)."""
    inputs = {
        "format": FORMAT,
        "teacher.sha1": file_sha1(teacher_path),
        **{f"student.{k}": float(getattr(s, k)) for k in ATTACK_KEYS},
        "seed": int(seed),
        "images": hashlib.sha1(json.dumps([str(i) for i in image_ids]).encode()).hexdigest(),
    }
    return {"key": hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16], "inputs": inputs}


class AdversarialCache:
    """One cache folder: :meth:`build` fills it, :meth:`batch` reads a training batch's images."""

    def __init__(self, root: str | Path, teacher_path: str, s, seed: int, image_ids: list):
        k = cache_key(teacher_path, s, seed, image_ids)
        self.folder = Path(root) / k["key"]
        self.inputs, self.s, self.seed = k["inputs"], s, int(seed)
        self.eps = float(s.adversarial_eps) / 255

    def path(self, image_id) -> Path:
        return self.folder / f"{image_id}.png"

    @property
    def complete(self) -> bool:
        f = self.folder / COMPLETE
        return f.is_file() and read_json(f).get("inputs") == self.inputs

    def build(self, teacher: torch.nn.Module, data, batch_size: int, device: torch.device,
              progress: bool = True) -> dict:  # fmt: skip
        """Make the adversarial image of every image of ``data`` (a DetectionTrainSet, unflipped) that
        is not on disk yet. Returns {"images", "made", "seconds", "folder"}."""
        t0 = time.time()
        n = len(data)
        if self.complete:
            return {"images": n, "made": 0, "seconds": 0.0, "folder": str(self.folder)}
        self.folder.mkdir(parents=True, exist_ok=True)
        made = 0
        starts = range(0, n, batch_size)
        for b in tqdm(starts, desc="adversarial images", disable=not progress, unit="batch"):
            idx = list(range(b, min(n, b + batch_size)))
            if all(self.path(data.dataset.images[i]["id"]).is_file() for i in idx):  # a resumed build
                continue
            items = [data.get(i, False) for i in idx]
            g = torch.Generator().manual_seed(self.seed * 1_000_033 + b // batch_size)
            images = [x.to(device) for x, _ in items]
            targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for _, t in items]
            adv = difgsm(teacher, images, targets, g, **attack_settings(self.s))
            for x, (_, t) in zip(adv, items):
                with atomic_path(self.path(t["image_id"])) as tmp:
                    tensor_to_pil(x).save(tmp, format="PNG")
                made += 1
        write_json(self.folder / COMPLETE, {"inputs": self.inputs, "images": n})
        return {"images": n, "made": made, "seconds": round(time.time() - t0, 1), "folder": str(self.folder)}

    def batch(self, images: list, targets: list) -> list[torch.Tensor]:
        """The cached adversarial images of a training batch (clean, possibly flipped images), oriented
        like them; one OvdError when one is missing or matches neither orientation."""
        out = []
        for x, t in zip(images, targets):
            p = self.path(t["image_id"])
            if not p.is_file():
                raise OvdError(f"adversarial cache {self.folder} has no image for image id {t['image_id']}: "
                               "delete the folder to rebuild it")  # fmt: skip
            a = load_image(p).to(x.device)
            if a.shape != x.shape:
                raise OvdError(f"cached adversarial image {p} is {tuple(a.shape)}, its training image "
                               f"{tuple(x.shape)}: delete {self.folder} to rebuild it")  # fmt: skip
            d0, d1 = (a - x).abs().amax().item(), (a.flip(-1) - x).abs().amax().item()
            if min(d0, d1) > self.eps + 1.5 / 255:  # 8-bit rounding of both images
                gap = 255 * min(d0, d1)
                raise OvdError(f"cached adversarial image {p} is not within eps of its training image (max "
                               f"difference {gap:.1f}/255): delete {self.folder} to rebuild it")  # fmt: skip
            out.append(a.flip(-1) if d1 < d0 else a)
        return out
