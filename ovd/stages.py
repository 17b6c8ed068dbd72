"""Which config keys each stage reads: the one declaration behind every "same inputs?" check.

Each :class:`Stage` names the config keys whose values shape its output (``reads``), the keys naming
input files it hashes by content (``files``), the keys naming its outputs (``writes``), keys that
set only how its output is laid out on disk (``layout``), and the stages whose outputs it consumes
(``upstream``); ``switch`` is the key that turns it on or off in ``ovd run`` (not a setting of its
output). A section name ("model") stands for every key of that section except those in
:data:`NO_OUTPUT` and those the stage lists elsewhere. Every consumer reads this table:

* ``ovd run``'s stamps (:mod:`ovd.pipeline`): a stage reruns when a key it reads changes;
* the training resume check and ``train.init_from`` (:mod:`ovd.engine.trainer`: the ``train.*``
  keys of the ``train`` stage, :data:`ARCHITECTURE`);
* the proposal store's content hash (:mod:`ovd.mining.miner`: the ``miner.*`` keys of ``mine``);
* the generator's recorded settings and the few-shot reuse check (:mod:`ovd.replay`).

:data:`NO_OUTPUT` lists, with the reason, the keys that shape no output at all. A test walks the
schema: every key is read, written or laid out by some stage, or is in :data:`NO_OUTPUT`. Adding a
stage is one entry here; adding a config key is one entry here too.
"""

from __future__ import annotations

from dataclasses import dataclass

from ovd.config import schema_keys
from ovd.config_schema import Config

# keys that change no result of any stage, and why
NO_OUTPUT = {
    "name": "names the run; only work_dir's default reads it",
    "work_dir": "where outputs go by default (each output key names its own place)",
    "clip.allow_download": "whether weights may be downloaded; the weights' content is fingerprinted",
    "train.device": "where training runs",
    "train.checkpoint_every": "how often last.pt is written; a resumed run equals an uninterrupted one",
    "train.eval_every": "how often val is evaluated during training (eval.jsonl); no effect on the weights",
    "train.max_iters": "where this invocation stops; the schedule stays that of the full run",
    "replay.checkpoint_every": "how often a few-shot run writes last.pt; a resumed run is bit-identical",
    "pretrain.threads": "torch threads of the tiny-CLIP pre-training (speed)",
    "train.workers": "loader processes decoding training images; the sampler's draws are made in the main process",
    "test.workers": "loader processes decoding val images (speed)",
    "miner.workers": "loader processes decoding and cropping for the miner; the CLIP forward is the main process's",
    "extract.workers": "loader processes decoding and cropping for the extraction (speed)",
}

# model keys that shape the detector's parameters: a checkpoint used by train.init_from must match them
ARCHITECTURE = ("model.backbone", "model.norm", "model.fpn_channels", "model.representation_size",
                "model.semantic_regression")  # fmt: skip


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]
    upstream: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    layout: tuple[str, ...] = ()
    switch: str = ""

    def own(self) -> tuple[str, ...]:
        """The keys this stage declares besides ``reads`` (never hashed as settings)."""
        return (*self.writes, *self.files, *self.layout, *((self.switch,) if self.switch else ()))


_DATA_TRAIN = ("data.train_json", "data.image_root", "data.split")
_TRAIN_RUN = ("train.optimizer", "train.lr", "train.momentum", "train.weight_decay", "train.batch_size",
              "train.schedule", "train.epochs", "train.lr_steps", "train.warmup_iters", "train.grad_clip",
              "train.hflip", "train.amp", "train.init_from", "train.freeze")  # fmt: skip
_REPLAY_FIT = ("replay.noise_dim", "replay.hidden", "replay.trunk_channels", "replay.fit_iters",
               "replay.fit_batch_per_class", "replay.fit_lr", "replay.stat_weight", "replay.ce_weight",
               "replay.diversity_weight")  # fmt: skip

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("world", ("world.preset", "world.seed", "world.version", "world.heldout_shapes", "world.novel_attributes",
                    "world.kind_aspect", "world.web_per_class", "world.web_style"), writes=("world.dir",)),
    Stage("pretrain", ("pretrain", "data.web_train_json", "data.web_val_json", "data.web_image_root", "seed"),
          upstream=("world",), writes=("pretrain.out",)),
    Stage("adapt", ("adapter", "clip", *_DATA_TRAIN, "seed"), upstream=("pretrain",),
          writes=("adapter.out",), switch="adapter.enabled"),
    Stage("mine", ("miner", "clip", "adapter.enabled", *_DATA_TRAIN), upstream=("adapt", "pretrain"),
          writes=("miner.out",), files=("miner.external_proposals",), layout=("miner.chunk_size",),
          switch="miner.enabled"),
    Stage("extract", ("extract", "clip", "adapter.enabled", "miner.enabled", "miner.stride", "miner.scales",
                      "miner.ratios", "miner.min_size", *_DATA_TRAIN, "seed"),
          upstream=("mine", "adapt", "pretrain"), writes=("extract.out",), layout=("extract.chunk_size",)),
    Stage("train", ("model", *_TRAIN_RUN, "clip", *_DATA_TRAIN, "seed"), upstream=("extract", "pretrain"),
          writes=("train.out",)),
    # test.batch_size: torchvision pads a batch to one size, which can move a score in its last digits
    Stage("test", ("data.val_json", "data.image_root", "data.val_image_root", "data.lvis", "data.split", "clip",
                   "test.batch_size"),
          upstream=("train",)),
    # the replay stages read the base checkpoint given on the command line (its hash is recorded)
    Stage("replay stats", _DATA_TRAIN, upstream=("train",), writes=("replay.stats",)),
    Stage("replay fit", (*_REPLAY_FIT, "seed"), upstream=("replay stats",), files=("replay.stats",),
          writes=("replay.generator",)),
    Stage("fewshot", ("replay.heldout_every", "replay.heldout_in_vocabulary", "replay.iters", "replay.lr",
                      "replay.batch_size", "replay.warmup_iters", "replay.freeze", "replay.replay_rois",
                      "replay.replay_background", "replay.teacher_weight", "replay.teacher_terms", "model",
                      "train.optimizer", "train.momentum", "train.weight_decay", "train.grad_clip", "train.hflip",
                      "train.amp", "clip", "data.image_root", "data.val_image_root", "data.split", "data.lvis"),
          upstream=("replay fit", "train"), writes=("replay.fewshot_out",),
          files=("data.train_json", "data.val_json", "replay.fewshot_dir", "replay.generator", "replay.stats")),
    # ovd student: the student's own settings on top of a training run's (the teacher file's hash is recorded)
    Stage("student", ("student", "model", *_TRAIN_RUN, "clip", *_DATA_TRAIN, "seed"), upstream=("train",),
          writes=("student.out", "student.adversarial_cache_dir"), files=("student.teacher",)),
)}  # fmt: skip


def _sections() -> dict[str, list[str]]:
    """Section name -> its dotted keys, in schema order (top-level keys are their own section)."""
    out: dict[str, list[str]] = {}
    for key in schema_keys(Config):
        out.setdefault(key.split(".")[0] if "." in key else key, []).append(key)
    return out


def expand(entries, skip=()) -> list[str]:
    """Dotted keys of ``entries`` (sections expanded in schema order), without :data:`NO_OUTPUT`
    and ``skip``; duplicates dropped, first position kept."""
    sections, out = _sections(), []
    for e in entries:
        keys = sections[e] if "." not in e and e in sections and sections[e] != [e] else [e]
        out += [k for k in keys if k not in NO_OUTPUT and k not in skip and k not in out]
    return out


def stage(name: str) -> Stage:
    return STAGES[name]


def reads(name: str) -> list[str]:
    """The keys whose values shape stage ``name``'s output (sections expanded)."""
    s = STAGES[name]
    return expand(s.reads, skip=s.own())


def stamp_keys(name: str) -> list[str]:
    """What ``ovd run``'s stamp of stage ``name`` hashes: the keys it reads, its input file paths
    and its layout (an output of another layout is rewritten)."""
    s = STAGES[name]
    return [*reads(name), *expand(s.files), *expand(s.layout)]


def section_reads(name: str, section: str) -> tuple[str, ...]:
    """The keys of ``section`` that stage ``name`` reads, without the section prefix."""
    return tuple(k.split(".", 1)[1] for k in reads(name) if k.startswith(section + "."))


def unaccounted() -> list[str]:
    """Schema keys no stage reads, writes, hashes or lays out and that are not in :data:`NO_OUTPUT`."""
    seen = set(NO_OUTPUT)
    for s in STAGES.values():
        seen |= set(expand((*s.reads, *s.own())))
    return [k for keys in _sections().values() for k in keys if k not in seen]
