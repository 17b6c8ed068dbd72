"""The training loop of the open-vocabulary detector (one process, or data-parallel under torchrun).

:class:`Trainer` owns one run: step, periodic evaluation, checkpoint, resume. Two extension points
let a caller add to every step without editing the loop (the few-shot replay uses both):

* ``trainer.add_inputs(fn)``: ``fn(it, images, targets) -> dict`` of extra keyword arguments for the
  model's forward, e.g. ``{"extra_rois": ExtraRoIs(...)}`` (forged RoI features to replay);
* ``trainer.add_loss(name, fn)``: ``fn(it, model, losses) -> scalar tensor``, added to the loss
  dict under ``name`` before the sum, logged like the model's own terms (e.g. a penalty keeping
  weights near the base model's).

A caller that needs a run of a fixed length or with frozen submodules says so through
:func:`setup_trainer` (``steps``, ``eval_frozen``) and records its own inputs there (``inputs``: a
resume must match them), instead of changing the Trainer after it is built.

Exact resume: a checkpoint holds model, optimizer, scheduler, the iteration counter and torch's RNG
state (torchvision's RPN/RoI samplers draw from it); the image order of epoch e is a permutation
seeded by (seed, e) and the flip of sample i in epoch e by (seed, e, i). A run resumed from a
checkpoint therefore replays exactly the batches and random draws of an uninterrupted run, and a
resume is refused when any setting or input that shapes the result differs. The images are read by
a ``DataLoader`` (``train.workers`` processes) driven by :class:`~ovd.data.loader.TrainBatchSampler`,
which makes those draws in this process: the result does not depend on the number of workers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from ovd.data.loader import TrainBatchSampler, batch_keys, make_loader
from ovd.data.loading import load_split_dataset
from ovd.data.train_set import DetectionTrainSet
from ovd.engine.evaluator import PeriodicEval
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache
from ovd.modeling.build import build_detector
from ovd.modeling.checkpoint import load_checkpoint, save_checkpoint
from ovd.stages import ARCHITECTURE, section_reads
from ovd.utils.io import atomic_path, crash_point, file_sha1, remove_stale_temps, write_error
from ovd.utils.lock import OutputLock
from ovd.vlm.text import TextSource, clip_source, clip_spec, text_adapter_of

# train settings that change what a run computes (the train stage's train.* keys, ovd.stages): a
# resume must match them, and `ovd run` reruns training when one changes
TRAIN_RUN_KEYS = section_reads("train", "train")
# model settings that shape the parameters: a detector used by train.init_from must have the same
ARCH_KEYS = tuple(k.split(".", 1)[1] for k in ARCHITECTURE)


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


def init_from_checkpoint(model, path: str, model_cfg: dict, embed_dim: int) -> dict:
    """Load a trained detector's weights into a new run's ``model`` (``train.init_from``): the
    architecture settings and the embedding dimension must match, else one error naming them.
    Returns the settings that differ but do not change the parameters (for the log)."""
    state = load_checkpoint(path)
    stored = state["meta"].get("model", {})
    diffs = [
        f"model.{k}: {stored.get(k)!r} -> {model_cfg.get(k)!r}" for k in ARCH_KEYS if stored.get(k) != model_cfg.get(k)
    ]
    if int(state["meta"]["embed_dim"]) != embed_dim:
        diffs.append(f"embed_dim: {state['meta']['embed_dim']} -> {embed_dim} (another CLIP)")
    if diffs:
        raise OvdError(f"train.init_from {path} is a detector of another architecture ({'; '.join(diffs)})")
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise OvdError(f"train.init_from {path}: weights do not fit this model (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]})")  # fmt: skip
    return {k: (stored.get(k), v) for k, v in model_cfg.items() if k not in ARCH_KEYS and stored.get(k) != v}


def freeze_parameters(model, prefixes: list[str]) -> int:
    """``train.freeze``: requires_grad off for every parameter whose name starts with one of
    ``prefixes``; returns how many tensors were frozen. A prefix that matches nothing is an error
    (a typo would otherwise silently train everything)."""
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(n.startswith(p) for n in names)]
    if unmatched:
        tops = sorted({n.split(".")[0] + "." for n in names})
        raise OvdError(f"train.freeze: no parameter name starts with {unmatched} (top-level: {', '.join(tops)})")
    n = 0
    for name, p in model.named_parameters():
        if any(name.startswith(pre) for pre in prefixes):
            p.requires_grad_(False)
            n += 1
    return n


def build_optimizer(t, params: list) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if t.optimizer == "adamw":
        # the fused kernel: one pass over all parameters instead of ~10 ops per tensor (43 -> 8 ms a
        # step for the bench detector on 2 CPU threads, ~8 % of a step; same result to 1e-7)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=fused)
    raise OvdError(f"unknown train.optimizer '{t.optimizer}' (sgd | adamw)")


def resolve_device(name: str) -> torch.device:
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
    return OmegaConf.to_container(section, resolve=True) if OmegaConf.is_config(section) else dict(section)


def _to(t: dict, device: torch.device) -> dict:
    # non_blocking: a copy from the loader's pinned memory overlaps with the step (CUDA); no-op on CPU
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}


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
        "clip.source": text.source if text.file else clip_source(cfg.clip),
        "clip.fingerprint": text.fingerprint,
        "clip.templates": list(text.templates),
    }
    if cfg.train.init_from:
        inputs["train.init_from.sha1"] = file_sha1(cfg.train.init_from)
    if cache is not None:
        inputs["feature_cache.generation"] = cache.generation  # its committed content (index write ids)
    return inputs


def _resume_keys(meta: dict) -> dict:
    """A checkpoint's meta as the flat map ``check_resume`` compares (model.*, train.*, inputs)."""

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


def check_resume(meta: dict, stored: dict, path: Path, advice: str = "") -> None:
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
            f"runs. {advice or f'Use another train.out, or delete {path} to start over'}"
        )


class Trainer:
    """One training run: ``fit()`` steps from the last checkpoint (or 0) to the end of the schedule.

    ``model`` is the detector (DDP-wrapped here when ``world > 1``), ``data`` a
    :class:`~ovd.data.train_set.DetectionTrainSet`, ``t`` the ``train`` config section, ``meta`` what
    the checkpoints record (and a resume must match), ``text`` the training vocabulary's embeddings.
    ``steps`` > 0: exactly that many iterations, whatever the schedule's length (the few-shot
    fine-tunes compare modes at equal steps); ``eval_modules``: names of top-level submodules that
    stay in eval mode while the rest trains (frozen modules keep their BatchNorm statistics, a
    frozen RPN computes no loss).
    """

    def __init__(self, model, data, t, meta: dict, text: torch.Tensor, *, seed: int, device: torch.device,
                 rank: int = 0, world: int = 1, evaluator=None, progress: bool = True, steps: int = 0,
                 eval_modules: Sequence[str] = ()):  # fmt: skip
        self.model, self.data, self.t, self.meta, self.text = model, data, t, meta, text
        self.seed, self.device, self.rank, self.world = seed, device, rank, world
        self.evaluator, self.progress = evaluator, progress
        self.out = Path(t.out)
        self.use_amp = bool(t.amp) and device.type == "cuda"  # CPU float16 autocast is slower than float32
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = build_optimizer(t, self.params)
        epochs, step_epochs = schedule_epochs(t)
        self.iters_per_epoch = max(1, math.ceil(len(data) / t.batch_size))
        self.total = int(steps) if steps > 0 else epochs * self.iters_per_epoch
        missing = [n for n in eval_modules if not isinstance(getattr(model, n, None), torch.nn.Module)]
        if missing:
            raise OvdError(f"no submodule {missing} to keep in eval mode")
        self.eval_modules = tuple(eval_modules)
        steps = [e * self.iters_per_epoch for e in step_epochs]
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(t.warmup_iters, steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.ddp = model
        self._input_hooks: list[Callable] = []
        self._loss_hooks: dict[str, Callable] = {}

    # -- extension points ----------------------------------------------------------------------------
    def add_inputs(self, fn: Callable) -> None:
        """``fn(it, images, targets) -> dict``: extra keyword arguments of every training forward."""
        self._input_hooks.append(fn)

    def add_loss(self, name: str, fn: Callable) -> None:
        """``fn(it, model, losses) -> tensor``: an extra loss term ``name`` of every step."""
        if name in self._loss_hooks:
            raise OvdError(f"loss term '{name}' is added twice")
        self._loss_hooks[name] = fn

    # -- the loop --------------------------------------------------------------------------------------
    def resume(self) -> int:
        """Load ``train.out/last.pt`` if there is one (refused if made from other inputs); the
        iteration to start from."""
        last = self.out / "last.pt"
        if not last.is_file():
            if self.world > 1:
                torch.manual_seed(self.seed * 1009 + self.rank)  # ranks sample different RoIs from the start
            return 0
        state = load_checkpoint(last)
        check_resume(self.meta, state["meta"], last)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("torch_rng_ranks") or [state["torch_rng"]]
        torch.set_rng_state(rngs[self.rank] if len(rngs) == self.world else state["torch_rng"])
        return int(state["iteration"])

    def batch(self, it: int) -> tuple[list, list]:
        """This process's images and targets of iteration ``it`` (a function of seed and ``it``), read
        here; :meth:`loader` reads the same batches in worker processes."""
        keys = batch_keys(it, len(self.data), self.t.batch_size, self.iters_per_epoch, self.seed, bool(self.t.hflip),
                          self.rank, self.world)  # fmt: skip
        return self._on_device([self.data[k] for k in keys])

    def loader(self, start: int, stop: int) -> torch.utils.data.DataLoader:
        """The batches of iterations ``start`` … ``stop - 1`` (``train.workers`` processes)."""
        sampler = TrainBatchSampler(len(self.data), self.t.batch_size, self.iters_per_epoch, self.seed,
                                    bool(self.t.hflip), start, stop, self.rank, self.world)  # fmt: skip
        return make_loader(self.data, workers=int(self.t.workers), batch_sampler=sampler, device=self.device)

    def _on_device(self, samples: list) -> tuple[list, list]:
        return [im.to(self.device, non_blocking=True) for im, _ in samples], [_to(t, self.device) for _, t in samples]

    def step(self, it: int, samples: list | None = None) -> tuple[dict, torch.Tensor]:
        """One optimisation step; the loss dict and the (all-process mean) [total, *terms] values.
        ``samples``: iteration ``it``'s ``(image, target)`` pairs from :meth:`loader` (default: read now)."""
        images, targets = self.batch(it) if samples is None else self._on_device(samples)
        kwargs: dict = {}
        for fn in self._input_hooks:
            extra = fn(it, images, targets)
            clash = set(extra) & set(kwargs)
            if clash:
                raise OvdError(f"two input hooks give the same model argument(s) {sorted(clash)}")
            kwargs.update(extra)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = self.ddp(images, targets, **kwargs)
            for name, fn in self._loss_hooks.items():
                losses[name] = fn(it, self.model, losses)
        loss = sum(losses.values())
        values = torch.stack([loss.detach().float()] + [v.detach().float() for v in losses.values()])
        if self.world > 1:  # the logged numbers (and the divergence check) cover every process
            dist.all_reduce(values)
            values /= self.world
        if not torch.isfinite(values[0]):
            raise OvdError(f"training diverged at iteration {it} (loss {float(values[0])}): lower train.lr")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.t.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.t.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return losses, values

    def checkpoint(self, it: int) -> None:
        """``last.pt`` on rank 0 with every rank's RNG state (exact resume of a DDP run)."""
        rngs = [torch.get_rng_state()]
        if self.world > 1:
            rngs = [None] * self.world
            dist.all_gather_object(rngs, torch.get_rng_state())
        if self.rank == 0:
            extra = {"torch_rng_ranks": rngs, "scaler": self.scaler.state_dict()}
            save_checkpoint(self.out / "last.pt", self.model, self.opt, self.sched, it, self.meta, extra=extra)
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that may be resumed from

    def train_mode(self) -> None:
        """The model in training mode, except the submodules held in eval mode (``eval_modules``)."""
        self.model.train()
        for name in self.eval_modules:
            getattr(self.model, name).eval()

    def evaluate(self) -> dict:
        metrics = self.evaluator(self.model, self.text)
        self.train_mode()
        return metrics

    def fit(self, max_iters: int = 0) -> dict:
        """Train from the last checkpoint to the end of the schedule, or to ``max_iters`` (> 0)."""
        start = self.resume()
        stop = min(self.total, max_iters) if max_iters > 0 else self.total
        if self.world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.train_mode()
        log = _JsonlLog(self.out / "log.jsonl", start) if self.rank == 0 else None
        eval_log = _JsonlLog(self.out / "eval.jsonl", start) if self.evaluator else None
        bar = tqdm(total=self.total, initial=start, desc="train", disable=not self.progress or self.rank != 0)
        t0, it = time.time(), start
        batches = iter(self.loader(start, stop))
        try:
            while it < stop:
                epoch = it // self.iters_per_epoch
                losses, values = self.step(it, next(batches))
                it += 1
                if log:
                    rec = {"iter": it, "epoch": epoch, "lr": self.opt.param_groups[0]["lr"], "loss": float(values[0])}
                    rec.update({k: round(float(v), 5) for k, v in zip(losses, values[1:].tolist())})
                    log.write(rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
                if it % self.t.checkpoint_every == 0 or it == stop:
                    self.checkpoint(it)
                if self.evaluator and (it % self.t.eval_every == 0 or it == self.total):
                    eval_log.write({"iter": it, **self.evaluate()})
            if self.world > 1 and it == self.total:
                _check_replicas_agree(self.model)
        finally:
            bar.close()
            for lg in (log, eval_log):
                if lg:
                    lg.close()
        final = self.out / "final.pt"
        if self.rank == 0 and it == self.total:
            save_checkpoint(final, self.model, None, None, it, self.meta)
        done = it == self.total
        return {"out": str(final if done else self.out / "last.pt"), "rank": self.rank, "iterations": it,
                "complete": done, "seconds": round(time.time() - t0, 1), "world_size": self.world,
                "device": str(self.device), "amp": self.use_amp}  # fmt: skip


def run_train(cfg, progress: bool = True) -> dict:
    """``ovd train``: base-class training with CLIP distillation; resumes from ``train.out/last.pt``.

    Runs in one process, or data-parallel under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU): the
    batch of ``train.batch_size`` images is split across the processes, rank 0 writes checkpoints
    and logs. One writer per ``train.out``: rank 0 holds its lock for the whole run and first removes
    the temporary files of a killed predecessor (a checkpoint killed mid-write).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return _run_train(cfg, progress)
    out = Path(cfg.train.out)
    with OutputLock(out / ".lock", f"training run {out}"):
        for name in ("last.pt", "final.pt"):
            remove_stale_temps(out, name)
        return _run_train(cfg, progress)


def _run_train(cfg, progress: bool) -> dict:
    t = cfg.train
    rank, world, device = _dist_setup(resolve_device(t.device))
    if t.batch_size % world:
        raise OvdError(f"train.batch_size {t.batch_size} does not split over {world} processes")
    try:
        torch.manual_seed(cfg.seed)  # model initialisation and the first RoI samples draw from it
        trainer = setup_trainer(cfg, rank, world, device, progress)
        return trainer.fit(t.max_iters)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def frozen_modules(model, prefixes: Sequence[str]) -> list[str]:
    """The top-level submodules a ``freeze`` list freezes whole (``backbone.`` / ``rpn.``): those a
    run can keep in eval mode (:class:`Trainer`'s ``eval_modules``)."""
    names = [p.rstrip(".") for p in prefixes]
    return [n for n in names if n and "." not in n and isinstance(getattr(model, n, None), torch.nn.Module)]


def setup_trainer(cfg, rank: int, world: int, device: torch.device, progress: bool = True, *, steps: int = 0,
                  eval_frozen: bool = False, inputs: dict | None = None, record: dict | None = None,
                  on_model: Callable | None = None, train_masks: bool = True) -> Trainer:
    """Data, text, model (``init_from`` / ``freeze`` applied) and the :class:`Trainer` of a config.

    ``steps`` > 0: a fixed number of iterations (recorded: a resume must match it); ``eval_frozen``:
    the submodules ``train.freeze`` freezes whole stay in eval mode; ``inputs``: more ``key -> value``
    inputs the checkpoints record and a resume must match (a caller's own settings and file hashes);
    ``record``: more sections of the checkpoints' meta, for the record only; ``on_model(model)``, if
    given, runs before the optimizer is made: modules it attaches to the model (e.g. a distillation
    run's feature adapters) are trained and checkpointed with it; ``train_masks=False``: a mask-head
    model trains on boxes alone (its training set decodes no masks)."""
    t = cfg.train
    train, split = load_split_dataset(cfg.data, need_split="train", why="the detector is trained on its base classes")
    text_source = TextSource(cfg.clip, text_adapter_of(cfg))
    text = text_source.encode(list(split.base_names))
    cache = FeatureCache(cfg.extract.out, embed_dim=text_source.embed_dim) if cfg.model.distill else None
    # GT masks are decoded only for a model with the mask head (a box-only run never reads them)
    data = DetectionTrainSet(train, list(split.base_ids), cache, masks=cfg.model.mask_head and train_masks)
    model = build_detector(cfg.model, text_source.embed_dim).to(device)
    model.set_vocabulary(text)
    notes = {}
    if t.init_from:
        notes["init_from_changed_settings"] = init_from_checkpoint(model, t.init_from, _plain(cfg.model),
                                                                   text_source.embed_dim)  # fmt: skip
        model.set_vocabulary(text)
    if t.freeze:
        notes["frozen_tensors"] = freeze_parameters(model, list(t.freeze))
    if on_model is not None:
        on_model(model)
    evaluator = PeriodicEval(cfg, text_source, device) if t.eval_every > 0 and rank == 0 else None
    spec = clip_spec(cfg.clip, text_adapter_of(cfg))
    meta = {"base_names": list(split.base_names), "embed_dim": text_source.embed_dim, "clip": text_source.source,
            "clip_spec": spec, "model": _plain(cfg.model), "templates": list(cfg.clip.templates),
            "train_settings": {k: _plain(t)[k] for k in TRAIN_RUN_KEYS},
            "inputs": run_inputs(cfg, train, split, text_source, cache)}  # fmt: skip
    if steps > 0:
        meta["inputs"]["train.steps"] = int(steps)
    meta["inputs"].update(inputs or {})
    meta.update(record or {})
    meta = json.loads(json.dumps(meta))  # plain lists / dicts, as they come back from a checkpoint
    eval_modules = frozen_modules(model, list(t.freeze)) if eval_frozen else []
    trainer = Trainer(model, data, t, meta, text, seed=cfg.seed, device=device, rank=rank, world=world,
                      evaluator=evaluator, progress=progress, steps=steps, eval_modules=eval_modules)  # fmt: skip
    if notes and rank == 0:
        trainer.out.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in trainer.params)
        notes["trainable_parameters"] = n_train
        print(json.dumps({"train_setup": notes}, default=str), flush=True)
    return trainer


def _check_replicas_agree(model) -> None:
    """DDP keeps replicas identical; verify it once at the end (a cheap checksum per rank)."""
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
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:
            raise write_error(self.f.name, e) from None
        crash_point(f"{self.f.name} line")

    def close(self) -> None:
        try:
            self.f.close()
        except OSError:  # a full disk: the line that failed was reported by write()
            pass
