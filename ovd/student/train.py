"""``ovd student CONFIG --teacher CKPT``: distil a trained detector into a smaller one.

The student is an ordinary ovd detector (the config's ``model`` section with ``student.model``'s
keys replaced) trained on the base training set by the ordinary :class:`~ovd.engine.trainer.Trainer`
(its schedule: the ``train`` section; its output: ``student.out``), with the frozen teacher added
through the Trainer's extension points:

* an input hook applies IKD's augmentations to the batch both networks see (``student.frequency_aug``)
  and makes the adversarial images of the step (``student.adversarial_aug``);
* loss hooks add the distillation terms of :mod:`ovd.student.distill` (``loss_kd_*``).

The 1x1 feature adapters are trained with the student (they are in ``last.pt``, so a killed run
resumes exactly) and removed from ``final.pt``, which is therefore a plain detector checkpoint:
``ovd test``, ``ovd detect --classes``, ``Detector`` and ``ovd export`` take it as they take the
teacher. The teacher must share the student's CLIP (same text-embedding fingerprint) and base
vocabulary, else one error before anything is written. One process (no torchrun): the adversarial
images use the student's backbone outside the DDP forward.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ovd.config_schema import ModelConfig, check_values
from ovd.data.loading import load_split_dataset
from ovd.engine.trainer import resolve_device, setup_trainer
from ovd.errors import OvdError
from ovd.modeling.backbones import backbone_spec
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.stages import section_reads
from ovd.student.adversarial_cache import AdversarialCache
from ovd.student.augment import FrequencyAug, attack_settings, difgsm
from ovd.student.distill import (
    ADAPTERS,
    FeatureImitation,
    StudentTap,
    extract_features,
    match_levels,
    region_terms,
    teacher_roi_outputs,
    to_frame,
)
from ovd.utils.io import atomic_path, file_sha1, remove_stale_temps
from ovd.utils.lock import OutputLock
from ovd.vlm.text import TextSource

# student settings that change what a run computes (the student stage's own keys, ovd.stages):
# recorded in its checkpoints, a resume must match
RUN_KEYS = section_reads("student", "student")
# step: fresh DI-FGSM images every batch; cache: one per training image, made before training
ADVERSARIAL_SOURCES = ("step", "cache")


def student_model_config(cfg) -> dict:
    """The student's model settings: ``model`` with ``student.model``'s keys replaced (checked)."""
    over = OmegaConf.to_container(cfg.student.model, resolve=True) if OmegaConf.is_config(cfg.student.model) \
        else dict(cfg.student.model)  # fmt: skip
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(over) - known)
    if unknown:
        raise OvdError(f"student.model has unknown key(s) {unknown} (model keys: {', '.join(sorted(known))})")
    check_values(over, ModelConfig, "student.model", types=True)
    merged = {**OmegaConf.to_container(cfg.model, resolve=True), **over}
    backbone_spec(merged["backbone"])  # an unknown name is refused before anything is written
    return merged


def load_teacher(path: str, text: TextSource, base_names: list[str]) -> tuple[dict, torch.nn.Module]:
    """The teacher checkpoint and its frozen detector; one error if it is missing, unreadable, or of
    another CLIP (embedding width or text-embedding weights) or another base vocabulary."""
    if not path:
        raise OvdError("no teacher: give --teacher CKPT (or student.teacher=CKPT), a trained ovd detector")
    if not Path(path).is_file():
        raise OvdError(f"teacher checkpoint not found: {path} (--teacher / student.teacher: a trained ovd detector)")
    state = load_checkpoint(path)
    meta = state["meta"]
    text.check_dim(int(meta["embed_dim"]), f"teacher {path}")
    theirs = (meta.get("inputs") or {}).get("clip.fingerprint")
    if theirs is not None and theirs != text.fingerprint:
        raise OvdError(
            f"teacher {path} was trained with another CLIP (text-embedding fingerprint {theirs}, this config's "
            f"{text.source} has {text.fingerprint}): its region embeddings live in another space"
        )
    names = list(meta.get("base_names") or [])
    if names != list(base_names):
        gone, new = [n for n in names if n not in base_names], [n for n in base_names if n not in names]
        raise OvdError(
            f"teacher {path} was trained on another vocabulary ({len(names)} base classes, this split has "
            f"{len(base_names)}; teacher only: {gone[:3]}, split only: {new[:3]}"
            + (", same names in another order" if not gone and not new else "")
            + "): teacher and student need the same base classes"
        )
    teacher = model_from_checkpoint(state, path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return state, teacher.eval()


class StudentHooks:
    """The Trainer hooks of one student run: augmentation (input hook) and distillation (loss hooks).

    Every random draw of a step comes from a generator seeded by (seed, iteration), so a resumed run
    repeats an uninterrupted one exactly; the teacher's own RoI sampling (adversarial images) runs
    under a forked global generator and leaves the Trainer's stream alone."""

    def __init__(self, s, teacher, student, imitation: FeatureImitation | None, seed: int,
                 cache: AdversarialCache | None = None):  # fmt: skip
        self.s, self.teacher, self.student, self.imitation, self.seed = s, teacher, student, imitation, seed
        self.cache = cache
        self.tap = StudentTap(student)
        self.freq = FrequencyAug(s.frequency_prob, s.small_side, s.noise_sigma, s.crop_min) if s.frequency_aug \
            else None  # fmt: skip
        self.adv: list | None = None
        self.images: list | None = None
        self.it = -1
        self.terms: dict[str, torch.Tensor] = {}
        self.terms_it = -1
        self.counts = {"noise": 0, "crop": 0}

    def names(self) -> list[str]:
        s = self.s
        out = ["loss_kd_feature"] if s.feature_weight > 0 else []
        out += [f"loss_kd_{k}" for k in ("embedding", "logits", "deltas") if getattr(s, f"{k}_weight") > 0]
        return out + (["loss_kd_adversarial"] if s.adversarial_aug and s.adversarial_weight > 0 else [])

    # -- input hook: the batch both networks see ---------------------------------------------------------
    def inputs(self, it: int, images: list, targets: list) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_033 + it)
        self.adv = None
        if self.cache is not None:  # before the frequency augmentation changes the clean images
            self.adv = self.cache.batch(images, targets)
        if self.freq is not None:
            for what in self.freq(images, targets, g):  # changes the batch in place
                if what:
                    self.counts[what] += 1
        if self.s.adversarial_aug and self.cache is None:
            self.adv = difgsm(self.teacher, images, targets, g, **attack_settings(self.s))
        self.images, self.it = list(images), it
        self.tap.clear()
        self.tap.active = True
        return {}

    # -- loss hooks ------------------------------------------------------------------------------------------
    def _compute(self) -> dict[str, torch.Tensor]:
        s, tap = self.s, self.tap
        if tap.features is None or tap.outputs is None:
            raise OvdError("the student's forward was not observed: the distillation hooks need its features")
        tap.active = False  # the student's adversarial forward below must not replace what was kept
        terms = {}
        with torch.no_grad():
            ft, sizes_t, _ = extract_features(self.teacher, self.images)
        if s.feature_weight > 0:
            terms["loss_kd_feature"] = s.feature_weight * self.imitation(tap.features, ft)
        weights = {k: getattr(s, f"{k}_weight") for k in ("embedding", "logits", "deltas")}
        if any(w > 0 for w in weights.values()):
            batch = tap.batch
            boxes = to_frame([p.detach() for p in batch.proposals], tap.image_sizes, sizes_t)
            t_rois = teacher_roi_outputs(self.teacher, ft, sizes_t, boxes, batch.labels)
            terms.update(region_terms(tap.outputs.rois, t_rois, weights))
        if self.adv is not None and s.adversarial_weight > 0:
            with torch.no_grad():
                fta, _, _ = extract_features(self.teacher, self.adv)
            fsa, _, _ = extract_features(self.student, self.adv)
            terms["loss_kd_adversarial"] = s.adversarial_weight * self.imitation(fsa, fta)
        return terms

    def loss(self, name: str):
        def fn(it: int, model, losses: dict) -> torch.Tensor:
            if it != self.it:
                raise OvdError(f"distillation loss of iteration {it} asked before its inputs ({self.it})")
            if self.terms_it != it:  # the first loss hook of a step computes every term once
                self.terms, self.terms_it = self._compute(), it
            return self.terms[name]

        return fn


def strip_adapters(path: Path) -> None:
    """Rewrite ``path`` (the Trainer's final.pt) without the training-only adapters: a plain detector
    checkpoint. Atomic; a no-op when there are none (a repeated call)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    keys = [k for k in state["model"] if k.startswith(ADAPTERS + ".")]
    if not keys:
        return
    state["model"] = {k: v for k, v in state["model"].items() if k not in keys}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def run_settings(cfg) -> dict:
    """The student settings a run's result depends on (checkpoint meta, resume check, driver reuse)."""
    s = OmegaConf.to_container(cfg.student, resolve=True)
    return {k: s[k] for k in RUN_KEYS}


def run_student(cfg, teacher_path: str | None = None, progress: bool = True) -> dict:
    """``ovd student``: train ``student.out/final.pt`` from the teacher (``teacher_path`` or
    ``student.teacher``); resumes from ``student.out/last.pt``. Every input is checked first."""
    s = cfg.student
    teacher_path = str(teacher_path or s.teacher)
    if s.adversarial_source not in ADVERSARIAL_SOURCES:
        raise OvdError(f"student.adversarial_source must be one of {', '.join(ADVERSARIAL_SOURCES)}, "
                       f"got {s.adversarial_source!r}")  # fmt: skip
    model_cfg = student_model_config(cfg)
    text = TextSource(cfg.clip)
    _, split = load_split_dataset(cfg.data, need_split="train", why="the student is trained on its base classes")
    _, teacher = load_teacher(teacher_path, text, list(split.base_names))
    out = Path(s.out)
    run_cfg = OmegaConf.merge(cfg, {"model": model_cfg, "train": {"out": str(out), "init_from": "", "eval_every": 0}})
    device = resolve_device(run_cfg.train.device)
    teacher.to(device)
    t0 = time.time()
    with OutputLock(out / ".lock", f"student run {out}"):
        for name in ("last.pt", "final.pt"):
            remove_stale_temps(out, name)
        torch.manual_seed(int(cfg.seed))
        holder = {}

        def attach(model):
            if s.feature_weight > 0 or (s.adversarial_aug and s.adversarial_weight > 0):
                hw = (int(model_cfg["min_size"]), int(model_cfg["min_size"]))
                imitation = FeatureImitation(match_levels(model, teacher, hw)).to(device)
                setattr(model, ADAPTERS, imitation)
            holder["imitation"] = getattr(model, ADAPTERS, None)

        settings = run_settings(cfg)
        inputs = {"student.teacher.sha1": file_sha1(teacher_path), **{f"student.{k}": v for k, v in settings.items()}}
        record = {"student": {"teacher": str(Path(teacher_path).resolve()), "settings": settings}}
        trainer = setup_trainer(run_cfg, 0, 1, device, progress, inputs=inputs, record=record, on_model=attach)
        teacher.set_vocabulary(trainer.text)
        cache, adv_report = None, None
        if s.adversarial_aug and s.adversarial_source == "cache":
            ids = [im["id"] for im in trainer.data.dataset.images]
            cache = AdversarialCache(s.adversarial_cache_dir, teacher_path, s, int(cfg.seed), ids)
            adv_report = cache.build(teacher, trainer.data, int(run_cfg.train.batch_size), device, progress)
        hooks = StudentHooks(s, teacher, trainer.model, holder["imitation"], int(cfg.seed), cache)
        trainer.add_inputs(hooks.inputs)
        for name in hooks.names():
            trainer.add_loss(name, hooks.loss(name))
        report = trainer.fit(run_cfg.train.max_iters)
        if report["complete"]:
            strip_adapters(Path(report["out"]))
    n_student = sum(p.numel() for k, p in trainer.model.named_parameters() if not k.startswith(ADAPTERS + "."))
    n_teacher = sum(p.numel() for p in teacher.parameters())
    report.update({"teacher": teacher_path, "student_parameters": n_student, "teacher_parameters": n_teacher,
                   "augmented": hooks.counts, "loss_terms": hooks.names(), "settings": settings,
                   "train_seconds": round(time.time() - t0, 1)})  # fmt: skip
    if adv_report is not None:
        report["adversarial_cache"] = adv_report
    return report
