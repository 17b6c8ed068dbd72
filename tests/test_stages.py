"""The stage table (ovd.stages): every config key accounted for, and the key lists the checks
compare derived from it without changing what existing outputs recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ovd.config import load_config, schema_keys
from ovd.config_schema import Config
from ovd.pipeline import STAGES, Pipeline
from ovd.stages import NO_OUTPUT, reads, stamp_keys, unaccounted
from ovd.stages import STAGES as TABLE

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


def test_every_config_key_is_read_by_a_stage_or_marked_as_shaping_no_output():
    assert unaccounted() == [], "declare these keys in ovd/stages.py (a stage's reads / writes, or NO_OUTPUT)"
    keys = set(schema_keys(Config))
    declared = set(NO_OUTPUT)
    for stage in TABLE.values():
        for entry in (*stage.reads, *stage.own()):
            assert entry in keys or any(k.startswith(entry + ".") for k in keys), (stage.name, entry)
            declared.add(entry)
        assert set(stage.upstream) <= set(TABLE), stage.name
    assert not set(NO_OUTPUT) & {k for s in TABLE for k in reads(s)}  # never both
    assert set(STAGES) <= set(TABLE)  # every `ovd run` stage is declared


def test_the_derived_key_lists_are_the_ones_existing_outputs_recorded():
    """Checkpoints record TRAIN_RUN_KEYS as train_settings and proposal stores hash SETTINGS_KEYS:
    a change of either refuses every existing resume / recomputes every store, so it must be a
    decision, not a side effect of editing the table."""
    from ovd.engine.trainer import ARCH_KEYS, TRAIN_RUN_KEYS
    from ovd.mining.miner import SETTINGS_KEYS
    from ovd.replay.generator import generator_settings

    assert set(TRAIN_RUN_KEYS) == {"optimizer", "lr", "momentum", "weight_decay", "batch_size", "schedule", "epochs",
                                   "lr_steps", "warmup_iters", "grad_clip", "hflip", "amp", "init_from", "freeze"}
    assert set(SETTINGS_KEYS) == {"stride", "scales", "ratios", "min_size", "objectness", "vocabulary", "nms_thr",
                                  "base_iou_thr", "topk", "batch_size", "background_prompts"}  # fmt: skip
    assert set(ARCH_KEYS) == {"backbone", "norm", "fpn_channels", "representation_size", "semantic_regression"}
    g = generator_settings(load_config(None))
    assert set(g) == {"noise_dim", "hidden", "trunk_channels", "fit"}
    assert set(g["fit"]) == {"fit_iters", "fit_batch_per_class", "fit_lr", "stat_weight", "ce_weight",
                             "diversity_weight", "seed"}  # fmt: skip


def _pipeline(tmp_path, *extra, log=None):
    cfg = load_config(CONFIG, [f"world.dir={tmp_path / 'world'}", f"work_dir={tmp_path / 'work'}", *extra])
    p = Pipeline(cfg, progress=False, log=(log.append if log is not None else lambda *_: None))
    p.output_exists = lambda stage: True  # every output "on disk": only the stamps decide

    def refuse(*_, **__):
        raise AssertionError("a stage ran")

    for stage in STAGES:
        setattr(p, f"_run_{stage}", refuse)
    return p


def test_stamps_of_the_earlier_format_are_recognised_and_rewritten(tmp_path):
    old = _pipeline(tmp_path)
    stamps = {}
    for stage in STAGES:  # what an ovd before the stage table wrote
        if old.active(stage):
            old.fresh_legacy[stage] = stamps[old.key(stage)] = old.stamp(stage, legacy=True)
    (tmp_path / "work").mkdir(parents=True)
    (tmp_path / "work" / "run_stamps.json").write_text(json.dumps(stamps))
    logs = []
    report = _pipeline(tmp_path, log=logs).run()
    assert set(report.values()) == {"reused"}, logs
    new = json.loads((tmp_path / "work" / "run_stamps.json").read_text())
    assert new.keys() == stamps.keys() and all(new[k] != stamps[k] for k in new)  # now in the current format
    assert set(_pipeline(tmp_path).run().values()) == {"reused"}
    # a changed setting is still a change: train and test run again
    with pytest.raises(AssertionError, match="a stage ran"):
        _pipeline(tmp_path, "train.lr=0.01").run()


@pytest.mark.parametrize("key, value", [("train.device", "cpu"), ("train.checkpoint_every", 7), ("miner.out", "x"),
                                        ("clip.allow_download", False), ("train.max_iters", 3)])  # fmt: skip
def test_keys_that_shape_no_output_change_no_stamp(tmp_path, key, value):
    a = _pipeline(tmp_path)
    b = _pipeline(tmp_path, f"{key}={value}")
    for stage in STAGES:
        if key not in stamp_keys(stage):
            a.fresh[stage], b.fresh[stage] = a.stamp(stage), b.stamp(stage)
            assert a.fresh[stage] == b.fresh[stage], (stage, key)
