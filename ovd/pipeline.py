"""``ovd run CONFIG``: the whole EZSD pipeline, each stage reused when its output is already on disk.

    world → pretrain (tiny CLIP) → adapt → mine → extract → train → test

A stage's output is reused only if it was made from the same settings: every stage records a stamp
(hash of the config keys it reads, as declared in :mod:`ovd.stages`, plus the stamps of the stages
it consumes) in
``work_dir/run_stamps.json``, keyed by stage and output path, so configs that share a work_dir but
write some stages elsewhere (the ablation variants) share the common stages. A changed setting
re-runs that stage and everything downstream; an output made outside ``ovd run`` (no stamp) is
reused as it is, and said so. Training is never silently restarted: a ``train.out`` holding a run
from other inputs is an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from ovd.config_schema import Config
from ovd.engine.evaluator import run_test
from ovd.engine.trainer import run_train
from ovd.errors import OvdError
from ovd.mini_world import derive_shape_split, generate_mini_world
from ovd.mini_world.knobs import WORLD_KNOBS
from ovd.mining.feature_cache import run_extract
from ovd.mining.miner import run_mine
from ovd.stages import STAGES as STAGE_TABLE
from ovd.stages import stamp_keys
from ovd.utils.io import read_json, write_json
from ovd.vlm.adapter import run_adapt
from ovd.vlm.pretrain import pretrain_tiny_clip
from ovd.vlm.text import text_adapter_of

STAGES = ("world", "pretrain", "adapt", "mine", "extract", "train", "test")

# The stamp format before the stage table (ovd.stages): whole sections hashed, output paths included.
# Frozen, never extended: only used to recognise a stamp an earlier ovd wrote (same settings) and
# rewrite it in the current format, so existing outputs are reused instead of being made again.
_LEGACY_READS = {
    "world": ["world.dir", "world.preset", "world.seed", "world.version"],
    "pretrain": ["pretrain", "data.web_train_json", "data.web_val_json", "data.web_image_root", "seed"],
    "adapt": ["adapter", "clip", "data.train_json", "data.image_root", "data.split", "seed"],
    "mine": ["miner", "clip", "adapter.enabled", "data.train_json", "data.image_root", "data.split"],
    "extract": ["extract", "clip", "adapter.enabled", "miner.enabled", "miner.stride", "miner.scales",
                "miner.ratios", "miner.min_size", "data.train_json", "data.image_root", "data.split", "seed"],
    "train": ["model", "train.optimizer", "train.lr", "train.momentum", "train.weight_decay", "train.batch_size",
              "train.schedule", "train.epochs", "train.lr_steps", "train.warmup_iters", "train.grad_clip",
              "train.hflip", "train.amp", "train.init_from", "train.freeze", "clip", "data.train_json",
              "data.image_root", "data.split", "seed"],
    "test": ["data.val_json", "data.image_root", "data.val_image_root", "data.lvis", "data.split", "clip"],
}  # fmt: skip

# loader workers (speed only) never were part of a stamp: kept out of the legacy format's sections
_SPEED_ONLY = ("miner.workers", "extract.workers")


def _upstream(stage: str) -> list[str]:
    """The pipeline stages ``stage`` consumes (its declared upstream, in ovd.stages)."""
    return [u for u in STAGE_TABLE[stage].upstream if u in STAGES]


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if f"{dotted}.{k}" not in _SPEED_ONLY}
    return value


_UNSET = object()


def _defaults() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(Config), resolve=True)


def _changed(value, default):
    """The parts of ``value`` that differ from the schema default (dicts recursively). Stamps hash
    only these, so a key added to the schema later (with its default) leaves existing stamps valid."""
    if isinstance(value, dict) and isinstance(default, dict):
        return {k: _changed(v, default.get(k, _UNSET)) for k, v in value.items() if v != default.get(k, _UNSET)}
    return value


class Pipeline:
    def __init__(self, cfg, progress: bool = True, log=print):
        self.cfg = cfg
        self.progress = progress
        self.log = log
        self.work = Path(cfg.work_dir)
        self.stamp_file = self.work / "run_stamps.json"
        self.stamps = read_json(self.stamp_file, "run stamps") if self.stamp_file.is_file() else {}
        self.fresh: dict[str, str] = {}  # stamps of this run
        self.fresh_legacy: dict[str, str] = {}  # the same in the earlier format (see _LEGACY_READS)
        self.report: dict = {}

    # which stages apply to this config
    def active(self, stage: str) -> bool:
        c = self.cfg
        return {
            "world": bool(c.world.dir),
            "pretrain": c.clip.model == f"local-dir:{c.pretrain.out}",
            "adapt": bool(c.adapter.enabled),
            "mine": bool(c.miner.enabled),
            "extract": bool(c.model.distill),
            "train": True,
            "test": bool(c.data.val_json),
        }[stage]

    def stamp(self, stage: str, legacy: bool = False) -> str:
        """Hash of the keys the stage reads (ovd.stages) that differ from their defaults, plus the
        stamps of its upstream stages; ``legacy``: in the format of earlier ovd versions."""
        defaults = _defaults()
        reads = {}
        for k in _LEGACY_READS[stage] if legacy else stamp_keys(stage):
            value, default = _get(self.cfg, k), _get(defaults, k)
            if value != default:
                reads[k] = _changed(value, default)
        fresh = self.fresh_legacy if legacy else self.fresh
        upstream = _upstream(stage)
        if stage in ("train", "test") and text_adapter_of(self.cfg):  # class embeddings from the adapted text tower
            reads["adapter.text_tower"] = True
            upstream = [*upstream, "adapt"]
        up = {u: fresh.get(u, "") for u in upstream}
        return hashlib.sha1(json.dumps([reads, up], sort_keys=True, default=str).encode()).hexdigest()[:16]

    def output(self, stage: str) -> Path:
        c = self.cfg
        return {
            "world": Path(c.world.dir),
            "pretrain": Path(c.pretrain.out),
            "adapt": Path(c.adapter.out),
            "mine": Path(c.miner.out),
            "extract": Path(c.extract.out),
            "train": Path(c.train.out),
            "test": Path(c.train.out) / "metrics.json",
        }[stage]

    def key(self, stage: str) -> str:
        return f"{stage} {self.output(stage)}"

    def output_exists(self, stage: str) -> bool:
        c = self.cfg
        if stage == "world":
            shapes = "_".join(c.world.heldout_shapes)
            return (Path(c.world.dir) / "split.json").is_file() and (
                not shapes or (Path(c.world.dir) / f"split_heldout_{shapes}.json").is_file()
            )
        if stage == "pretrain":
            return (Path(c.pretrain.out) / "open_clip_config.json").is_file()
        if stage == "adapt":
            return Path(c.adapter.out).is_file()
        if stage == "mine":  # a committed proposal store, or a JSON list of proposals made elsewhere
            return Path(c.miner.out).is_file() or (Path(c.miner.out) / "index.json").is_file()
        if stage == "extract":
            return (Path(c.extract.out) / "index.json").is_file()
        if stage == "train":
            return (Path(c.train.out) / "final.pt").is_file()
        if stage == "test":
            return (Path(c.train.out) / "metrics.json").is_file()
        raise KeyError(stage)

    def run(self, until: str = "test") -> dict:
        if until not in STAGES:
            raise OvdError(f"unknown stage '{until}' (choose from {', '.join(STAGES)})")
        for stage in STAGES[: STAGES.index(until) + 1]:
            if not self.active(stage):
                self.log(f"[{stage}] off in this config")
                continue
            stamp, legacy = self.stamp(stage), self.stamp(stage, legacy=True)
            self.fresh_legacy[stage] = legacy
            old = self.stamps.get(self.key(stage))
            if old == legacy != stamp:  # written by an earlier ovd from these same settings
                old = self.stamps[self.key(stage)] = stamp
            if self.output_exists(stage) and old in (stamp, None):
                note = "made outside `ovd run`, reused as it is" if old is None else "up to date, reused"
                self.log(f"[{stage}] {note}")
                self.report[stage] = "reused"
            else:
                exists = self.output_exists(stage)
                self.log(f"[{stage}] running ({'settings changed' if exists else 'no output yet'})")
                t0 = time.time()
                runner = getattr(self, f"_run_{stage}")
                if stage != "train":
                    self.report[stage] = runner(stale=exists)
                else:  # the stamp goes down first: an interrupted run then resumes only with equal settings
                    self.report[stage] = runner(stale=exists, stamp=stamp)
                self.log(f"[{stage}] done in {time.time() - t0:.0f} s")
            self.fresh[stage] = stamp
            self._record(stage, stamp)
        return self.report

    # --- the stages ----------------------------------------------------------------------------------
    def _run_world(self, stale: bool):
        # never overwrite: the world is a pure function of (preset, seed, world version), which
        # generate_mini_world checks; a different world in that folder is its error, not a rebuild
        w = self.cfg.world
        knobs = {k: w[k] for k in WORLD_KNOBS}
        report = generate_mini_world(
            w.dir, preset=w.preset, seed=w.seed, progress=self.progress, version=w.version, knobs=knobs
        )
        if w.heldout_shapes:
            report["heldout_split"] = derive_shape_split(w.dir, list(w.heldout_shapes))
        return report

    def _run_pretrain(self, stale: bool):
        return pretrain_tiny_clip(self.cfg, progress=self.progress)

    def _run_adapt(self, stale: bool):
        return run_adapt(self.cfg, progress=self.progress)

    def _run_mine(self, stale: bool):
        return run_mine(self.cfg, overwrite=stale, progress=self.progress)

    def _run_extract(self, stale: bool):
        return run_extract(self.cfg, overwrite=stale, progress=self.progress)

    def _record(self, stage: str, stamp: str) -> None:
        # re-read first: other `ovd run`s (ablation variants) may share this work_dir's stamp file
        if self.stamp_file.is_file():
            self.stamps = {**read_json(self.stamp_file, "run stamps"), **{self.key(stage): stamp}}
        self.stamps[self.key(stage)] = stamp
        write_json(self.stamp_file, self.stamps)

    def _run_train(self, stale: bool, stamp: str):
        out = Path(self.cfg.train.out)
        if (out / "last.pt").is_file() and self.stamps.get(self.key("train")) not in (None, stamp):
            raise OvdError(
                f"{out} holds a training run made from other settings or inputs; delete it or set another "
                f"train.out (a run is never restarted silently)"
            )
        self._record("train", stamp)
        return run_train(self.cfg, progress=self.progress)

    def _run_test(self, stale: bool):
        return run_test(self.cfg, str(Path(self.cfg.train.out) / "final.pt"), progress=self.progress)


def run_pipeline(cfg, until: str = "test", progress: bool = True, log=print) -> dict:
    return Pipeline(cfg, progress, log).run(until)
