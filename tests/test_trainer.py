"""Training engine mechanics: exact resume, checkpoints, logs, schedules (issue 5, first part)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import tiny_clip_dir

from ovd.config import load_config
from ovd.engine.trainer import load_checkpoint, run_train, schedule_epochs
from ovd.errors import OvdError

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


@pytest.fixture(scope="module")
def setup(mini_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    clip_dir = tiny_clip_dir(root / "clip")
    train = json.loads((mini_world / "det" / "train.json").read_text())
    keep = {im["id"] for im in train["images"][:4]}
    train["images"] = [im for im in train["images"] if im["id"] in keep]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] in keep]
    (root / "train4.json").write_text(json.dumps(train))
    return root, clip_dir


def cfg_for(setup, mini_world, work: Path, *extra: str):
    root, clip_dir = setup
    return load_config(
        CONFIG,
        [
            f"world.dir={mini_world}",
            f"work_dir={work}",
            f"clip.model=local-dir:{clip_dir}",
            f"data.train_json={root / 'train4.json'}",
            "model.distill=false",
            "model.min_size=96",
            "model.max_size=96",
            "model.box_batch_size_per_image=32",
            "train.batch_size=2",
            "train.epochs=2",
            "train.lr_steps=[1]",
            "train.warmup_iters=2",
            "train.checkpoint_every=1",
            *extra,
        ],
    )


def test_resume_after_interruption_equals_an_uninterrupted_run(setup, mini_world, tmp_path):
    full = run_train(cfg_for(setup, mini_world, tmp_path / "a"), progress=False)
    assert full["iterations"] == 4  # 4 images / batch 2 x 2 epochs
    cfg_b = cfg_for(setup, mini_world, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg_b, progress=False, stop_after=3)
    assert load_checkpoint(tmp_path / "b" / "train" / "last.pt")["iteration"] == 3
    # a line logged after the last checkpoint (a kill between the two) is replayed, not duplicated
    log = tmp_path / "b" / "train" / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"iter": 4, "loss": 0.0}) + "\n")
    resumed = run_train(cfg_b, progress=False)
    assert resumed["iterations"] == 4
    a = load_checkpoint(tmp_path / "a" / "train" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "train" / "final.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the JSONL log has one line per iteration, the resumed run appending after the interruption
    lines = [json.loads(x) for x in (tmp_path / "b" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 3, 4]
    assert all({"loss", "lr", "loss_classifier", "loss_box_reg", "loss_objectness"} <= set(r) for r in lines)
    assert "loss_distill" not in lines[0]  # model.distill=false switches the term off


def test_named_schedules():
    class T:
        schedule, epochs, lr_steps = "1x", 5, [3]

    assert schedule_epochs(T) == (12, [8, 11])
    T.schedule = "2x"
    assert schedule_epochs(T) == (24, [16, 22])
    T.schedule = ""
    assert schedule_epochs(T) == (5, [3])
    T.schedule = "fast"
    with pytest.raises(OvdError, match="named length"):
        schedule_epochs(T)


def test_checkpoint_errors(tmp_path):
    with pytest.raises(OvdError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(OvdError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    torch.save({"x": torch.zeros(1)}, tmp_path / "foreign.pt")
    with pytest.raises(OvdError, match="not an ovd detector checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
