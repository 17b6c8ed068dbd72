"""tools/run_world_sweep.py and tools/plot_world_sweep.py: the sweep applies exactly the ablation's
variant settings on any preset, resumes from finished runs, and the table/figure aggregate seeds."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ovd.config import load_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import plot_world_sweep  # noqa: E402
import run_world_sweep as sweep  # noqa: E402


@pytest.mark.parametrize("variant", list(sweep.VARIANTS))
def test_variant_overrides_reproduce_the_ablation_configs(variant):
    # the ablation YAML on bench == bench + the sweep's overrides read from that YAML
    name = sweep.VARIANTS[variant][0]
    direct = load_config(str(ROOT / "configs/mini/ablation" / f"{name}.yaml"))
    via = load_config(str(ROOT / "configs/mini/bench.yaml"), sweep.variant_overrides(variant))
    assert OmegaConf.to_container(direct, resolve=True) == OmegaConf.to_container(via, resolve=True)


def test_world_runs_get_their_own_folders_and_knobs():
    ov = sweep.run_overrides(sweep.world_overrides("all", 2, "W", "D"), "e", ["train.epochs=1"])
    cfg = load_config(str(ROOT / "configs/mini/sweep.yaml"), ov)
    assert (cfg.world.seed, cfg.world.dir, cfg.work_dir) == (2, "D/all-seed2", "W/all-seed2")
    assert (cfg.world.novel_attributes, cfg.world.kind_aspect, cfg.world.web_style) == ("own", "coco", "scene")
    assert cfg.train.eval_every == 0 and cfg.train.epochs == 1  # the sweep's, then the user's, win
    assert cfg.train.out == "W/all-seed2/ablation/e_full"
    base = load_config(str(ROOT / "configs/mini/sweep.yaml"), sweep.run_overrides(sweep.world_overrides(
        "baseline", 0, "W", "D"), "a", []))  # fmt: skip
    assert (base.world.novel_attributes, base.world.kind_aspect, base.world.web_style) == ("shared", "square", "clean")
    assert base.world.preset == "sweep" and not base.model.distill


def test_a_run_without_outputs_is_not_finished(tmp_path):
    cfg = load_config(str(ROOT / "configs/mini/smoke.yaml"), [f"work_dir={tmp_path}/w", f"world.dir={tmp_path}/d"])
    assert not sweep.finished(cfg)


def _result(setting, seed, novel, base, raw_novel):
    return {
        "setting": setting,
        "seed": seed,
        "variants": {"a": {"AP50_novel": novel, "AP50_base": base}, "e": {"AP50_novel": novel / 2, "AP50_base": base}},
        "probes": {
            "crop_top1": {k: {"base": 0.5, "novel": raw_novel, "all": 0.4} for k in ("raw", "adapted")},
            "miner_recall": {"recall_miner": 0.3},
        },
    }


def test_plot_aggregates_seeds(tmp_path):
    rows = [_result("baseline", s, n, 0.5, r) for s, n, r in ((0, 0.2, 0.1), (1, 0.3, 0.2), (2, 0.4, 0.3))]
    rows.append(_result("own", 0, 0.05, 0.4, 0.5))
    del rows[2]["variants"]["e"]  # (e) not run on seed 2: paired differences use seeds 0 and 1 only
    rows[0]["variants"]["a"]["cpu"] = "x86_64 AVX2"
    (tmp_path / "record").mkdir()
    for r in rows:
        (tmp_path / "record" / f"{r['setting']}-seed{r['seed']}.json").write_text(json.dumps(r))
    out = tmp_path / "fig" / "sweep.png"
    argv = ["--record", str(tmp_path / "record"), "--out", str(out), "--variants", "a", "e"]
    assert plot_world_sweep.main(argv) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = out.with_suffix(".md").read_text()
    sd = 100 * statistics.stdev([0.2, 0.3, 0.4])
    assert f"| baseline | (a) text-only | 50.0 ± 0.0 (n=3) | 30.0 ± {sd:.1f} (n=3) | 0.60 ± 0.20 (n=3) |" in md
    assert "| baseline | (e) full | 50.0 ± 0.0 (n=2) | 12.5 ± " in md
    # (e) - (a), paired by seed: novel -10 and -15 on seeds 0 and 1, base 0
    assert f"| baseline | -12.5 ± {statistics.stdev([-10, -15]):.1f} (n=2) | 0.0 ± 0.0 (n=2) |" in md
    assert "| own | -2.5 (n=1) | 0.0 (n=1) |" in md
    assert "Runs per CPU kind: unknown: 6, x86_64 AVX2: 1." in md
    assert "| own | (a) text-only | 40.0 (n=1) | 5.0 (n=1) |" in md
    assert f"| baseline | 50.0 ± 0.0 (n=3) | 20.0 ± {100 * statistics.stdev([0.1, 0.2, 0.3]):.1f} (n=3) |" in md
    # baseline comes first (the sweep's order), whatever the folder names sort to
    assert md.index("| baseline |") < md.index("| own |")


def _args(tmp_path, **kw):
    ns = dict(preset=str(ROOT / "configs/mini/smoke.yaml"), settings=["baseline", "own"], seeds=[0],
              variants=["a", "b"], work_root=str(tmp_path / "w"), data_root=str(tmp_path / "d"),
              record=str(tmp_path / "record"), overrides=[], no_probes=True, recall_images=10)  # fmt: skip
    return argparse.Namespace(**{**ns, **kw})


def _variant_jobs(jobs):
    return sorted(j.name for j in jobs if j.name.endswith(")"))


def test_the_record_lets_a_fresh_checkout_resume(tmp_path):
    # nothing on disk, nothing recorded: every variant of every world is planned
    args = _args(tmp_path)
    jobs, worlds = sweep.plan(args)
    assert _variant_jobs(jobs) == ["baseline seed 0 (a)", "baseline seed 0 (b)", "own seed 0 (a)", "own seed 0 (b)"]
    assert all(j.world == ("baseline", 0) for j in jobs if j.name.startswith("baseline"))
    # a record of (a) on the baseline world under today's stamp: (a) is reused, (b) still runs
    ov, out = worlds[("baseline", 0)]
    stamp = sweep._pipeline(load_config(args.preset, sweep.run_overrides(ov, "a", []))).fresh["test"]
    run = {"stamp": stamp, "cpu": "x86_64 AVX2", "AP50_novel": 0.1}  # made on another kind of CPU
    rec = {"setting": "baseline", "seed": 0, "variants": {"a": run}}
    path = sweep.record_path(args.record, "baseline", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    jobs, _ = sweep.plan(args)
    assert _variant_jobs(jobs) == ["baseline seed 0 (b)", "own seed 0 (a)", "own seed 0 (b)"]
    # the record survives being rewritten while nothing is on disk
    res = sweep.result_of(args.preset, ov, ["a", "b"], out, [], sweep.read_record(path))
    assert res["variants"] == {"a": rec["variants"]["a"]}
    # settings changed since (another training length): the recorded run is stale and runs again
    jobs, _ = sweep.plan(_args(tmp_path, overrides=["train.epochs=1"]))
    assert "baseline seed 0 (a)" in _variant_jobs(jobs)
    # a damaged record counts as nothing done, never as done
    path.write_text("{not json")
    assert "baseline seed 0 (a)" in _variant_jobs(sweep.plan(args)[0])


def test_collect_writes_records_only_for_worlds_with_results(tmp_path):
    common = ["--preset", str(ROOT / "configs/mini/smoke.yaml"), "--settings", "baseline", "own", "--seeds", "0",
              "--variants", "a", "--work-root", str(tmp_path / "w"), "--data-root", str(tmp_path / "d"),
              "--record", str(tmp_path / "record"), "--no-probes", "--collect"]  # fmt: skip
    sweep.main(common)
    assert not (tmp_path / "record").exists() or not list((tmp_path / "record").iterdir())
    # a recorded run under today's stamp survives a collect that finds nothing on disk
    ov = sweep.world_overrides("own", 0, str(tmp_path / "w"), str(tmp_path / "d"))
    cfg = load_config(str(ROOT / "configs/mini/smoke.yaml"), sweep.run_overrides(ov, "a", []))
    rec = {"variants": {"a": {"stamp": sweep._pipeline(cfg).fresh["test"], "AP50_novel": 0.25}}}
    path = sweep.record_path(tmp_path / "record", "own", 0)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rec))
    sweep.main(common)
    assert [p.name for p in (tmp_path / "record").iterdir()] == ["own-seed0.json"]
    got = json.loads(path.read_text())
    assert (got["setting"], got["seed"], got["variants"]) == ("own", 0, rec["variants"])


def test_sweep_table_gives_the_ablation_verdict_per_setting(tmp_path):
    # baseline: (e) = (a) / 2 on three seeds -> -10, -15, -20 novel AP50: worse on every seed
    rows = [_result("baseline", s, n, 0.5, 0.1) for s, n in ((0, 0.2), (1, 0.3), (2, 0.4))]
    # own: (e) above (a) on two seeds, below on one -> no verdict either way
    rows += [_result("own", s, 0.1, 0.5, 0.1) for s in (0, 1, 2)]
    for s, e in ((0, 0.2), (1, 0.15), (2, 0.05)):
        rows[3 + s]["variants"]["e"]["AP50_novel"] = e
    rows.append(_result("teacher", 0, 0.1, 0.5, 0.1))  # one seed: too few
    (tmp_path / "record").mkdir()
    for r in rows:
        (tmp_path / "record" / f"{r['setting']}-seed{r['seed']}.json").write_text(json.dumps(r))
    out = tmp_path / "sweep.png"
    assert plot_world_sweep.main(["--record", str(tmp_path / "record"), "--out", str(out), "--variants", "a", "e"]) == 0
    md = out.with_suffix(".md").read_text()
    assert "| baseline | (e) − (a) | 0: -10.0, 1: -15.0, 2: -20.0 | -15.0 ± 5.0 | the opposite holds |" in md
    noise = "does not reproduce (within seed noise)"
    assert f"| own | (e) − (a) | 0: +10.0, 1: +5.0, 2: -5.0 | +3.3 ± 7.6 | {noise} |" in md
    assert "| teacher | (e) − (a) | 0: -5.0 | -5.0 | 1 seed: too few for a verdict |" in md
