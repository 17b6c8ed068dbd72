"""Training and testing the open-vocabulary detector (one process, or data-parallel under torchrun).

Exact resume: a checkpoint holds model, optimizer, scheduler, the iteration counter and torch's RNG
state (torchvision's RPN/RoI samplers draw from it); the image order of epoch e is a permutation
seeded by (seed, e) and the flip of sample i in epoch e by (seed, e, i). A run resumed from a
checkpoint therefore replays exactly the batches and random draws of an uninterrupted run.
Checkpoints are ``torch.save`` dicts of tensors and numbers, read with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ovd.errors import OvdError
from ovd.utils.io import atomic_path, crash_point, remove_stale_temps, write_json
from ovd.utils.lock import OutputLock

CKPT_FORMAT = "ovd-detector/1"


# --- data --------------------------------------------------------------------------------------------
class DetectionTrainSet(torch.utils.data.Dataset):
    """Images + GT of the vocabulary's classes (labels 1..C in vocabulary order) + cached distillation
    boxes/embeddings/weights from a :class:`~ovd.mining.feature_cache.FeatureCache`."""

    def __init__(self, dataset, class_ids: list[int], cache=None):
        self.dataset = dataset
        self.index = {c: i + 1 for i, c in enumerate(class_ids)}
        self.cache = cache

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, i: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
        from ovd.data.images import load_image

        rec = self.dataset.record(i)
        image = load_image(rec["path"])
        keep = [j for j, c in enumerate(rec["labels"]) if c in self.index]
        t = {
            "boxes": torch.tensor([rec["boxes"][j] for j in keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.index[rec["labels"][j]] for j in keep], dtype=torch.int64),
            "image_id": rec["image_id"],
        }
        if self.cache is not None:
            c = self.cache.get(rec["image_id"])
            t["distill_boxes"], t["distill_embeddings"], t["distill_weights"] = (
                c["boxes"],
                c["embeddings"],
                c["weights"],
            )
        if flip:
            w = image.shape[-1]
            image = image.flip(-1)
            for k in ("boxes", "distill_boxes"):
                if k in t and len(t[k]):
                    b = t[k].clone()
                    b[:, [0, 2]] = w - t[k][:, [2, 0]]
                    t[k] = b
        return image, t


# --- model -------------------------------------------------------------------------------------------
def build_model(m, embed_dim: int):
    from ovd.modeling.detector import OVFasterRCNN, build_backbone

    backbone, anchors = build_backbone(
        m.backbone, m.trainable_layers, m.backbone_weights or None, norm=m.norm, fpn_channels=m.fpn_channels
    )
    return OVFasterRCNN(
        backbone,
        embed_dim,
        anchor_sizes=anchors,
        semantic_regression=m.semantic_regression,
        distill_weight=m.distill_weight if m.distill else 0.0,
        representation_size=m.representation_size,
        **torchvision_kwargs(m),
    )


def torchvision_kwargs(m) -> dict:
    """The ``model`` settings that go to torchvision's ``FasterRCNN`` unchanged (also used by the
    speed benchmark's stock model, so both are built alike)."""
    return {
        "min_size": m.min_size,
        "max_size": m.max_size,
        "box_score_thresh": m.box_score_thresh,
        "box_detections_per_img": m.box_detections_per_img,
        "box_batch_size_per_image": m.box_batch_size_per_image,
        "rpn_post_nms_top_n_train": m.rpn_post_nms_top_n_train,
        "rpn_post_nms_top_n_test": m.rpn_post_nms_top_n_test,
    }


def schedule_epochs(t) -> tuple[int, list[int]]:
    """Named schedule → (epochs, lr-step epochs). "1x" = 12 epochs, steps at 8 and 11; "2x" doubles."""
    if not t.schedule:
        return t.epochs, list(t.lr_steps)
    mt = re.fullmatch(r"(\d+(?:\.\d+)?)x", t.schedule)
    if not mt:
        raise OvdError(
            f"train.schedule '{t.schedule}' is not a named length like 1x, 2x, 0.5x (or '' to use train.epochs)"
        )
    f = float(mt.group(1))
    return max(1, round(12 * f)), [max(1, round(8 * f)), max(1, round(11 * f))]


def _lr_lambda(warmup: int, steps_iters: list[int]):
    def f(it: int) -> float:
        warm = min(1.0, (it + 1) / warmup) if warmup > 0 else 1.0
        return warm * 0.1 ** sum(it >= s for s in steps_iters)

    return f


class TextSource:
    """Class names → unit text embeddings: the CLIP text tower, or a stored vocabulary file
    (``clip.text_embeddings``, made by :func:`ovd.vlm.clip.save_text_embeddings`; like Detic's
    zero-shot weight files, it spares loading CLIP just to embed a fixed vocabulary)."""

    def __init__(self, c):
        self.templates = list(c.templates)
        self.file = c.text_embeddings
        self._clip = None
        self.c = c
        if self.file:
            from ovd.vlm.clip import load_text_embeddings

            self.stored, self.names = load_text_embeddings(self.file)
            self.embed_dim = int(self.stored.shape[1])
            self.source = f"text-embeddings:{Path(self.file).resolve()}"
            self.fingerprint = file_sha1(self.file)[:16]  # the stored vectors themselves
        else:
            self.embed_dim = self.clip.embed_dim
            self.source = self.clip.source
            self.fingerprint = self.clip.fingerprint()  # the weights (see ClipModel.fingerprint)

    @property
    def clip(self):
        if self._clip is None:
            from ovd.vlm.clip import clip_from_config

            self._clip = clip_from_config(self.c)
        return self._clip

    def encode(self, names: list[str]) -> torch.Tensor:
        if not self.file:
            return self.clip.encode_text(names, self.templates)
        missing = [n for n in names if n not in self.names]
        if missing:
            raise OvdError(f"text embeddings {self.file} have no entry for: {', '.join(missing[:5])}")
        return self.stored[[self.names.index(n) for n in names]]

    def check_dim(self, dim: int, what: str) -> None:
        if dim != self.embed_dim:
            raise OvdError(
                f"{what} has {dim}-d embeddings but the text embeddings ({self.source}) are {self.embed_dim}-d: "
                f"they were made with a different CLIP"
            )


def clip_spec(c) -> dict:
    """The CLIP a detector's text embeddings come from, with local paths made absolute, so that
    ``Detector.from_checkpoint`` can prompt it from any working directory."""
    model, pretrained = c.model, c.pretrained
    if model.startswith("local-dir:"):
        model = "local-dir:" + str(Path(model[len("local-dir:") :]).resolve())
    elif Path(model).is_dir():
        model = str(Path(model).resolve())
    if pretrained and Path(pretrained).is_file():
        pretrained = str(Path(pretrained).resolve())
    return {"model": model, "pretrained": pretrained}


# --- checkpoints -------------------------------------------------------------------------------------
def save_checkpoint(path, model, opt, sched, it: int, meta: dict, extra: dict | None = None) -> None:
    state = {
        "format": CKPT_FORMAT,
        "model": model.state_dict(),
        "optimizer": opt.state_dict() if opt is not None else {},
        "scheduler": sched.state_dict() if sched is not None else {},
        "iteration": it,
        "torch_rng": torch.get_rng_state(),
        "text": model.roi_heads.classifier.text.clone(),
        "meta_json": json.dumps(meta),
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path) -> dict:
    """Read an ``ovd train`` checkpoint (``weights_only=True``: tensors and plain data only) and check
    every field later code reads, so a damaged or hand-made file is one :class:`OvdError` naming the
    file and the field, never a ``KeyError`` deep inside model building."""
    from ovd.utils.checkpoint import check_detector_state, torch_load

    path = Path(path)
    state = torch_load(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise OvdError(f"{path} is not an ovd detector checkpoint")
    state["meta"] = check_detector_state(state, path)
    return state


# --- training ----------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise OvdError(f"train.device '{name}' is not a device (auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OvdError(f"train.device is '{name}' but no CUDA device is available (use cpu or auto)")
    return dev


def _dist_setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, device) — initialises torch.distributed when started by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _plain(section) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


def _val_root(cfg) -> str | None:
    return cfg.data.val_image_root or cfg.data.image_root or None


def _to(t: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}


def file_sha1(path) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB blocks (0.27 s for a 448 MB file, page-cached, on the
    2-core development machine: a few percent of parsing COCO's train JSON, which it runs beside)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _cache_generation(cache) -> str:
    """Identity of the committed feature-cache content: its ``generation`` where the cache records
    one, else a hash of its index (older caches)."""
    gen = getattr(cache, "generation", None)
    if gen is not None:
        return str(gen)
    return "index:" + hashlib.sha1(json.dumps(cache.index, sort_keys=True).encode()).hexdigest()[:16]


def run_inputs(cfg, train, split, text: TextSource, cache) -> dict:
    """Every input besides the model / train settings that shapes what a training run computes, as
    the flat ``key -> value`` map a resume must match: the seed (image order, flips, RoI sampling),
    the train annotations (resolved path + content hash), the image folder, the split's base classes,
    the text embeddings (source, weights fingerprint, templates) and, when distilling, the feature
    cache's content. Not the image files themselves (too costly to hash; their folder is recorded)."""
    root = train.image_root if train.image_root is not None else train.path.parent
    inputs = {
        "seed": int(cfg.seed),
        "data.train_json": str(Path(train.path).resolve()),
        "data.train_json.sha1": file_sha1(train.path),
        "data.image_root": str(Path(root).resolve()),
        "data.split.base_names": list(split.base_names),
        "clip.source": text.source if text.file else _clip_source(cfg.clip),
        "clip.fingerprint": text.fingerprint,
        "clip.templates": list(text.templates),
    }
    if cache is not None:
        inputs["feature_cache.generation"] = _cache_generation(cache)
    return inputs


def _clip_source(c) -> str:
    """``ClipModel.source`` with local paths made absolute (the same CLIP however it is spelled)."""
    spec = clip_spec(c)
    if spec["model"].startswith("local-dir:"):
        return spec["model"]
    if Path(spec["model"]).is_dir():
        return f"local-dir:{spec['model']}"
    return f"{spec['model']}/{spec['pretrained'] or 'random-init'}"


def _resume_keys(meta: dict) -> dict:
    """A checkpoint's meta as the flat map ``_check_resume`` compares (model.*, train.*, inputs)."""

    def section(name: str) -> dict:
        v = meta.get(name)
        return v if isinstance(v, dict) else {}

    return {
        **{f"model.{k}": v for k, v in section("model").items()},
        **{f"train.{k}": v for k, v in section("train_settings").items()},
        **section("inputs"),
    }


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_resume(meta: dict, stored: dict, path: Path) -> None:
    """Refuse to continue a checkpoint made from other inputs or settings: one error naming every
    differing key (``old -> new``). A checkpoint that does not record an input (made by an older
    ovd) cannot show it is the same run, so it is refused too."""
    old, new = _resume_keys(stored), _resume_keys(meta)
    missing = object()
    diffs = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, missing), new.get(k, missing)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list) and len(a) + len(b) > 8:  # e.g. class names
            gone, added = [x for x in a if x not in b], [x for x in b if x not in a]
            what = ", ".join(p for p in (f"without {_short(gone)}" if gone else "",
                                         f"with {_short(added)}" if added else "") if p) or "other order"  # fmt: skip
            diffs.append(f"{k}: {len(a)} -> {len(b)} entries ({what})")
        else:
            diffs.append(
                f"{k}: {'(not recorded)' if a is missing else _short(a)} -> {'(absent)' if b is missing else _short(b)}"
            )
    if diffs:
        raise OvdError(
            f"{path} was trained from other inputs or settings ({'; '.join(diffs)}): resuming would mix two "
            f"runs. Use another train.out, or delete {path} to start over"
        )


# settings that change what a run computes (resume must match); not: out, logging, eval cadence
_RUN_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule", "epochs", "lr_steps",
             "warmup_iters", "grad_clip", "hflip", "amp")  # fmt: skip


def run_train(cfg, progress: bool = True, stop_after: int | None = None) -> dict:
    """``ovd train`` with one writer per ``train.out``: rank 0 holds its lock for the whole run and
    first removes the temporary files of a killed predecessor (a checkpoint killed mid-write)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_train(cfg, progress, stop_after)
    out = Path(cfg.train.out)
    with OutputLock(out / ".lock", f"training run {out}"):
        for name in ("last.pt", "final.pt"):
            remove_stale_temps(out, name)
        return _run_train(cfg, progress, stop_after)


def _run_train(cfg, progress: bool = True, stop_after: int | None = None) -> dict:
    """``ovd train``: base-class training with CLIP distillation; resumes from ``train.out/last.pt``.

    Runs in one process, or data-parallel under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU): the
    batch of ``train.batch_size`` images is split across the processes, rank 0 writes checkpoints
    and logs. ``stop_after`` ends the run after that many iterations *of this call* (tests: a kill).
    """
    import torch.distributed as dist

    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split
    from ovd.mining.feature_cache import FeatureCache

    t = cfg.train
    rank, world, device = _dist_setup(_resolve_device(t.device))
    if t.batch_size % world:
        raise OvdError(f"train.batch_size {t.batch_size} does not split over {world} processes")
    use_amp = bool(t.amp) and device.type == "cuda"  # CPU float16 autocast is slower than float32 here
    torch.manual_seed(cfg.seed)
    train = load_detection_dataset(cfg.data.train_json, cfg.data.image_root or None, check_images=True)
    if not cfg.data.split:
        raise OvdError("train needs data.split: the detector is trained on its base classes")
    split = resolve_split(cfg.data.split, train.categories, source=str(train.path))
    clip = TextSource(cfg.clip)
    text = clip.encode(list(split.base_names))
    cache = FeatureCache(cfg.extract.out, embed_dim=clip.embed_dim) if cfg.model.distill else None
    data = DetectionTrainSet(train, list(split.base_ids), cache)
    model = build_model(cfg.model, clip.embed_dim).to(device)
    model.set_vocabulary(text)
    evaluator = _PeriodicEval(cfg, clip, device) if t.eval_every > 0 and rank == 0 else None

    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    elif t.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    else:
        raise OvdError(f"unknown train.optimizer '{t.optimizer}' (sgd | adamw)")
    epochs, step_epochs = schedule_epochs(t)
    iters_per_epoch = max(1, math.ceil(len(data) / t.batch_size))
    total = epochs * iters_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(t.warmup_iters, [e * iters_per_epoch for e in step_epochs])
    )
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    meta = {"base_names": list(split.base_names), "embed_dim": clip.embed_dim, "clip": clip.source,
            "clip_spec": clip_spec(cfg.clip), "model": _plain(cfg.model), "templates": list(cfg.clip.templates),
            "train_settings": {k: _plain(t)[k] for k in _RUN_KEYS},
            "inputs": run_inputs(cfg, train, split, clip, cache)}  # fmt: skip
    meta = json.loads(json.dumps(meta))  # plain lists / dicts, as they come back from a checkpoint
    out = Path(t.out)
    last = out / "last.pt"
    start = 0
    if last.is_file():
        state = load_checkpoint(last)
        _check_resume(meta, state["meta"], last)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("torch_rng_ranks") or [state["torch_rng"]]
        torch.set_rng_state(rngs[rank] if len(rngs) == world else state["torch_rng"])
        start = int(state["iteration"])
    elif world > 1:
        torch.manual_seed(cfg.seed * 1009 + rank)  # ranks sample different RoIs from the first step on

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    log = _JsonlLog(out / "log.jsonl", start) if rank == 0 else None
    eval_log = _JsonlLog(out / "eval.jsonl", start) if evaluator else None
    bar = tqdm(total=total, initial=start, desc="train", disable=not progress or rank != 0)
    t0 = time.time()
    it = start
    try:
        while it < total:
            epoch, k = divmod(it, iters_per_epoch)
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            # the last batch of an epoch is filled up from the epoch's start: every batch is full,
            # so every process always has its share (DDP) and the gradient scale never jumps
            idx = [int(order[j % len(data)]) for j in range(k * t.batch_size, (k + 1) * t.batch_size)][rank::world]
            images, targets = [], []
            for i in idx:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 100_003 + i)
                flip = t.hflip and bool(torch.rand(1, generator=g) < 0.5)
                image, target = data.get(i, flip)
                images.append(image.to(device))
                targets.append(_to(target, device))
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = ddp(images, targets)
            loss = sum(losses.values())
            values = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
            if world > 1:  # the logged numbers (and the divergence check) cover every process
                dist.all_reduce(values)
                values /= world
            if not torch.isfinite(values[0]):
                raise OvdError(f"training diverged at iteration {it} (loss {float(values[0])}): lower train.lr")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip > 0:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            scaler.step(opt)
            scaler.update()
            sched.step()
            it += 1
            if log:
                rec = {"iter": it, "epoch": epoch, "lr": opt.param_groups[0]["lr"], "loss": float(values[0])}
                rec.update({k2: round(float(v), 5) for k2, v in zip(losses, values[1:].tolist())})
                log.write(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}")
            if it % t.checkpoint_every == 0 or it == total:
                _save_all_ranks(last, model, opt, sched, scaler, it, meta, rank, world)
            if evaluator and (it % t.eval_every == 0 or it == total):
                eval_log.write({"iter": it, **evaluator(model, text)})
                model.train()
            if stop_after is not None and it - start >= stop_after and it < total:
                raise KeyboardInterrupt(f"stopped after {stop_after} iterations (simulated interruption)")
        if world > 1:
            _check_replicas_agree(model)
    finally:
        bar.close()
        for lg in (log, eval_log):
            if lg:
                lg.close()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
    final = out / "final.pt"
    if rank == 0:
        save_checkpoint(final, model, None, None, it, meta)
    return {"out": str(final), "rank": rank, "iterations": it, "seconds": round(time.time() - t0, 1),
            "world_size": world, "device": str(device), "amp": use_amp}  # fmt: skip


def _save_all_ranks(path, model, opt, sched, scaler, it, meta, rank, world) -> None:
    """Checkpoint on rank 0 with every rank's RNG state (exact resume of a DDP run)."""
    import torch.distributed as dist

    rngs = [torch.get_rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, torch.get_rng_state())
    if rank == 0:
        extra = {"torch_rng_ranks": rngs, "scaler": scaler.state_dict()}
        save_checkpoint(path, model, opt, sched, it, meta, extra=extra)
    if world > 1:
        dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from


def _check_replicas_agree(model) -> None:
    """DDP keeps replicas identical; verify it once at the end (a cheap checksum per rank)."""
    import torch.distributed as dist

    s = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).cpu()
    sums = [torch.zeros_like(s) for _ in range(dist.get_world_size())]
    dist.all_gather(sums, s)
    if any(not torch.allclose(x, sums[0], rtol=1e-9, atol=0) for x in sums):
        raise OvdError(f"data-parallel replicas diverged (parameter checksums {[float(x) for x in sums]})")


def _complete_line(line: str) -> bool:
    """False for the torn last line a killed process can leave (it is dropped, not parsed)."""
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


class _JsonlLog:
    """Append-only JSON-lines log; a resumed run first drops lines after its checkpoint's iteration."""

    def __init__(self, path: Path, start: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if _complete_line(ln) and json.loads(ln)["iter"] <= start]
            with atomic_path(path) as tmp:  # a kill here keeps the old log, which the next resume trims again
                tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        self.f = open(path, "a", encoding="utf-8")

    def write(self, rec: dict) -> None:
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        crash_point(f"{self.f.name} line")

    def close(self) -> None:
        self.f.close()


class _PeriodicEval:
    """Val AP (base + novel vocabulary) during training; the model is put back to training after."""

    def __init__(self, cfg, clip, device):
        from ovd.data.coco import load_detection_dataset
        from ovd.data.splits import resolve_split

        self.val = load_detection_dataset(
            cfg.data.val_json, _val_root(cfg), lvis=cfg.data.lvis, drop_degenerate=False, check_images=True
        )
        self.split = resolve_split(cfg.data.split, self.val.categories, source=str(self.val.path))
        names = list(self.split.base_names) + list(self.split.novel_names)
        self.text = clip.encode(names).to(device)
        self.ids = list(self.split.base_ids) + list(self.split.novel_ids)

    def __call__(self, model, train_text) -> dict:
        from ovd.evaluation import evaluate_detections

        model.set_vocabulary(self.text)
        try:
            dets = predict_dataset(model, self.val, self.ids, progress=False)
        finally:
            model.set_vocabulary(train_text)
        m = evaluate_detections(self.val, dets, split=self.split)
        return {k: m[k] for k in ("AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel") if k in m}


# --- testing -----------------------------------------------------------------------------------------
@torch.no_grad()
def predict_dataset(model, dataset, class_ids: list[int], progress: bool = True) -> list[dict]:
    """COCO result list of ``model`` on every image; labels 1..C map back to ``class_ids``."""
    from ovd.data.images import load_image

    model.eval()
    device = next(model.parameters()).device
    results = []
    for i in tqdm(range(len(dataset)), desc="test", disable=not progress):
        rec = dataset.record(i)
        out = model([load_image(rec["path"]).to(device)])[0]
        for b, s, lab in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
            results.append(
                {
                    "image_id": rec["image_id"],
                    "category_id": class_ids[lab - 1],
                    "bbox": [round(b[0], 2), round(b[1], 2), round(b[2] - b[0], 2), round(b[3] - b[1], 2)],
                    "score": round(s, 5),
                }
            )
    return results


def run_test(cfg, ckpt: str, out: str | None = None, progress: bool = True) -> dict:
    """``ovd test``: detections of the val set over base + novel names, then ``ovd eval`` metrics."""
    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split
    from ovd.engine.predictor import model_from_checkpoint
    from ovd.evaluation import evaluate_detections

    state = load_checkpoint(ckpt)
    val = load_detection_dataset(
        cfg.data.val_json, _val_root(cfg), lvis=cfg.data.lvis, drop_degenerate=False, check_images=True
    )
    split = resolve_split(cfg.data.split, val.categories, source=str(val.path))
    clip = TextSource(cfg.clip)
    names = list(split.base_names) + list(split.novel_names)
    model = model_from_checkpoint(state, ckpt)
    clip.check_dim(int(state["meta"]["embed_dim"]), f"detector {ckpt}")
    model.set_vocabulary(clip.encode(names))
    dets = predict_dataset(model, val, list(split.base_ids) + list(split.novel_ids), progress)
    out_dir = Path(out) if out else Path(ckpt).parent
    # metrics.json describes detections.json: the old one goes first, so that a run killed between
    # the two writes leaves new detections without metrics, never beside the old metrics
    (out_dir / "metrics.json").unlink(missing_ok=True)
    write_json(out_dir / "detections.json", dets, indent=None)
    metrics = evaluate_detections(val, dets, split=split)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
