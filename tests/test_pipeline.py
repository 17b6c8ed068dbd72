"""``ovd run``: every stage in order, outputs reused when made from the same settings, re-run when a
setting they read changed, a training run never restarted silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from _fixtures import SMALL, run_err, subset_json

from ovd.cli import main
from ovd.config import load_config
from ovd.errors import OvdError
from ovd.mining.proposal_store import ProposalStore
from ovd.pipeline import STAGES, run_pipeline

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


def mtimes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def run(ov: list[str], until: str = "test") -> tuple[dict, list[str]]:
    logs: list[str] = []
    report = run_pipeline(load_config(CONFIG, ov), until=until, progress=False, log=logs.append)
    return report, logs


def by_stage(stamps: dict) -> dict[str, str]:
    """run_stamps.json keys are ``"<stage> <output path>"`` (or just the stage) -> stage: stamp."""
    out: dict[str, str] = {}
    for k, v in stamps.items():
        stage = k.split(" ", 1)[0]
        assert stage not in out, f"two stamps for stage {stage}: {stamps}"
        out[stage] = v
    return out


def status(logs: list[str]) -> dict[str, str]:
    """stage -> its first log line's text (``running (...)``, ``up to date, reused``, ...)."""
    out: dict[str, str] = {}
    for line in logs:
        stage, _, text = line.partition("] ")
        out.setdefault(stage.lstrip("["), text)
    return out


@pytest.fixture(scope="module")
def first(mini_world, tmp_path_factory):
    """One full ``ovd run`` in a fresh work_dir on the (already generated) smoke world."""
    root = tmp_path_factory.mktemp("pipeline")
    train4 = subset_json(mini_world / "det" / "train.json", root / "train4.json", 4)
    val3 = subset_json(mini_world / "det" / "val.json", root / "val3.json", 3)
    work = root / "work"
    ov = [f"world.dir={mini_world}", f"work_dir={work}", f"data.train_json={train4}", f"data.val_json={val3}", *SMALL]
    world_before = mtimes(mini_world)
    report, logs = run(ov)
    return SimpleNamespace(root=root, work=work, ov=ov, report=report, logs=logs, world_before=world_before)


def test_full_run_runs_every_stage(first, mini_world):
    st = status(first.logs)
    assert list(st) == list(STAGES)
    # the world exists already (no stamp): reused, not regenerated
    assert st["world"] == "made outside `ovd run`, reused as it is"
    assert mtimes(mini_world) == first.world_before
    for stage in STAGES[1:]:
        assert st[stage] == "running (no output yet)", (stage, first.logs)
        assert any(ln.startswith(f"[{stage}] done in ") for ln in first.logs), stage
    assert first.report["world"] == "reused"
    assert set(first.report) == set(STAGES)
    w = first.work
    assert (w / "tiny_clip" / "open_clip_config.json").is_file()
    assert (w / "clip_adapter.safetensors").is_file()
    proposals = list(ProposalStore(w / "proposals").records())
    assert proposals and len({p["image_id"] for p in proposals}) <= 4
    assert all(sum(p["image_id"] == i for p in proposals) <= 5 for i in {p["image_id"] for p in proposals})  # topk
    assert (w / "feature_cache" / "index.json").is_file()
    assert (w / "train" / "final.pt").is_file()
    assert first.report["train"]["iterations"] == 2  # 4 images / batch 2, 1 epoch
    metrics = json.loads((w / "train" / "metrics.json").read_text())
    assert {"AP", "AP50", "AP_base", "AP50_base", "AP_novel", "AP50_novel"} <= set(metrics)
    assert first.report["test"] == metrics
    stamps = by_stage(json.loads((w / "run_stamps.json").read_text()))
    assert set(stamps) == set(STAGES)
    assert all(isinstance(v, str) and v for v in stamps.values())


def test_identical_rerun_reuses_everything(first):
    before = mtimes(first.work, skip=("run_stamps.json",))
    stamps = (first.work / "run_stamps.json").read_text()
    report, logs = run(first.ov)
    assert status(logs) == {s: "up to date, reused" for s in STAGES}, logs
    assert not any("running" in ln or "done in" in ln for ln in logs)
    assert report == {s: "reused" for s in STAGES}
    after = mtimes(first.work, skip=("run_stamps.json",))
    assert after == before  # final.pt, metrics.json, proposal store, cache chunks... all untouched
    for name in ("train/final.pt", "train/metrics.json", "proposals/index.json", "feature_cache/index.json"):
        assert name in before
    assert json.loads((first.work / "run_stamps.json").read_text()) == json.loads(stamps)


def test_test_setting_change_reruns_only_test(first):
    val_copy = shutil.copy(first.root / "val3.json", first.root / "val3_copy.json")
    before = mtimes(first.work, skip=("run_stamps.json",))
    report, logs = run([*first.ov, f"data.val_json={val_copy}"])
    st = status(logs)
    assert st == {**{s: "up to date, reused" for s in STAGES[:-1]}, "test": "running (settings changed)"}, logs
    assert isinstance(report["test"], dict) and "AP50_novel" in report["test"]
    after = mtimes(first.work, skip=("run_stamps.json",))
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {"train/metrics.json", "train/detections.json"}
    # and back: the original val file is again a change for the test stage only
    _, logs = run(first.ov)
    assert status(logs)["test"] == "running (settings changed)"
    assert status(logs)["train"] == "up to date, reused"


def test_upstream_change_reruns_mine_extract_and_refuses_to_restart_training(first, capsys):
    final = first.work / "train" / "final.pt"
    final_before = final.stat().st_mtime_ns
    stamps_before = by_stage(json.loads((first.work / "run_stamps.json").read_text()))
    changed = [*first.ov, "miner.topk=3"]
    logs: list[str] = []
    with pytest.raises(OvdError) as e:
        run_pipeline(load_config(CONFIG, changed), progress=False, log=logs.append)
    msg = str(e.value)
    assert "train.out" in msg and str(first.work / "train") in msg and "never restarted silently" in msg
    st = status(logs)
    assert st["world"] == st["pretrain"] == st["adapt"] == "up to date, reused"
    assert st["mine"] == st["extract"] == "running (settings changed)"
    assert st["train"] == "running (settings changed)" and "test" not in st
    props = list(ProposalStore(first.work / "proposals").records())
    assert all(sum(p["image_id"] == p0["image_id"] for p in props) <= 3 for p0 in props)
    assert final.stat().st_mtime_ns == final_before  # the training run was left alone
    stamps = by_stage(json.loads((first.work / "run_stamps.json").read_text()))
    assert stamps["train"] == stamps_before["train"]  # the refused run did not take the training stamp
    # the CLI says the same in one line, exit status 2
    line = run_err(capsys, "run", CONFIG, *changed)
    assert "train.out" in line
    # back to the original settings: mine and extract run again, the training run is reused as it was
    report, logs = run(first.ov)
    st = status(logs)
    assert st["mine"] == st["extract"] == "running (settings changed)"
    assert st["train"] == st["test"] == "up to date, reused"
    assert final.stat().st_mtime_ns == final_before


def test_until_disabled_stage_and_output_made_outside(first, mini_world, tmp_path, capsys):
    """A fresh work_dir using the first run's tiny CLIP (so pretrain is off), adapter off, and
    proposals made with ``ovd mine`` before ``ovd run``."""
    work = tmp_path / "work"
    ov = [*first.ov, f"work_dir={work}", f"clip.model=local-dir:{first.work / 'tiny_clip'}", "adapter.enabled=false"]
    assert main(["mine", CONFIG, *ov]) == 0
    proposals = work / "proposals" / "index.json"  # the store's commit record
    assert proposals.is_file() and not (work / "run_stamps.json").exists()
    made = proposals.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["run", "--until", "extract", CONFIG, *ov]) == 0
    out = capsys.readouterr().out
    st = status([ln for ln in out.splitlines() if ln.startswith("[")])
    assert st == {
        "world": "made outside `ovd run`, reused as it is",
        "pretrain": "off in this config",
        "adapt": "off in this config",
        "mine": "made outside `ovd run`, reused as it is",
        "extract": "running (no output yet)",
    }, out
    assert proposals.stat().st_mtime_ns == made
    assert (work / "feature_cache" / "index.json").is_file()
    assert not (work / "train").exists()  # --until extract stops before training
    assert not (work / "clip_adapter.safetensors").exists() and not (work / "tiny_clip").exists()
    stamps = json.loads((work / "run_stamps.json").read_text())
    assert set(by_stage(stamps)) == {"world", "mine", "extract"}
    # an unknown stage: one error line, exit 2, nothing run
    line = run_err(capsys, "run", "--until", "bogus", CONFIG, *ov)
    assert "bogus" in line and "extract" in line
    assert json.loads((work / "run_stamps.json").read_text()) == stamps


def test_until_between_config_and_overrides():
    """``ovd run CONFIG --until STAGE key=value``: overrides after an option still count (argparse
    alone closes the ``overrides`` list at the option); a stray non-override token is still an error."""
    from ovd.cli import parse_args

    args = parse_args(["run", "cfg.yaml", "a=1", "--until", "extract", "seed=3"])
    assert (args.config, args.until, args.overrides) == ("cfg.yaml", "extract", ["a=1", "seed=3"])
    args = parse_args(["test", "cfg.yaml", "--ckpt", "x.pt", "seed=3"])
    assert (args.ckpt, args.overrides) == ("x.pt", ["seed=3"])
    with pytest.raises(SystemExit):
        parse_args(["run", "cfg.yaml", "--until", "extract", "stray"])


def test_image_root_change_is_a_change_for_train_and_test(first, mini_world, tmp_path):
    """BUG: ``data.image_root`` was not among the keys the train and test stages read (the stage
    table, ovd.stages), yet run_train loads the train images from it and run_test the val images (when
    ``data.val_image_root`` is empty, as in configs/mini). With distillation off (so no upstream
    extract stamp carries it) pointing data.image_root at other images reuses the trained detector
    and its metrics as "up to date" instead of refusing (train.out holds a run from other inputs)."""
    images = tmp_path / "images"
    for name in ("train4.json", "val3.json"):
        for im in json.loads((first.root / name).read_text())["images"]:
            (images / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mini_world / "det" / "images" / im["file_name"], images / im["file_name"])
    ov = [*first.ov, f"work_dir={tmp_path / 'work'}", f"clip.model=local-dir:{first.work / 'tiny_clip'}",
          "adapter.enabled=false", "miner.enabled=false", "model.distill=false"]  # fmt: skip
    _, logs = run(ov)
    st = status(logs)
    assert st["train"] == st["test"] == "running (no output yet)"
    assert st["extract"] == st["mine"] == st["adapt"] == st["pretrain"] == "off in this config"
    with pytest.raises(OvdError, match="train.out"):
        _, logs = run([*ov, f"data.image_root={images}"])
        print(logs)  # today: every stage "up to date, reused"


def test_a_changed_world_stamp_never_rebuilds_the_world_or_reruns_on_unread_keys(first, mini_world):
    # a stale world stamp (e.g. from an older ovd) must not regenerate the world — other runs may be
    # reading it — and settings no stage reads must not invalidate anything
    stamps_file = first.work / "run_stamps.json"
    saved = stamps_file.read_text()
    stamps = json.loads(saved)
    key = next(k for k in stamps if k.startswith("world "))
    stamps[key] = "0000000000000000"
    stamps_file.write_text(json.dumps(stamps))
    before = mtimes(mini_world)
    try:
        _, logs = run([*first.ov, "train.eval_every=7", "train.checkpoint_every=3"])
        st = status(logs)
        assert st["world"] == "running (settings changed)"
        assert mtimes(mini_world) == before  # generate_mini_world recognised its own world
        # the world's stamp is made of the keys that define it, so downstream stamps are unchanged
        assert all(st[s] == "up to date, reused" for s in STAGES[1:]), logs
    finally:
        stamps_file.write_text(saved)
