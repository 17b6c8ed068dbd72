"""Trainer extras: data-parallel training under torchrun (gloo on CPU), refusal to resume with other
settings, periodic evaluation during training, and the random-box (no miner) feature-cache baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fixtures import child_env, free_port, run_until, subset_json, tiny_clip_dir

from ovd.config import load_config
from ovd.data.coco import load_detection_dataset
from ovd.engine.trainer import run_train
from ovd.errors import OvdError
from ovd.mining.feature_cache import FeatureCache, random_proposals, run_extract
from ovd.modeling.build import build_detector
from ovd.modeling.checkpoint import load_checkpoint
from ovd.vlm.clip import clip_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "mini" / "smoke.yaml")


@pytest.fixture(scope="module")
def setup(mini_world, tmp_path_factory):
    """A tiny random open_clip CLIP (local-dir), a 4-image train subset and a 3-image val subset."""
    root = tmp_path_factory.mktemp("ddp")
    clip_dir = tiny_clip_dir(root / "clip")
    subset_json(mini_world / "det" / "train.json", root / "train4.json", 4)
    subset_json(mini_world / "det" / "val.json", root / "val3.json", 3)
    return root, clip_dir


def overrides(setup, mini_world, work: Path, *extra: str) -> list[str]:
    root, clip_dir = setup
    return [
        f"world.dir={mini_world}",
        f"work_dir={work}",
        f"clip.model=local-dir:{clip_dir}",
        f"data.train_json={root / 'train4.json'}",
        f"data.val_json={root / 'val3.json'}",
        "model.distill=false",
        "model.min_size=96",
        "model.max_size=96",
        "model.box_batch_size_per_image=32",
        "train.batch_size=2",
        "train.lr=0.001",
        "train.epochs=1",
        "train.lr_steps=[1]",
        "train.warmup_iters=2",
        "train.checkpoint_every=1",
        *extra,
    ]


def json_objects(text: str) -> list[dict]:
    """Every top-level JSON object printed in ``text`` (each rank prints its report)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        out.append(obj)
        i = end
    return out


def initial_weights(cfg) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The detector's weights before the first step, drawn in run_train's order (seed, CLIP, detector),
    and the names of its trainable parameters. (Checked once by hand: a run with lr 0 ends with
    exactly these weights.)"""
    torch.manual_seed(cfg.seed)
    clip = clip_from_config(cfg.clip)
    model = build_detector(cfg.model, clip.embed_dim)
    return model.state_dict(), {n for n, p in model.named_parameters() if p.requires_grad}


def torchrun_train(ov: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
           "-m", "ovd.cli", "train", CONFIG, *ov]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=240)


def test_ddp_two_processes_with_torchrun(setup, mini_world, tmp_path):
    work = tmp_path / "w"
    ov = overrides(setup, mini_world, work)
    res = torchrun_train(ov)
    assert res.returncode == 0, res.stderr[-3000:]
    out = work / "train"
    assert (out / "final.pt").is_file() and (out / "last.pt").is_file()
    # rank 0 alone writes the log: one line per iteration (4 images / batch 2 = 2 iterations), not 2 per rank
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines)
    reports = [r for r in json_objects(res.stdout) if "world_size" in r]
    assert reports, res.stdout[-2000:]
    assert all(r["world_size"] == 2 and r["iterations"] == 2 for r in reports), reports
    assert any(Path(r["out"]) == out / "final.pt" for r in reports)
    final = load_checkpoint(out / "final.pt")
    assert final["iteration"] == 2
    last = load_checkpoint(out / "last.pt")
    assert len(last["torch_rng_ranks"]) == 2  # every rank's RNG state, for an exact resume
    # training happened: the weights moved away from the initial ones
    init, trainable = initial_weights(load_config(CONFIG, ov))
    assert init.keys() == final["model"].keys() and trainable
    still = [k for k in trainable if torch.equal(init[k], final["model"][k])]
    assert not still, f"{len(still)} of {len(trainable)} trainable tensors did not move: {still[:5]}"
    # the checkpoint holds a replica that equals final.pt (rank 0's model after the last step)
    for k, v in final["model"].items():
        assert torch.equal(v, last["model"][k]), k


def test_ddp_batch_not_divisible_by_world_size(setup, mini_world, tmp_path):
    """Each worker (as torchrun starts it: RANK / WORLD_SIZE / MASTER_* in the environment) exits 2
    with one ``ovd: error:`` line and no traceback."""
    ov = overrides(setup, mini_world, tmp_path / "w", "train.batch_size=3")
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(child_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ovd.cli", "train", CONFIG, *ov],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for p in procs:
            _out, err = p.communicate(timeout=120)
            results.append((p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rc, err in results:
        assert rc == 2, err[-2000:]
        errors = [ln for ln in err.splitlines() if ln.startswith("ovd: error: ")]
        assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
        assert "train.batch_size 3" in errors[0] and "2 processes" in errors[0]
    assert not (tmp_path / "w" / "train" / "last.pt").exists()


def test_ddp_last_batch_smaller_than_world_size(setup, mini_world, tmp_path):
    """BUG: under DDP a batch with fewer images than processes leaves a rank with no image, and that
    rank crashes in torchvision (IndexError in GeneralizedRCNNTransform.batch_images). trainer.py
    splits each batch with ``order[k*bs:(k+1)*bs].tolist()[rank::world]``, so the last, partial
    batch of an epoch (train images % batch_size < world size) is empty on the last ranks. Here:
    1 image, batch 2, 2 processes. A one-image run in one process trains fine."""
    root, _ = setup
    one = subset_json(root / "train4.json", tmp_path / "train1.json", 1)
    res = torchrun_train(overrides(setup, mini_world, tmp_path / "w", f"data.train_json={one}"))
    errors = [ln for ln in res.stderr.splitlines() if "Error" in ln and "ChildFailedError" not in ln]
    assert res.returncode == 0, "\n".join(errors[-3:]) or res.stderr[-1500:]
    assert (tmp_path / "w" / "train" / "final.pt").is_file()


def test_resume_refuses_other_settings(setup, mini_world, tmp_path):
    ov = overrides(setup, mini_world, tmp_path / "w", "train.epochs=2")  # 4 iterations
    run_until(load_config(CONFIG, ov), 2)
    last = tmp_path / "w" / "train" / "last.pt"
    assert load_checkpoint(last)["iteration"] == 2
    before = last.stat().st_mtime_ns
    with pytest.raises(OvdError, match=r"train\.lr: 0\.001 -> 0\.002") as e:
        run_train(load_config(CONFIG, [*ov, "train.lr=0.002"]), progress=False)
    assert str(last) in str(e.value)
    with pytest.raises(OvdError, match=r"model\.min_size: 96 -> 128"):
        run_train(load_config(CONFIG, [*ov, "model.min_size=128"]), progress=False)
    assert last.stat().st_mtime_ns == before  # the refused runs left the checkpoint alone
    # settings that do not change what is computed (checkpoint / eval cadence) may differ on resume
    res = run_train(load_config(CONFIG, [*ov, "train.checkpoint_every=5"]), progress=False)
    assert res["iterations"] == 4


def test_periodic_eval_writes_eval_log_and_returns_to_training(setup, mini_world, tmp_path, monkeypatch):
    import ovd.engine.trainer as trainer

    calls: list[tuple[bool, bool]] = []  # (model.training, called with targets) per detector forward
    build = trainer.build_detector

    def spy_build(*a, **k):
        model = build(*a, **k)
        model.register_forward_pre_hook(lambda mod, args: calls.append((mod.training, len(args) > 1)))
        return model

    monkeypatch.setattr(trainer, "build_detector", spy_build)
    ov = overrides(setup, mini_world, tmp_path / "w", "train.eval_every=1")
    res = run_train(load_config(CONFIG, ov), progress=False)
    assert res["iterations"] == 2
    lines = [json.loads(x) for x in (tmp_path / "w" / "train" / "eval.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2]
    for r in lines:
        assert {"AP50_base", "AP50_novel"} <= set(r), r
        for k in ("AP50_base", "AP50_novel"):
            assert r[k] is None or 0.0 <= r[k] <= 1.0, r
    # training forwards (with targets) all ran in training mode, also the one after the first evaluation;
    # the evaluations (3 val images each) ran in eval mode
    train_calls = [tr for tr, has_targets in calls if has_targets]
    eval_calls = [tr for tr, has_targets in calls if not has_targets]
    assert train_calls == [True, True]
    assert eval_calls == [False] * 6
    first_eval = next(i for i, (_tr, t) in enumerate(calls) if not t)
    assert any(t and tr for tr, t in calls[first_eval:]), "no training step after the first evaluation"
    # periodic eval is rank 0 / bookkeeping only: the run's log is one line per iteration as usual
    log = [json.loads(x) for x in (tmp_path / "w" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2]
    # ... and evaluating does not change what is trained (no RNG draws, vocabulary restored)
    monkeypatch.setattr(trainer, "build_detector", build)
    run_train(load_config(CONFIG, overrides(setup, mini_world, tmp_path / "w0")), progress=False)
    a = load_checkpoint(tmp_path / "w" / "train" / "final.pt")["model"]
    b = load_checkpoint(tmp_path / "w0" / "train" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_random_proposals_without_miner(setup, mini_world, tmp_path):
    root, _ = setup
    cfg = load_config(
        CONFIG,
        overrides(
            setup, mini_world, tmp_path / "w", "miner.enabled=false", "adapter.enabled=false", "extract.random_boxes=3"
        ),
    )
    train = load_detection_dataset(cfg.data.train_json, cfg.data.image_root)
    a = random_proposals(train, cfg.miner, 3, seed=0)
    assert set(a) == set(train.image_ids)
    for i in range(len(train)):
        rec = train.record(i)
        p = a[rec["image_id"]]
        b = p["boxes"]
        assert b.shape == (3, 4)
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= rec["width"]).all() and (b[:, 3] <= rec["height"]).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert torch.equal(p["weights"], torch.ones(3))
        assert len({tuple(x) for x in b.tolist()}) == 3  # three different boxes
    again = random_proposals(train, cfg.miner, 3, seed=0)
    other = random_proposals(train, cfg.miner, 3, seed=1)
    assert all(torch.equal(a[i]["boxes"], again[i]["boxes"]) for i in a)
    assert any(not torch.equal(a[i]["boxes"], other[i]["boxes"]) for i in a)
    # run_extract with miner.enabled=false caches GT boxes + exactly these 3 random boxes per image
    rep = run_extract(cfg, progress=False)
    assert rep["index"]["num_images"] == len(train)
    cache = FeatureCache(cfg.extract.out, embed_dim=32)
    for i in a:
        c = cache.get(i)
        assert int((~c["is_gt"]).sum()) == 3
        assert torch.equal(c["boxes"][~c["is_gt"]], a[i]["boxes"].float())
        assert torch.equal(c["weights"][~c["is_gt"]], torch.ones(3))
