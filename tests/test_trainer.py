"""Training engine mechanics: exact resume, checkpoints, logs, schedules."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _fixtures import run_until, tiny_clip_dir

from ovd.config import load_config
from ovd.engine.trainer import run_train, schedule_epochs
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint

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


def _assert_equal_tensors(a, b, where: str = "") -> None:
    """Bit-exact equality of nested checkpoint contents (dicts / lists of tensors and numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_equal_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_after_interruption_equals_an_uninterrupted_run(setup, mini_world, tmp_path):
    """docs/detector.md: a run killed and resumed ends with the same weights as an uninterrupted one — bit for
    bit (model, optimizer, schedule, RNG), over several iterations after the resume."""
    full = run_train(cfg_for(setup, mini_world, tmp_path / "a", "train.epochs=3"), progress=False)
    assert full["iterations"] == 6  # 4 images / batch 2 x 3 epochs
    cfg_b = cfg_for(setup, mini_world, tmp_path / "b", "train.epochs=3")
    # killed twice, mid-epoch both times: in the warm-up, and after the lr step (epoch 1)
    run_until(cfg_b, 1)
    assert load_checkpoint(tmp_path / "b" / "train" / "last.pt")["iteration"] == 1
    run_until(cfg_b, 3)
    assert load_checkpoint(tmp_path / "b" / "train" / "last.pt")["iteration"] == 3
    # a line logged after the last checkpoint (a kill between the two) is replayed, not duplicated
    log = tmp_path / "b" / "train" / "log.jsonl"
    log.write_text(log.read_text() + json.dumps({"iter": 4, "loss": 0.0}) + "\n")
    resumed = run_train(cfg_b, progress=False)
    assert resumed["iterations"] == 6
    for name in ("last.pt", "final.pt"):
        a = load_checkpoint(tmp_path / "a" / "train" / name)
        b = load_checkpoint(tmp_path / "b" / "train" / name)
        assert a["iteration"] == b["iteration"] == 6
        for key in ("model", "optimizer", "scheduler", "text"):
            assert a[key] is not None
            _assert_equal_tensors(a[key], b[key], f"{name}:{key}")
        if name == "last.pt":
            assert a["optimizer"]["state"]  # AdamW moments are there, and compared
            _assert_equal_tensors(a["torch_rng"], b["torch_rng"], "torch_rng")
    # the JSONL log has one line per iteration, the resumed run appending after the interruption,
    # and the losses of the resumed iterations are the uninterrupted run's, exactly
    lines = [json.loads(x) for x in (tmp_path / "b" / "train" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "a" / "train" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert lines == ref
    assert all({"loss", "lr", "loss_classifier", "loss_box_reg", "loss_objectness"} <= set(r) for r in lines)
    assert "loss_distill" not in lines[0]  # model.distill=false switches the term off


def test_resume_refuses_other_inputs_naming_every_changed_key(setup, mini_world, tmp_path):
    """docs/detector.md: resuming a run made from other inputs is refused. Every input that shapes the result
    is recorded and compared: seed, train annotations (path + content), image folder, split, CLIP."""
    import shutil

    root, _ = setup
    train_json = Path(shutil.copy(root / "train4.json", tmp_path / "train.json"))
    clip_dir = tiny_clip_dir(tmp_path / "clip", seed=0)
    ov = [f"data.train_json={train_json}", f"clip.model=local-dir:{clip_dir}", "train.epochs=2"]
    run_until(cfg_for(setup, mini_world, tmp_path / "w", *ov), 1)
    last = tmp_path / "w" / "train" / "last.pt"
    meta = load_checkpoint(last)["meta"]
    inputs = meta["inputs"]
    assert inputs["seed"] == 0
    assert inputs["data.train_json"] == str(train_json.resolve())
    assert inputs["data.train_json.sha1"] == hashlib.sha1(train_json.read_bytes()).hexdigest()
    assert inputs["data.image_root"] == str((mini_world / "det" / "images").resolve())
    assert inputs["data.split.base_names"] == json.loads((mini_world / "split.json").read_text())["base"]
    assert inputs["clip.source"] == f"local-dir:{clip_dir.resolve()}" and inputs["clip.fingerprint"]
    assert "feature_cache.generation" not in inputs  # model.distill=false: no cache is read
    before = last.read_bytes()

    def refused(*extra: str) -> str:
        with pytest.raises(OvdError) as e:
            run_train(cfg_for(setup, mini_world, tmp_path / "w", *ov, *extra), progress=False)
        assert last.read_bytes() == before  # the refused run left the checkpoint alone
        msg = str(e.value)
        assert str(last) in msg and "train.out" in msg
        return msg

    # the seed (image order, flips, RoI sampling)
    assert "seed: 0 -> 1" in refused("seed=1")
    # the train annotations' content, at the same path
    data = json.loads(train_json.read_text())
    data["annotations"] = data["annotations"][1:]
    train_json.write_text(json.dumps(data))
    new_sha = hashlib.sha1(train_json.read_bytes()).hexdigest()
    msg = refused()
    assert f"data.train_json.sha1: '{inputs['data.train_json.sha1']}' -> '{new_sha}'" in msg
    assert "data.train_json:" not in msg and "seed" not in msg  # only what changed is named
    shutil.copy(root / "train4.json", train_json)
    # the image folder (same files, another place)
    images = tmp_path / "images"
    for im in data["images"]:
        (images / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mini_world / "det" / "images" / im["file_name"], images / im["file_name"])
    assert f"data.image_root: '{inputs['data.image_root']}' -> '{images.resolve()}'" in refused(
        f"data.image_root={images}"
    )
    # the split's base classes (one base class moved to novel)
    split = json.loads((mini_world / "split.json").read_text())
    moved = split["base"].pop()
    split["novel"].append(moved)
    (tmp_path / "split.json").write_text(json.dumps(split))
    n = len(split["base"])
    assert f"data.split.base_names: {n + 1} -> {n} entries (without {[moved]!r})" in refused(
        f"data.split={tmp_path / 'split.json'}"
    )
    # several changes at once: one error naming each of them
    msg = refused("seed=2", "train.lr=0.002", "model.representation_size=128")
    for part in ("seed: 0 -> 2", "train.lr: 0.001 -> 0.002", "model.representation_size: 256 -> 128"):
        assert part in msg, msg
    # the same inputs again: the run resumes and finishes
    assert run_train(cfg_for(setup, mini_world, tmp_path / "w", *ov), progress=False)["iterations"] == 4
    # other CLIP weights in the same folder (e.g. the tiny CLIP pre-trained again)
    before = last.read_bytes()
    tiny_clip_dir(clip_dir, seed=1)
    msg = refused()
    assert f"clip.fingerprint: '{inputs['clip.fingerprint']}' -> " in msg and "clip.source" not in msg


def test_resume_refuses_another_feature_cache(setup, mini_world, tmp_path):
    """Distilling, the feature cache's committed content is an input too: a cache extracted again
    with other boxes is refused on resume."""
    from ovd.mining.feature_cache import run_extract

    ov = ["model.distill=true", "miner.enabled=false", "adapter.enabled=false", "train.epochs=2"]
    cfg = cfg_for(setup, mini_world, tmp_path / "w", *ov, "extract.random_boxes=2")
    run_extract(cfg, progress=False)
    run_until(cfg, 1)
    last = tmp_path / "w" / "train" / "last.pt"
    generation = load_checkpoint(last)["meta"]["inputs"]["feature_cache.generation"]
    assert generation
    cfg3 = cfg_for(setup, mini_world, tmp_path / "w", *ov, "extract.random_boxes=3")
    run_extract(cfg3, overwrite=True, progress=False)
    with pytest.raises(OvdError, match=rf"feature_cache\.generation: '{generation}' -> '[^']+'"):
        run_train(cfg3, progress=False)


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


# -- new runs from a trained detector, frozen parameters, extension points --------------------------------
def test_init_from_starts_a_new_run_from_trained_weights(setup, mini_world, tmp_path, capsys):
    from ovd.engine.trainer import setup_trainer

    base = cfg_for(setup, mini_world, tmp_path / "base", "train.epochs=1")
    run_train(base, progress=False)
    trained = load_checkpoint(tmp_path / "base" / "train" / "final.pt")["model"]
    ckpt = str(tmp_path / "base" / "train" / "final.pt")

    # a new run: the trained weights, iteration 0, fresh optimizer; a non-architecture setting may differ
    cfg = cfg_for(setup, mini_world, tmp_path / "ft", f"train.init_from={ckpt}", "model.box_score_thresh=0.2")
    trainer = setup_trainer(cfg, 0, 1, torch.device("cpu"), progress=False)
    state = trainer.model.state_dict()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert trainer.resume() == 0 and not trainer.opt.state
    notes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_setup"]
    assert notes["init_from_changed_settings"] == {"box_score_thresh": [0.05, 0.2]}

    # ... unlike a fresh run, whose first weights are the random initialisation
    fresh = setup_trainer(cfg_for(setup, mini_world, tmp_path / "fresh"), 0, 1, torch.device("cpu"), progress=False)
    assert not torch.equal(
        fresh.model.state_dict()["roi_heads.classifier.proj.weight"], trained["roi_heads.classifier.proj.weight"]
    )

    report = run_train(cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "ft" / "train" / "log.jsonl").read_text().splitlines()]
    assert report["complete"] and [r["iter"] for r in log] == [1, 2, 3, 4]
    # the source of the weights is an input of the run: resuming with another one is refused
    other = cfg_for(setup, mini_world, tmp_path / "ft", f"train.init_from={ckpt}", "model.box_score_thresh=0.2")
    run_train(cfg_for(setup, mini_world, tmp_path / "base2", "train.epochs=1"), progress=False)
    other.train.init_from = str(tmp_path / "base2" / "train" / "final.pt")
    (tmp_path / "ft" / "train" / "final.pt").unlink()
    with pytest.raises(OvdError, match="train.init_from"):
        run_train(other, progress=False)


def test_init_from_refuses_another_architecture(setup, mini_world, tmp_path):
    run_train(cfg_for(setup, mini_world, tmp_path / "base", "train.epochs=1"), progress=False)
    ckpt = tmp_path / "base" / "train" / "final.pt"
    cfg = cfg_for(setup, mini_world, tmp_path / "ft", f"train.init_from={ckpt}", "model.fpn_channels=32")
    with pytest.raises(OvdError, match=r"another architecture \(model.fpn_channels: 64 -> 32\)"):
        run_train(cfg, progress=False)
    with pytest.raises(OvdError, match="checkpoint not found"):
        run_train(cfg_for(setup, mini_world, tmp_path / "x", f"train.init_from={tmp_path / 'nope.pt'}"), progress=False)


def test_freeze_keeps_named_parameters_and_refuses_unmatched_prefixes(setup, mini_world, tmp_path, capsys):
    from ovd.engine.trainer import setup_trainer

    cfg = cfg_for(setup, mini_world, tmp_path / "f", "train.freeze=[backbone.,rpn.]")
    trainer = setup_trainer(cfg, 0, 1, torch.device("cpu"), progress=False)
    before = {k: v.clone() for k, v in trainer.model.named_parameters()}
    frozen = [k for k in before if k.startswith(("backbone.", "rpn."))]
    notes = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["train_setup"]
    assert notes["frozen_tensors"] == len(frozen) > 0
    assert notes["trainable_parameters"] == sum(v.numel() for k, v in before.items() if k not in frozen)
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("roi_heads."))
    with pytest.raises(OvdError, match=r"no parameter name starts with \['backbone\.bdy\.'\]"):
        run_train(cfg_for(setup, mini_world, tmp_path / "g", "train.freeze=[backbone.bdy.]"), progress=False)


def test_trainer_extension_points_feed_the_forward_and_add_loss_terms(setup, mini_world, tmp_path):
    """What the replay builds on: extra RoI-level inputs and extra loss terms without editing the loop."""
    from ovd.engine.trainer import setup_trainer
    from ovd.modeling.roi_heads import ExtraRoIs

    cfg = cfg_for(setup, mini_world, tmp_path / "x", "train.epochs=1")
    trainer = setup_trainer(cfg, 0, 1, torch.device("cpu"), progress=False)
    channels = trainer.model.backbone.out_channels
    seen = []

    def forged(it, images, targets):
        seen.append((it, len(images), len(targets)))
        g = torch.Generator().manual_seed(it)
        return {"extra_rois": ExtraRoIs(torch.randn(3, channels, 7, 7, generator=g), torch.tensor([1, 2, 0]))}

    trainer.add_inputs(forged)
    trainer.add_loss("loss_l2", lambda it, model, losses: 1e-3 * model.roi_heads.classifier.proj.weight.pow(2).sum())
    with pytest.raises(OvdError, match="added twice"):
        trainer.add_loss("loss_l2", lambda *a: 0)
    report = trainer.fit()
    assert report["complete"] and seen == [(0, 2, 2), (1, 2, 2)]
    log = [json.loads(x) for x in (tmp_path / "x" / "train" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss_l2"] > 0 for r in log)
    terms = [k for k in log[0] if k.startswith("loss_")]
    assert abs(log[0]["loss"] - sum(log[0][k] for k in terms)) < 1e-3
