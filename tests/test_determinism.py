"""docs/benchmarks.md: the pipeline is deterministic — for a fixed thread count on one machine (float sums
are ordered differently with another number of threads or other CPU kernels, so results then
differ in the last bits and the metrics a little).

Two fresh, independent ``ovd run``s, each from nothing (its own mini-world, tiny CLIP, adapter,
proposals, feature cache, detector) in its own folder, must give the same metrics, detections and
weights. Smoke settings made small so that one run takes well under a minute on one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import SMALL as PIPELINE_SMALL
from safetensors.torch import load_file

from ovd.cli import main
from ovd.mining.proposal_store import ProposalStore
from ovd.modeling.checkpoint import load_checkpoint

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
pytestmark = pytest.mark.slow  # two whole pipeline runs from nothing

# the pipeline tests' small run, keeping every box: the detections (and AP) are not trivially empty
SMALL = [*PIPELINE_SMALL, "model.box_score_thresh=0.0"]


def run_from_nothing(root: Path) -> Path:
    assert main(["run", CONFIG, f"world.dir={root / 'world'}", f"work_dir={root / 'work'}", *SMALL]) == 0
    return root / "work"


def test_two_fresh_pipelines_give_identical_results(tmp_path):
    assert torch.get_num_threads() == 1  # conftest pins it: the claim is for a fixed thread count
    a = run_from_nothing(tmp_path / "a")
    b = run_from_nothing(tmp_path / "b")

    metrics = json.loads((a / "train" / "metrics.json").read_text())
    assert metrics == json.loads((b / "train" / "metrics.json").read_text())
    assert metrics["AP50"] > 0  # a real result, not two empty ones
    dets = json.loads((a / "train" / "detections.json").read_text())
    assert dets and dets == json.loads((b / "train" / "detections.json").read_text())

    wa = load_checkpoint(a / "train" / "final.pt")
    wb = load_checkpoint(b / "train" / "final.pt")
    assert wa["iteration"] == wb["iteration"] == 50
    assert wa["model"].keys() == wb["model"].keys()
    for k in wa["model"]:
        assert torch.equal(wa["model"][k], wb["model"][k]), k
    assert torch.equal(wa["text"], wb["text"])

    # every intermediate output agrees too: tiny CLIP, adapter, feature cache (tensors; their
    # metadata names the folders), proposals, the world's annotations
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.safetensors"))
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*.safetensors"))
    assert any(f.startswith("tiny_clip") for f in files) and "clip_adapter.safetensors" in files
    assert any(f.startswith("feature_cache") for f in files)
    for f in files:
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert ta.keys() == tb.keys(), f
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f
    assert list(ProposalStore(a / "proposals").records()) == list(ProposalStore(b / "proposals").records())
    world_a, world_b = tmp_path / "a" / "world", tmp_path / "b" / "world"
    assert (world_a / "det" / "train.json").read_bytes() == (world_b / "det" / "train.json").read_bytes()
