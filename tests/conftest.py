"""Shared fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _fixtures import REPO, tiny_clip_dir

from ovd.config import load_config
from ovd.engine.trainer import run_train
from ovd.mini_world import generate_mini_world


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    """The test models are tiny: one intra-op thread is as fast, and immune to the pathological
    slowdown of OpenMP threads on a busy 2-core machine (100x seen). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def mini_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke-preset mini-world (seed 0), generated once per test session. Treat as read-only.

    World v2 (36 colour x shape classes, 100 train images): the mechanics tests need a small world,
    and v3's smoke preset is twice its size; v3 itself is tested in test_mini_world.py. Tests that
    run `ovd run` on this folder pass world.version=2 (a world of another version is refused)."""
    out = tmp_path_factory.mktemp("mini_world")
    generate_mini_world(out, preset="smoke", seed=0, progress=False, version=2)
    return out


@pytest.fixture(scope="module")
def trained(mini_world, tmp_path_factory) -> dict:
    """A tiny detector checkpoint trained once per test module (4 images of the session's world,
    batch 2, 4 iterations, 96 px, no distillation) with a tiny random CLIP named by a *relative*
    local-dir path, so that loading it from another working directory checks that the CLIP path
    was recorded absolute. Keys: root, ckpt, clip, image (a val image), world, overrides (the
    training settings with the CLIP path made absolute: usable from any working directory)."""
    root = tmp_path_factory.mktemp("detect")
    tiny_clip_dir(root / "clip", 32)
    train = json.loads((mini_world / "det" / "train.json").read_text())
    keep = {im["id"] for im in train["images"][:4]}
    train["images"] = [im for im in train["images"] if im["id"] in keep]
    train["annotations"] = [a for a in train["annotations"] if a["image_id"] in keep]
    (root / "train4.json").write_text(json.dumps(train))
    old = os.getcwd()
    os.chdir(root)  # the CLIP is named relative to this folder at training time
    overrides = [
        f"world.dir={mini_world}",
        f"work_dir={root / 'work'}",
        "clip.model=local-dir:clip",
        f"data.train_json={root / 'train4.json'}",
        "model.distill=false",
        "model.min_size=96",
        "model.max_size=96",
        "model.box_batch_size_per_image=32",
        "model.box_score_thresh=0.0",
        "model.rpn_post_nms_top_n_test=100",
        "train.batch_size=2",
        "train.epochs=2",
        "train.lr_steps=[1]",
        "train.warmup_iters=2",
        "train.checkpoint_every=100",
        "train.device=cpu",
    ]
    try:
        cfg = load_config(str(REPO / "configs" / "mini" / "smoke.yaml"), overrides)
        res = run_train(cfg, progress=False)
    finally:
        os.chdir(old)
    assert res["iterations"] == 4
    val = json.loads((mini_world / "det" / "val.json").read_text())
    image = mini_world / "det" / "images" / val["images"][0]["file_name"]
    # the same settings from any working directory (ovd test, ovd vocab embed): the CLIP path made absolute
    overrides = [f"clip.model=local-dir:{root / 'clip'}" if o == "clip.model=local-dir:clip" else o for o in overrides]
    return {"root": root, "ckpt": Path(res["out"]), "clip": root / "clip", "image": image, "world": mini_world,
            "overrides": overrides}  # fmt: skip
