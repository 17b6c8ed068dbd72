"""A short smoke-preset training run learns: base AP50 on smoke val clearly above an untrained model's.

The class text embeddings come from a stored vocabulary file (``clip.text_embeddings``) of random
unit vectors, one per class name: this isolates the detector (RPN, RoI heads, cosine classifier
against text embeddings, regression) from the quality of a tiny CLIP that a test could afford to
pre-train. Distillation is off here; its mechanics are covered in test_detector.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ovd.config import load_config
from ovd.engine.evaluator import predict_dataset, run_test
from ovd.engine.trainer import run_train
from ovd.evaluation import evaluate_detections
from ovd.modeling.build import build_detector
from ovd.vlm.clip import write_text_embeddings
from ovd.vlm.text import TextSource

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
pytestmark = pytest.mark.slow  # a smoke-preset training run


def test_a_short_smoke_training_run_learns(mini_world, tmp_path):
    split = json.loads((mini_world / "split.json").read_text())
    names = split["base"] + split["novel"]
    g = torch.Generator().manual_seed(0)
    vocab = write_text_embeddings(
        tmp_path / "vocab.safetensors", torch.nn.functional.normalize(torch.randn(len(names), 32, generator=g), dim=-1),
        names, "random unit vectors (test)",
    )  # fmt: skip
    cfg = load_config(
        CONFIG,
        [
            f"world.dir={mini_world}",
            f"work_dir={tmp_path / 'work'}",
            f"clip.text_embeddings={vocab}",
            "model.distill=false",
            "train.epochs=4",
            "train.lr_steps=[3]",
            "train.checkpoint_every=1000",
        ],
    )
    # the untrained model (same seed and construction as the run below) on smoke val
    from ovd.data.coco import load_detection_dataset
    from ovd.data.splits import resolve_split

    val = load_detection_dataset(cfg.data.val_json, cfg.data.image_root, drop_degenerate=False)
    sp = resolve_split(cfg.data.split, val.categories)
    torch.manual_seed(cfg.seed)
    untrained = build_detector(cfg.model, 32)
    untrained.set_vocabulary(TextSource(cfg.clip).encode(list(sp.base_names) + list(sp.novel_names)))
    dets = predict_dataset(untrained, val, list(sp.base_ids) + list(sp.novel_ids), progress=False)
    before = evaluate_detections(val, dets, split=sp)["AP50_base"]

    report = run_train(cfg, progress=False)
    after = run_test(cfg, report["out"], progress=False)["AP50_base"]
    print(f"base AP50 untrained {before:.4f} trained {after:.4f}")
    assert after > max(0.10, 5 * before), (before, after)
    log = [json.loads(ln) for ln in (Path(cfg.train.out) / "log.jsonl").read_text().splitlines()]
    first, last = log[:10], log[-10:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss_classifier") < mean(first, "loss_classifier")
