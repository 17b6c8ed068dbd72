"""tools/run_ablation.py: the variants and the EZSD-faithful options run on any bench world, an option
never overwrites what (d) and (e) read, and the paired verdicts follow their rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ovd.config import load_config
from ovd.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import run_ablation as ra  # noqa: E402


def _select(cfg, key):
    return OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, key)}), resolve=True)["v"]


def _changed_stages(a, b) -> set[str]:
    """Stages whose settings differ between two configs, directly or through an upstream stage."""
    changed: set[str] = set()
    for name, st in STAGES.items():  # STAGES is in pipeline order: upstream stages come first
        if any(_select(a, k) != _select(b, k) for k in st.reads) or changed & set(st.upstream):
            changed.add(name)
    return changed


@pytest.mark.parametrize("option", list(ra.OPTIONS))
def test_an_option_writes_every_stage_it_changes_to_its_own_folder(option):
    e = load_config(str(ROOT / "configs/mini/bench.yaml"), ra.variant_overrides("e"))
    o = load_config(str(ROOT / "configs/mini/bench.yaml"), ra.variant_overrides(option))
    changed = _changed_stages(e, o) & {"adapt", "mine", "extract", "train"}
    assert "train" in changed  # every option changes the detector it trains
    for name in changed:
        for key in STAGES[name].writes:
            assert _select(o, key) != _select(e, key), (option, name, key)
    # the unchanged stages' outputs are (e)'s, so they are shared, not remade
    for name in {"adapt", "mine", "extract"} - changed:
        for key in STAGES[name].writes:
            assert _select(o, key) == _select(e, key), (option, name, key)
    assert o.train.eval_every == 0 and e.train.eval_every > 0


def test_the_variants_run_on_another_bench_world():
    # the same variant settings on world v3's bench: only the world (and its speed/teacher settings) differ
    v3 = load_config(str(ROOT / "configs/mini/bench_v3.yaml"), ra.variant_overrides("b"))
    cal = load_config(str(ROOT / "configs/mini/bench.yaml"), ra.variant_overrides("b"))
    assert (v3.world.novel_attributes, v3.world.kind_aspect, v3.world.web_style) == ("shared", "square", "clean")
    assert (cal.world.novel_attributes, cal.world.kind_aspect, cal.world.web_style) == ("own", "coco", "scene")
    for cfg in (v3, cal):
        assert not cfg.adapter.enabled and not cfg.miner.enabled and cfg.extract.random_boxes == 20
    assert v3.world.dir != cal.world.dir and v3.work_dir != cal.work_dir


@pytest.mark.parametrize(
    "diffs, expected",
    [
        ([1.0, 1.9, 1.0], "reproduces"),
        ([-1.0, -2.0, -1.5], "the opposite holds"),
        ([1.0, -0.5, 2.0], "does not reproduce (within seed noise)"),  # signs disagree
        ([0.1, 5.0, 0.2], "does not reproduce (within seed noise)"),  # same sign, std > mean
        ([3.0], "1 seed: too few for a verdict"),
        ([3.0, 3.1], "2 seeds: too few for a verdict"),  # the same sign twice is not enough
    ],
)
def test_verdict_rule(diffs, expected):
    assert ra.verdict(diffs) == expected


def test_summary_pairs_claims_and_options_by_seed():
    def run(a, e, opt):
        return {"variants": {k: dict.fromkeys(ra.METRICS, v) for k, v in (("a", a), ("e", e), ("scale100", opt))}}

    results = {0: run(0.10, 0.12, 0.11), 1: run(0.20, 0.23, 0.25), 2: run(0.05, 0.06, 0.04)}
    s = ra.summarise(results, ["a", "e", "scale100"])
    by = {p["difference"]: p for p in s["paired"]}
    assert set(by) == {"e - a", "scale100 - e"}  # only claims whose two variants ran, plus the option
    assert by["e - a"]["per_seed"]["AP50_novel"] == pytest.approx([2.0, 3.0, 1.0])
    assert by["e - a"]["verdict"] == "reproduces"
    assert by["scale100 - e"]["per_seed"]["AP50_novel"] == pytest.approx([-1.0, 2.0, -2.0])
    assert by["scale100 - e"]["verdict"].startswith("does not reproduce")
    text = "\n".join(ra.seeds_lines(s))
    assert "+2.0 ± 1.0 (per seed +2.0, +3.0, +1.0)" in text and "**reproduces**" in text


def test_summary_of_a_partial_run_pairs_only_the_seeds_where_both_ran():
    full = dict.fromkeys(ra.METRICS, 0.10)
    results = {
        0: {"variants": {"e": full, "bg_free": dict.fromkeys(ra.METRICS, 0.12)}},
        1: {"variants": {"e": full, "bg_free": dict.fromkeys(ra.METRICS, 0.13)}},
        2: {"variants": {"e": full}},
    }  # fmt: skip  (the option not run on seed 2 yet)
    s = ra.summarise(results, ["e", "bg_free"])
    assert s["variants"]["e"]["seeds"] == [0, 1, 2] and s["variants"]["bg_free"]["seeds"] == [0, 1]
    (p,) = s["paired"]
    assert p["seeds"] == [0, 1] and p["per_seed"]["AP50_novel"] == pytest.approx([2.0, 3.0])
    assert p["verdict"] == "2 seeds: too few for a verdict"
    text = "\n".join(ra.seeds_lines(s))
    assert "| 12.5 ± 0.7 |" in text and "| 0, 1 |" in text


def test_the_calibration_per_seed_comes_from_the_text_only_run_and_the_probes():
    probe = {"crop_top1": {"raw": {"base": 0.5, "novel": 0.42}, "adapted": {"base": 0.7, "novel": 0.6}},
             "miner_recall": {"recall_miner": 0.13, "recall_base_names": 0.04, "recall_random": 0.03}}  # fmt: skip
    results = {
        s: {"variants": {"a": {**dict.fromkeys(ra.METRICS, 0.6), "AP50_novel": 0.6 * r}}, "probes": probe}
        for s, r in ((0, 0.05), (1, 0.25))
    }
    lines = ra.probe_lines(ra.summarise(results, ["a"]))
    assert lines[-2] == "| 0 | 0.05 | 50.0 / 42.0 % | 70.0 / 60.0 % | 13.0 % | 4.0 % | 3.0 % |"
    assert lines[-1].startswith("| 1 | 0.25 |")


def test_diagnosis_reads_each_runs_detections_and_reuses_a_fresh_targets_report(tmp_path):
    import json

    world, work = tmp_path / "world", tmp_path / "work"
    (world / "det").mkdir(parents=True)
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "cow"}]
    gt = {"images": [{"id": 1}], "categories": cats, "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10]}]}  # fmt: skip
    (world / "det" / "val.json").write_text(json.dumps(gt))
    (world / "split.json").write_text(json.dumps({"base": ["cow"], "novel": ["cat"]}))
    ov = [f"world.dir={world}", f"work_dir={work}"]
    bench = ROOT / "configs/mini/bench.yaml"
    for v, box in (("a", [20, 20, 10, 10]), ("b", [0, 0, 10, 10])):  # (a) calls the cow a cat, (b) finds the cat
        out = Path(load_config(str(bench), [*ra.variant_overrides(v), *ov]).train.out)
        out.mkdir(parents=True)
        (out / "detections.json").write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": box, "score": 1}]))
    report = {g: {"share": 0.2, "named_novel": 0.5} for g in ("novel", "base", "part of novel", "part of base",
                                                              "background")}  # fmt: skip
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "b.json").write_text(json.dumps(report))  # no cache chunks are newer: reused as is
    diag = {v: ra.diagnose(bench, v, ov, tmp_path) for v in ("a", "b")}
    assert diag["a"]["novel_errors"]["base object"] == 1.0 and "targets" not in diag["a"]  # (a) distils nothing
    assert diag["b"]["novel_errors"]["correct"] == 1.0 and diag["b"]["targets"] == report
    runs = {v: dict.fromkeys(ra.METRICS, 0.1) for v in "ab"}
    s = ra.summarise({0: {"variants": runs, "diagnosis": diag}}, ["a", "b"])
    text = "\n".join(ra.diagnosis_lines(s))
    assert "| (a) base-only, text classifier, no distillation | 1 | 0 | 0 | 0 | 100 | 0 | 0 |" in text
    assert "| (b) ViLD-style: raw CLIP, GT + random boxes | 1 | 20 [50] | 20 [50] |" in text
