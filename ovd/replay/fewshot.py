"""Few-shot fine-tuning of a base detector, with or without data-free replay (``ovd fewshot``).

A new run initialised from the base model (``train.init_from`` semantics: its weights, a fresh
optimizer, iteration 0) trains on the K-shot file ``<fewshot_dir>/<K>shot_seed<S>.json``:

* the novel classes are split into a **few-shot group** (gets its K boxes) and a **held-out group**
  (never gets a box, measured zero-shot afterwards): in category order, every
  ``replay.heldout_every``-th novel class starting with the 2nd is held out (2: alternate);
* the fine-tuning vocabulary is base + few-shot group (held-out names stay out: a class nobody has
  named yet cannot be in a vocabulary, and a name in the softmax of every background RoI is pushed
  down — docs/replay.md); the checkpoint's ``base_names`` is that vocabulary, so ``ovd test``,
  ``ovd detect`` and ``Detector.from_checkpoint`` work on it as on any trained detector;
* modes: ``novel`` — the few-shot group's boxes only; ``replay`` — each step also feeds a class-balanced
  batch of forged base RoI features (the generator of ``ovd replay fit``) through the RoI head with
  the frozen base model's outputs on the same features as teacher targets; ``base`` — the TFA-style
  reference that keeps K real boxes per base class (a K-shot base file made by TFA's rule,
  :func:`ovd.data.fewshot.fewshot_subset`), i.e. it *stores base images*.

Backbone and RPN are frozen by default (``replay.freeze``) and run in eval mode (their BatchNorm
statistics stay the base model's).

Reuse: a run folder that holds a run is continued (or its finished run kept) only when every input
of the new run equals the old one's — mode, K, seed, every config key the ``fewshot`` stage reads
(:mod:`ovd.stages`), and the content of the K-shot file, the base checkpoint, the training
annotations, the generator and the statistics it was fitted to. Otherwise one error names the keys
that changed, before anything in the folder is touched.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ovd.config_schema import TEACHER_TERMS
from ovd.data.fewshot import fewshot_subset
from ovd.data.loading import load_split_dataset
from ovd.data.splits import Split
from ovd.engine.evaluator import load_val, predict_dataset
from ovd.engine.trainer import check_resume, resolve_device, setup_trainer
from ovd.errors import OvdError
from ovd.evaluation import evaluate_detections
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.modeling.roi_heads import ExtraRoIs, RoIBatch
from ovd.replay.generator import frozen_base, generator_settings, load_generator
from ovd.replay.watchers import pooled_shape
from ovd.stages import reads
from ovd.utils.io import check_writable, file_sha1, read_json, remove_stale_temps, write_json
from ovd.utils.lock import OutputLock
from ovd.vlm.text import TextSource, text_adapter_of

MODES = ("novel", "replay", "base")


def fewshot_path(cfg, shots: int, seed: int) -> Path:
    folder = Path(cfg.replay.fewshot_dir) if cfg.replay.fewshot_dir else Path(cfg.data.train_json).parent / "fewshot"
    path = folder / f"{shots}shot_seed{seed}.json"
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*shot_seed*.json")) if folder.is_dir() else []
        raise OvdError(
            f"no few-shot file for K={shots}, seed {seed}: {path} does not exist"
            + (f" (there are: {', '.join(have)})" if have else f" (no few-shot files in {folder})")
        )
    return path


def novel_groups(split: Split, every: int) -> tuple[Split, Split]:
    """(few-shot group, held-out group) of the split's novel classes, each as a Split whose
    ``novel_*`` holds the group (``base_*`` = the split's base classes). Category order; with
    ``every`` = n > 0 the classes at positions n-1, 2n-1, ... (0-based) are held out."""
    fs = [
        (n, i)
        for j, (n, i) in enumerate(zip(split.novel_names, split.novel_ids))
        if not every or j % every != every - 1
    ]
    ho = [(n, i) for n, i in zip(split.novel_names, split.novel_ids) if (n, i) not in fs]

    def group(name, items):
        return Split(name, split.base_names, tuple(n for n, _ in items), split.base_ids, tuple(i for _, i in items))

    return group("fewshot", fs), group("heldout", ho)


def group_metrics(val, dets: list[dict], fewshot: Split, heldout: Split) -> dict:
    """AP and AP50 of three groups — base, few-shot novel, held-out novel — plus all of them, by
    :func:`ovd.evaluation.evaluate_detections` with custom splits (COCOeval restricted to each group)."""
    m = evaluate_detections(val, dets, split=fewshot)
    out = {
        "base": {"AP": m["AP_base"], "AP50": m["AP50_base"]},
        "fewshot": {"AP": m["AP_novel"], "AP50": m["AP50_novel"]},
    }
    if heldout.novel_ids:
        everything = Split("all", heldout.novel_names, fewshot.base_names + fewshot.novel_names,
                           heldout.novel_ids, fewshot.base_ids + fewshot.novel_ids)  # fmt: skip
        h = evaluate_detections(val, dets, split=everything)
        out["heldout"] = {"AP": h["AP_base"], "AP50": h["AP50_base"]}
        out["all"] = {"AP": h["AP"], "AP50": h["AP50"]}
    else:
        out["heldout"] = {"AP": None, "AP50": None}
        out["all"] = {"AP": m["AP"], "AP50": m["AP50"]}
    return out


def evaluate_groups(cfg, ckpt: str, progress: bool = False) -> dict:
    """A checkpoint (base or fine-tuned) on the val set, prompted with every base + novel name,
    scored per group (the few-shot / held-out rule of ``cfg.replay.heldout_every``)."""
    state = load_checkpoint(ckpt)
    val, split = load_val(cfg)
    fewshot, heldout = novel_groups(split, cfg.replay.heldout_every)
    text = TextSource(cfg.clip, text_adapter_of(cfg))
    text.check_dim(int(state["meta"]["embed_dim"]), f"detector {ckpt}")
    model = model_from_checkpoint(state, ckpt)
    model.set_vocabulary(text.encode(list(split.base_names) + list(split.novel_names)))
    dets = predict_dataset(model, val, list(split.base_ids) + list(split.novel_ids), progress)
    return group_metrics(val, dets, fewshot, heldout)


def _train_file(cfg, fs_path: Path, mode: str, shots: int, seed: int, train, split: Split, group: Split) -> dict:
    """The run's training annotations: the few-shot group's boxes of the K-shot file (+ K-shot base
    boxes in mode ``base``); images without a kept box are dropped."""
    fs = read_json(fs_path, "few-shot file")
    if not isinstance(fs, dict) or not all(isinstance(fs.get(k), list) for k in ("images", "annotations")):
        raise OvdError(f"few-shot file {fs_path} is not a COCO annotation file (images, annotations)")
    keep_ids = set(group.novel_ids)
    anns = [a for a in fs["annotations"] if a.get("category_id") in keep_ids]
    if not anns:
        raise OvdError(f"few-shot file {fs_path} has no box of the few-shot classes {list(group.novel_names)[:5]}")
    images = {im["id"]: im for im in fs["images"]}
    if mode == "base":
        base = fewshot_subset(read_json(train.path, "train annotations"), list(split.base_ids), shots, seed)
        anns = anns + base["annotations"]
        images.update({im["id"]: im for im in base["images"]})
    seen, unique = set(), []
    for a in anns:  # an annotation picked for both groups appears once
        if a["id"] not in seen:
            seen.add(a["id"])
            unique.append(a)
    used = {a["image_id"] for a in unique}
    categories = read_json(train.path, "train annotations")["categories"]
    return {
        "info": {"description": f"ovd fewshot: {mode}, {shots}-shot seed {seed} from {fs_path.name}"},
        "images": [images[i] for i in sorted(used)],
        "annotations": sorted(unique, key=lambda a: a["id"]),
        "categories": categories,
    }


class ReplayInputs:
    """``Trainer.add_inputs`` hook of mode ``replay``: every step, ``n`` forged RoIs — a ``background``
    share labelled background, the rest class-balanced over the base classes (a fresh permutation per
    step) — with the frozen base model's RoI-head outputs on the same features as teacher targets.
    Deterministic in (seed, iteration), so an interrupted run resumes exactly."""

    def __init__(self, gen, teacher, base_to_student: torch.Tensor, n: int, background: float, weight: float,
                 seed: int, device, terms=TEACHER_TERMS):  # fmt: skip
        self.gen, self.teacher, self.map = gen.to(device), teacher.to(device), base_to_student.to(device)
        self.terms = set(terms)
        self.n_bg = int(round(n * background))
        self.n_fg, self.weight, self.seed, self.device = n - self.n_bg, weight, seed, device

    def rows(self, it: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7_919 + it)
        k = len(self.map) - 1
        reps = -(-self.n_fg // k)
        fg = torch.cat([torch.randperm(k, generator=g) + 1 for _ in range(reps)])[: self.n_fg]
        return torch.cat([torch.zeros(self.n_bg, dtype=torch.int64), fg]), g

    def __call__(self, it, images, targets) -> dict:
        rows, g = self.rows(it)
        with torch.no_grad():
            feats = self.gen.sample(rows.to(self.device), generator=g)
            labels = self.map[rows.to(self.device)]
            out = self.teacher.roi_heads.predict(RoIBatch([]), ExtraRoIs(feats, labels)).extra
        keep = lambda term, value: value if term in self.terms else None  # noqa: E731
        return {"extra_rois": ExtraRoIs(feats, labels, teacher_embeddings=keep("embedding", out.embeddings),
                                        teacher_logits=keep("logits", out.logits),
                                        teacher_deltas=keep("deltas", out.deltas),
                                        teacher_weight=self.weight)}  # fmt: skip


def _value(cfg, key: str):
    node = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def run_settings(cfg) -> dict:
    """The ``replay`` and ``model`` keys the ``fewshot`` stage reads (:mod:`ovd.stages`), by section:
    what ``tools/run_fewshot.py`` compares before reusing a finished run's table entry."""
    out: dict = {"replay": {}, "model": {}}
    for key in reads("fewshot"):
        section, _, name = key.partition(".")
        if section in out:
            out[section][name] = _value(cfg, key)
    return out


def _json_sha1(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def fewshot_inputs(cfg, mode: str, shots: int, seed: int, fs_path: Path, ckpt_sha1: str, data: dict,
                   split_file: dict, gen_path: str | None, gen_meta: dict | None) -> dict:  # fmt: skip
    """Everything a fine-tune's result depends on, as the flat ``key -> value`` map its checkpoints
    record and a rerun must match (see the module doc): the ``fewshot`` stage's config keys by value,
    its input files by content."""
    inputs = {"fewshot.mode": mode, "fewshot.shots": int(shots), "fewshot.seed": int(seed),
              "fewshot.base_ckpt.sha1": ckpt_sha1, "fewshot.file.sha1": file_sha1(fs_path),
              "fewshot.train_annotations.sha1": _json_sha1(data), "fewshot.split": split_file}  # fmt: skip
    inputs.update({f"fewshot.{k}": _value(cfg, k) for k in reads("fewshot")})
    for key in ("data.train_json", "data.val_json"):
        path = _value(cfg, key)
        inputs[f"fewshot.{key}.sha1"] = file_sha1(path) if path and Path(path).is_file() else None
    if gen_path is not None:
        inputs["fewshot.generator.sha1"] = file_sha1(gen_path)
        inputs["fewshot.generator.stats_sha1"] = gen_meta.get("stats_sha1")
    return json.loads(json.dumps(inputs))  # plain data, as a checkpoint gives it back


def check_reuse(run_dir: Path, inputs: dict) -> None:
    """Refuse a run folder that holds a run of other inputs (one error naming every changed key),
    before anything in it is written. A run recorded by an ovd without these inputs is refused too."""
    path = next((run_dir / n for n in ("last.pt", "final.pt") if (run_dir / n).is_file()), None)
    if path is None:
        return
    stored = load_checkpoint(path)["meta"].get("inputs") or {}
    old = {k: v for k, v in stored.items() if k.startswith("fewshot.")}
    check_resume({"inputs": inputs}, {"inputs": old}, path,
                 advice=f"Use another --out (or replay.fewshot_out), or delete {run_dir} to run it again")  # fmt: skip


def _check_generator(cfg, gen_path: str, gen_meta: dict) -> None:
    """The generator must have been fitted with this config's settings and, when the config's
    statistics file exists, to those statistics: else the config does not describe the run."""
    def flat(settings: dict) -> dict:  # {"noise_dim": .., "fit": {"fit_lr": .., "seed": ..}} -> config keys
        fit = settings.get("fit") if isinstance(settings.get("fit"), dict) else {}
        items = [*((k, v) for k, v in settings.items() if k != "fit"), *fit.items()]
        return {(k if k == "seed" else f"replay.{k}"): v for k, v in items}

    want, have = flat(json.loads(json.dumps(generator_settings(cfg)))), flat(gen_meta)
    diffs = [f"{k}: {have.get(k, '(not recorded)')!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise OvdError(f"replay generator file {gen_path} was fitted with other settings than this config's "
                       f"({'; '.join(diffs)}): run `ovd replay fit` again")  # fmt: skip
    stats = Path(cfg.replay.stats)
    if stats.is_file() and gen_meta.get("stats_sha1") != file_sha1(stats):
        raise OvdError(f"replay generator file {gen_path} was fitted to other statistics than {stats} (replay.stats): "
                       f"run `ovd replay fit` again")  # fmt: skip


# ~80 lines: every input checked before the run folder is touched, then the run; read in order
def run_fewshot(cfg, ckpt: str, shots: int, seed: int, mode: str, generator: str | None = None,
                out: str | None = None, evaluate: bool = True, progress: bool = True) -> dict:  # fmt: skip
    """``ovd fewshot``: fine-tune base detector ``ckpt`` on the K-shot file (``shots``, ``seed``) in
    ``mode``; writes ``<out>/final.pt`` (default ``replay.fewshot_out/<mode>_<K>shot_seed<S>``) and,
    with ``evaluate``, ``<out>/group_metrics.json``. Every input is checked before anything is written."""
    if mode not in MODES:
        raise OvdError(f"unknown few-shot mode '{mode}' (choose from {', '.join(MODES)})")
    r = cfg.replay
    fs_path = fewshot_path(cfg, shots, seed)
    state = load_checkpoint(ckpt)
    train, split = load_split_dataset(cfg.data, need_split="fewshot", why="base and novel classes are needed")
    if list(state["meta"].get("base_names") or []) != list(split.base_names):
        raise OvdError(
            f"detector {ckpt} was not trained on data.split's base classes: fine-tune a base model of this split"
        )
    group, heldout = novel_groups(split, r.heldout_every)
    if not group.novel_ids:
        raise OvdError("replay.heldout_every leaves no novel class to fine-tune on")
    sha1 = file_sha1(ckpt)
    gen = gen_path = gen_meta = None
    if mode == "replay":
        gen_path = generator or r.generator
        teacher = frozen_base(state, ckpt)
        gen, gen_meta = load_generator(gen_path, state["meta"], sha1, pooled_shape(teacher))
        _check_generator(cfg, gen_path, gen_meta)
    run_dir = Path(out or Path(r.fewshot_out) / f"{mode}_{shots}shot_seed{seed}")
    check_writable(run_dir, "--out", folder=True)
    data = _train_file(cfg, fs_path, mode, shots, seed, train, split, group)
    in_vocab = set(split.base_names) | set(group.novel_names)
    if r.heldout_in_vocabulary:
        in_vocab |= set(heldout.novel_names)
    vocab_names = [n for n in split.all_names if n in in_vocab]
    split_file = {"base": vocab_names, "novel": [n for n in heldout.novel_names if n not in in_vocab]}
    inputs = fewshot_inputs(cfg, mode, shots, seed, fs_path, sha1, data, split_file, gen_path, gen_meta)
    t0 = time.time()
    with OutputLock(run_dir / ".lock", f"few-shot run {run_dir}"):
        check_reuse(run_dir, inputs)  # before anything in the folder is written
        for name in ("last.pt", "final.pt"):
            remove_stale_temps(run_dir, name)
        write_json(run_dir / "train.json", data, indent=None)
        write_json(run_dir / "split.json", split_file)
        ipe = math.ceil(len(data["images"]) / r.batch_size)
        ft = OmegaConf.merge(cfg, {
            "seed": int(seed),
            "data": {"train_json": str(run_dir / "train.json"), "split": str(run_dir / "split.json"),
                     "image_root": cfg.data.image_root or str(Path(cfg.data.train_json).parent)},
            "train": {"out": str(run_dir), "init_from": str(ckpt), "freeze": list(r.freeze), "lr": r.lr,
                      "batch_size": r.batch_size, "schedule": "", "epochs": math.ceil(r.iters / ipe), "lr_steps": [],
                      "warmup_iters": r.warmup_iters, "eval_every": 0, "max_iters": 0,
                      "checkpoint_every": min(r.checkpoint_every, r.iters)},
        })  # fmt: skip
        device = resolve_device(ft.train.device)
        torch.manual_seed(int(seed))
        record = {"fewshot": {"mode": mode, "shots": shots, "seed": seed, "file": str(fs_path.resolve()),
                              "fewshot_classes": list(group.novel_names), "heldout_classes": list(heldout.novel_names),
                              "base_ckpt_sha1": sha1}}  # fmt: skip
        if gen_path is not None:
            record["fewshot"]["generator_sha1"] = inputs["fewshot.generator.sha1"]
        # a fixed number of steps, whatever the number of images (modes compare); frozen whole
        # submodules (backbone, RPN) stay in eval mode: the base model's BatchNorm statistics are used
        trainer = setup_trainer(ft, 0, 1, device, progress, steps=r.iters, eval_frozen=True, inputs=inputs,
                                record=record, train_masks=False)  # fmt: skip
        pinned = list(trainer.eval_modules)
        # K-shot runs train on box annotations: a mask branch (model.mask_head) stays as the base model
        # trained it, class-agnostic, so the few-shot classes get masks all the same
        trainer.model.roi_heads.train_masks = False
        if gen is not None:
            student_index = {n: i + 1 for i, n in enumerate(trainer.meta["base_names"])}
            base_to_student = torch.tensor([0] + [student_index[n] for n in split.base_names])
            teacher.set_vocabulary(trainer.text)
            trainer.add_inputs(ReplayInputs(gen, teacher, base_to_student, r.replay_rois, r.replay_background,
                                            r.teacher_weight, int(seed), device, list(r.teacher_terms)))  # fmt: skip
        report = trainer.fit()
    report.update({"mode": mode, "shots": shots, "seed": seed, "images": len(data["images"]),
                   "boxes": len(data["annotations"]), "vocabulary": len(vocab_names), "pinned_eval": pinned,
                   "train_seconds": round(time.time() - t0, 1), "settings": run_settings(cfg)})  # fmt: skip
    if evaluate and report["complete"]:
        t1 = time.time()
        report["metrics"] = evaluate_groups(cfg, report["out"])
        report["eval_seconds"] = round(time.time() - t1, 1)
        write_json(run_dir / "group_metrics.json", report)
    return report
