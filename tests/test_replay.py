"""Data-free few-shot replay: data watchers, the feature generator, few-shot fine-tuning."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _fixtures import crash_points, run_child, subset_json, tiny_clip_dir
from omegaconf import OmegaConf

from ovd.config import load_config
from ovd.engine.trainer import run_train
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")
# every test needs the module's trained base model and fitted generator (over 20 s to make)
pytestmark = pytest.mark.slow


def cfg_for(base, mini_world, work: Path, *extra: str):
    return load_config(CONFIG, overrides_for(base, mini_world, work, *extra))


def overrides_for(base, mini_world, work: Path, *extra: str) -> list[str]:
    root, clip_dir = base
    return [
        f"world.dir={mini_world}", f"work_dir={work}", f"clip.model=local-dir:{clip_dir}",
        f"data.train_json={root / 'train4.json'}", f"replay.fewshot_dir={mini_world / 'det' / 'fewshot'}",
        "model.distill=false", "model.min_size=96", "model.max_size=96", "model.box_batch_size_per_image=32",
"train.batch_size=2", "train.epochs=1", "train.lr_steps=[]",
        "train.warmup_iters=1", "replay.fit_iters=400", "replay.iters=2", "replay.batch_size=2",
        "replay.replay_rois=16", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def base(mini_world, tmp_path_factory):
    """A tiny base detector (4 iterations on 8 images), its statistics and a fitted generator."""
    root = tmp_path_factory.mktemp("replay")
    clip_dir = tiny_clip_dir(root / "clip")
    subset_json(mini_world / "det" / "train.json", root / "train4.json", 8)
    setup = (root, clip_dir)
    cfg = cfg_for(setup, mini_world, root / "w")
    run_train(cfg, progress=False)
    return setup, cfg, str(root / "w" / "train" / "final.pt")


@pytest.fixture(scope="module")
def fitted(base):
    from ovd.replay.generator import run_fit
    from ovd.replay.watchers import run_stats

    setup, cfg, ckpt = base
    stats = run_stats(cfg, ckpt, progress=False)
    # the generator needs no image: the annotation file and the image folder are not there
    cfg_noimg = cfg.copy()
    cfg_noimg.data.train_json = "/nonexistent/train.json"
    cfg_noimg.data.image_root = "/nonexistent/images"
    fit = run_fit(cfg_noimg, ckpt, progress=False)
    return stats, fit


def test_statistics_equal_a_direct_computation(base, fitted, mini_world):
    from ovd.data.loading import load_split_dataset
    from ovd.data.train_set import DetectionTrainSet
    from ovd.replay.watchers import load_stats

    setup, cfg, ckpt = base
    stats_report, _ = fitted
    assert stats_report["bytes"] == Path(cfg.replay.stats).stat().st_size > 0
    st = load_stats(cfg.replay.stats)
    assert st.layers == ["pooled", "fc6", "fc7", "embedding"]
    n_base = len(json.loads((mini_world / "split.json").read_text())["base"])
    assert st.meta["base_ckpt_sha1"] and st.meta["embed_dim"] == 32 and len(st.class_names) == n_base

    state = load_checkpoint(ckpt)
    model = model_from_checkpoint(state, ckpt)
    model.set_vocabulary(state["text"])
    train, split = load_split_dataset(cfg.data, need_split="t")
    data = DetectionTrainSet(train, list(split.base_ids))
    # torchvision's parts by hand: transform, backbone, RPN, matching without the sampler, RoI pooling,
    # the box head's layers (fc6, fc7 pre-ReLU), the unit embedding
    recs = []
    rh = model.roi_heads
    with torch.no_grad():
        for i in range(len(data)):
            image, t = data.get(i)
            images_t, targets_t = model.transform([image], [{"boxes": t["boxes"], "labels": t["labels"]}])
            feats = model.backbone(images_t.tensors)
            props, _ = model.rpn(images_t, feats)
            props, _, labels, _ = rh.sample_rois(props, targets_t, subsample=False)
            pooled = rh.box_roi_pool(feats, props, images_t.image_sizes)
            fc6 = rh.box_head.fc6(pooled.flatten(1))
            fc7 = rh.box_head.fc7(F.relu(fc6))
            emb = rh.classifier.embed(F.relu(fc7))
            recs.append({"labels": labels[0], "pooled": pooled, "fc6": fc6, "fc7": fc7, "embedding": emb})
    labels = torch.cat([r["labels"] for r in recs])
    assert torch.equal(st.tensors["rois"], torch.bincount(labels, minlength=n_base + 1))
    for layer in st.layers:
        x = torch.cat([r[layer] for r in recs]).double()
        if x.ndim == 4:  # per channel: positions are samples
            x = x.permute(0, 2, 3, 1)
            lab = labels[:, None, None].expand(x.shape[:3]).reshape(-1)
            x = x.reshape(-1, x.shape[-1])
        else:
            lab = labels
        for c in labels.unique().tolist():
            xc = x[lab == c]
            torch.testing.assert_close(st.mean(layer)[c], xc.mean(0).float(), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(st.var(layer)[c], xc.var(0, unbiased=False).float(), rtol=1e-3, atol=1e-5)


def test_generator_fits_without_images_and_forges_its_classes(base, fitted):
    from ovd.replay.generator import load_generator

    setup, cfg, ckpt = base
    _, fit = fitted
    assert fit["parameters"] > 0 and fit["bytes"] == Path(cfg.replay.generator).stat().st_size
    # forged features are classified as their intended class by the frozen base head, far above chance
    print(f"forged top-1 among classes {fit['accuracy_among_classes']:.3f}, chance {fit['chance_among_classes']:.3f}")
    assert fit["accuracy_among_classes"] > 5 * fit["chance_among_classes"], fit
    div = fit["diversity"]["fc7"]
    assert div is not None and div["forged_rms_pair_distance"] > 0.5 * div["real_rms_pair_distance"], fit
    gen, meta = load_generator(cfg.replay.generator)
    assert meta["base_ckpt_sha1"] == json.loads(json.dumps(meta))["base_ckpt_sha1"]
    x = gen.sample(torch.tensor([0, 1, 5]))
    assert x.shape == (3, 64, 7, 7) and torch.isfinite(x).all()


def test_fewshot_checkpoint_loads_predicts_and_is_scored_per_group(base, fitted, mini_world, tmp_path):
    from ovd.engine.predictor import Detector
    from ovd.replay.fewshot import evaluate_groups, run_fewshot

    setup, cfg, ckpt = base
    rep = run_fewshot(cfg, ckpt, 5, 0, "replay", out=str(tmp_path / "ft"), evaluate=False, progress=False)
    assert rep["complete"] and rep["iterations"] == 2 and rep["pinned_eval"] == ["backbone", "rpn"]
    meta = load_checkpoint(rep["out"])["meta"]
    fs = meta["fewshot"]
    split = json.loads((mini_world / "split.json").read_text())
    assert fs["fewshot_classes"] == split["novel"][0::2] and fs["heldout_classes"] == split["novel"][1::2]
    # the fine-tuned vocabulary: base + few-shot group, never the held-out names
    assert set(meta["base_names"]) == set(split["base"]) | set(fs["fewshot_classes"])
    det = Detector.from_checkpoint(rep["out"], clip=None)
    assert det.classes == meta["base_names"]
    image = mini_world / "det" / "images" / "val" / sorted(p.name for p in (mini_world / "det/images/val").iterdir())[0]
    out = det.predict(image, classes=split["novel"][1::2][:3])  # held-out names, by name
    assert set(out["names"]) <= set(split["novel"][1::2][:3])
    # base weights that the run froze are the base model's
    base_state, ft_state = load_checkpoint(ckpt)["model"], load_checkpoint(rep["out"])["model"]
    assert all(torch.equal(base_state[k], ft_state[k]) for k in base_state if k.startswith(("backbone.", "rpn.")))
    m = evaluate_groups(cfg, rep["out"])
    assert set(m) == {"base", "fewshot", "heldout", "all"} and all(set(v) == {"AP", "AP50"} for v in m.values())


def test_replay_runs_on_a_mask_head_checkpoint_and_leaves_the_masks_as_they_were(base, mini_world, tmp_path):
    """A base detector with the class-agnostic mask branch (model.mask_head): statistics, generator
    and a replay fine-tuning run work; K-shot runs train on boxes, so the mask branch stays the base
    model's, and the fine-tuned detector still gives every detection a mask."""
    from ovd.modeling.build import build_detector, model_config_from_dict
    from ovd.modeling.checkpoint import save_checkpoint
    from ovd.replay.fewshot import run_fewshot
    from ovd.replay.generator import run_fit
    from ovd.replay.watchers import run_stats

    setup, _, ckpt = base
    state = load_checkpoint(ckpt)
    meta = state["meta"]
    meta["model"]["mask_head"] = True
    torch.manual_seed(0)
    masked = build_detector(model_config_from_dict(meta["model"]), int(meta["embed_dim"]))
    missing, unexpected = masked.load_state_dict(state["model"], strict=False)
    assert not unexpected and missing and all(".mask_" in k for k in missing)
    masked.set_vocabulary(state["text"])
    save_checkpoint(tmp_path / "mask_base.pt", masked, None, None, state["iteration"], meta)
    base_ckpt = str(tmp_path / "mask_base.pt")
    cfg = cfg_for(setup, mini_world, tmp_path / "w", "model.mask_head=true", "replay.fit_iters=20")
    run_stats(cfg, base_ckpt, progress=False)
    run_fit(cfg, base_ckpt, progress=False)
    rep = run_fewshot(cfg, base_ckpt, 5, 0, "replay", out=str(tmp_path / "ft"), evaluate=False, progress=False)
    assert rep["complete"]
    ft = load_checkpoint(rep["out"])
    mask_keys = [k for k in ft["model"] if ".mask_" in k]
    assert mask_keys and all(torch.equal(ft["model"][k], masked.state_dict()[k]) for k in mask_keys)
    model = model_from_checkpoint(ft, rep["out"])
    model.set_vocabulary(ft["text"])
    image = torch.rand(3, 120, 100, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model([image])[0]
    assert out["masks"].shape == (len(out["boxes"]), 1, 120, 100)


def test_heldout_names_join_the_vocabulary_only_when_asked(base, fitted, mini_world, tmp_path):
    from ovd.replay.fewshot import run_fewshot

    setup, _, ckpt = base
    split = json.loads((mini_world / "split.json").read_text())
    cfg = cfg_for(setup, mini_world, setup[0] / "w", "replay.heldout_in_vocabulary=true")
    rep = run_fewshot(cfg, ckpt, 5, 0, "replay", out=str(tmp_path / "ft"), evaluate=False, progress=False)
    meta = load_checkpoint(rep["out"])["meta"]
    assert meta["fewshot"]["heldout_classes"] == split["novel"][1::2]  # still held out: no box for them
    assert set(meta["base_names"]) == set(split["base"]) | set(split["novel"])
    assert rep["vocabulary"] == len(split["base"]) + len(split["novel"])


def test_teacher_terms_choose_the_distillation_losses_of_the_forged_rois(base, fitted, mini_world, tmp_path):
    from ovd.replay.fewshot import run_fewshot

    setup, _, ckpt = base
    seen = {}
    for name, terms in (("all", "[embedding,logits,deltas]"), ("logits", "[logits]"), ("none", "[]")):
        cfg = cfg_for(setup, mini_world, setup[0] / "w", f"replay.teacher_terms={terms}")
        rep = run_fewshot(cfg, ckpt, 5, 0, "replay", out=str(tmp_path / name), evaluate=False, progress=False)
        lines = [json.loads(x) for x in (Path(rep["out"]).parent / "log.jsonl").read_text().splitlines()]
        seen[name] = {k for x in lines for k in x if k.startswith("loss_teacher_")}
    assert seen == {"all": {"loss_teacher_embedding", "loss_teacher_logits", "loss_teacher_deltas"},
                    "logits": {"loss_teacher_logits"}, "none": set()}  # fmt: skip
    with pytest.raises(OvdError, match=r"'replay.teacher_terms' holds 'logit': expected entries from embedding, "):
        cfg_for(setup, mini_world, setup[0] / "w", "replay.teacher_terms=[logits,logit]")


def test_run_fewshot_tool_tables_reuses_and_refuses_stale_runs(base, fitted, mini_world, tmp_path, capsys):
    """tools/run_fewshot.py: a table row per mode, the memory ratio; a second invocation reuses the
    finished runs and the zero-shot row; a finished run of other settings is one clear error."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_fewshot", Path(CONFIG).parents[2] / "tools" / "run_fewshot.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    setup, cfg, ckpt = base
    ov = overrides_for(setup, mini_world, setup[0] / "w", f"replay.fewshot_out={tmp_path / 'runs'}")
    args = [CONFIG, "--ckpt", ckpt, "--shots", "5", "--seeds", "0", "--modes", "novel,replay", *ov]
    assert tool.main(args) == 0
    table = json.loads((tmp_path / "runs" / "fewshot_table.json").read_text())
    assert list(table["rows"]) == ["zero-shot (base model)", "novel, K=5", "replay, K=5"]
    mem = table["memory"]
    assert mem["ratio"] == pytest.approx((mem["stats_bytes"] + mem["generator_bytes"]) / mem["image_bytes"])
    final = tmp_path / "runs" / "replay_5shot_seed0" / "final.pt"
    stamp = final.stat().st_mtime_ns
    capsys.readouterr()
    assert tool.main(args) == 0  # everything reused: no run trained again
    assert final.stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "runs" / "fewshot_table.json").read_text())["rows"] == table["rows"]
    # a setting the run does not record (added to ovd later) counts as its default
    gm = tmp_path / "runs" / "replay_5shot_seed0" / "group_metrics.json"
    rep = json.loads(gm.read_text())
    del rep["settings"]["replay"]["heldout_in_vocabulary"]
    gm.write_text(json.dumps(rep))
    assert tool.main(args) == 0 and final.stat().st_mtime_ns == stamp
    assert tool.main([*args, "replay.heldout_in_vocabulary=true"]) == 2
    assert tool.main([*args, "replay.lr=1e-4"]) == 2
    assert "was made with other replay / model settings than this config's" in capsys.readouterr().err


def test_a_killed_fewshot_run_resumes_exactly(base, fitted, mini_world, tmp_path):
    """Killed at every durable step (log line, checkpoint written / renamed, final), then run again:
    the weights and the log equal an uninterrupted run's, bit for bit — the replayed features are
    drawn from (seed, iteration), the data order and RNG come back from last.pt."""
    import signal

    setup, cfg, ckpt = base

    def argv(out: Path) -> list[str]:
        ov = overrides_for(setup, mini_world, tmp_path / "w", "replay.iters=4", "replay.checkpoint_every=2")
        return ["fewshot", CONFIG, *ov, "--ckpt", ckpt, "--shots", "5", "--seed", "1", "--mode", "replay",
                "--generator", cfg.replay.generator, "--out", str(out), "--no-eval"]  # fmt: skip

    points = crash_points(argv(tmp_path / "ref"), tmp_path / "points.log")
    ref = load_checkpoint(tmp_path / "ref" / "final.pt")
    assert ref["iteration"] == 4
    ref_log = (tmp_path / "ref" / "log.jsonl").read_text()
    resumed = 0
    for k in range(1, len(points) + 1):
        out = tmp_path / f"k{k}"
        assert run_child(argv(out), crash_at=k) == -signal.SIGKILL, points[k - 1]
        if (out / "last.pt").exists() and load_checkpoint(out / "last.pt")["iteration"] >= 2:
            resumed += 1
        assert run_child(argv(out)) == 0, points[k - 1]
        final = load_checkpoint(out / "final.pt")
        assert final["model"].keys() == ref["model"].keys()
        assert all(torch.equal(final["model"][n], ref["model"][n]) for n in ref["model"]), points[k - 1]
        assert (out / "log.jsonl").read_text() == ref_log, points[k - 1]
        shutil.rmtree(out)
    assert resumed >= 3, points  # some kills came after the iteration-2 checkpoint: those runs resumed


def _rewrite_meta(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        raw, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(raw["meta"])
    meta.update(changes)
    save_file(tensors, str(dst), metadata={**raw, "meta": json.dumps(meta)})
    return dst


def test_bad_inputs_are_one_clear_error_and_write_nothing(base, fitted, tmp_path):
    from ovd.replay.fewshot import run_fewshot
    from ovd.replay.generator import run_fit

    setup, cfg, ckpt = base
    out = tmp_path / "run"

    def refused(match, **kw):
        args = {"shots": 5, "seed": 0, "mode": "replay", **kw}
        with pytest.raises(OvdError, match=match):
            run_fewshot(cfg, args.pop("ckpt", ckpt), args["shots"], args["seed"], args["mode"],
                        generator=args.get("generator"), out=str(out), progress=False)  # fmt: skip
        assert not out.exists()

    refused(r"no few-shot file for K=7, seed 0: .*7shot_seed0.json does not exist \(there are: .*5shot_seed0", shots=7)
    refused(r"unknown few-shot mode 'tfa' \(choose from novel, replay, base\)", mode="tfa")

    # a generator / statistics made from another checkpoint (same architecture, other weights)
    state = torch.load(ckpt, weights_only=True)
    state["model"]["roi_heads.classifier.background"] += 0.1
    other = tmp_path / "other.pt"
    torch.save(state, other)
    refused(r"replay generator file .* was made from another base checkpoint", ckpt=str(other))
    fit_out = tmp_path / "g.safetensors"
    with pytest.raises(OvdError, match=r"replay statistics file .* was made from another base checkpoint"):
        run_fit(cfg, str(other), out=str(fit_out), progress=False)
    # another embedding dimension, another class list
    dim = _rewrite_meta(cfg.replay.stats, tmp_path / "dim.safetensors", embed_dim=64)
    with pytest.raises(OvdError, match=r"made for 64-d region embeddings, the base detector has 32-d"):
        run_fit(cfg, ckpt, stats_path=str(dim), out=str(fit_out), progress=False)
    names = json.loads(json.loads(json.dumps(dict(_meta(cfg.replay.stats))))["meta"])["class_names"]
    cls = _rewrite_meta(cfg.replay.stats, tmp_path / "cls.safetensors", class_names=names[::-1])
    with pytest.raises(OvdError, match=r"covers another class list .* or another order"):
        run_fit(cfg, ckpt, stats_path=str(cls), out=str(fit_out), progress=False)
    gcls = _rewrite_meta(cfg.replay.generator, tmp_path / "gcls.safetensors", class_names=names[:10])
    refused(
        rf"replay generator file .* covers another class list \(10 classes, the base detector has {len(names)}",
        generator=str(gcls),
    )
    assert not fit_out.exists()
    # not a stats file at all
    shutil.copy(ckpt, tmp_path / "x.safetensors")
    with pytest.raises(OvdError, match="not a readable safetensors file"):
        run_fit(cfg, ckpt, stats_path=str(tmp_path / "x.safetensors"), out=str(fit_out), progress=False)


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# a changed value of every replay.* key, and what a rerun into the finished run's folder must do:
# "refused" (one error naming the key, nothing in the folder touched), "reused" (the same run: the
# key shapes nothing it computes), "fresh" (another folder)
REPLAY_CHANGES = {
    "stats": ("copy", "reused"),  # a copy of the same statistics
    "generator": ("copy", "reused"),  # a copy of the same generator file
    "fewshot_out": ("elsewhere", "fresh"),
    "fewshot_dir": ("edited", "refused"),  # a K-shot file with one box less
    "noise_dim": (32, "refused"), "hidden": (32, "refused"), "trunk_channels": (8, "refused"),
    "fit_iters": (401, "refused"), "fit_batch_per_class": (4, "refused"), "fit_lr": (1e-3, "refused"),
    "stat_weight": (0.5, "refused"), "ce_weight": (1.0, "refused"), "diversity_weight": (0.5, "refused"),
    "heldout_every": (3, "refused"), "heldout_in_vocabulary": (True, "refused"), "iters": (3, "refused"),
    "lr": (1e-4, "refused"), "batch_size": (1, "refused"), "warmup_iters": (2, "refused"),
    "checkpoint_every": (1, "reused"), "freeze": (["backbone."], "refused"), "replay_rois": (8, "refused"),
    "replay_background": (0.5, "refused"), "teacher_weight": (5.0, "refused"),
    "teacher_terms": (["embedding"], "refused"),
}  # fmt: skip


@pytest.mark.slow
def test_a_finished_fewshot_run_is_kept_only_when_every_input_is_the_same(base, fitted, mini_world, tmp_path):
    """Each replay.* key changed in turn, then `ovd fewshot` into the finished run's folder: refused
    with the key named before anything in the folder changes, or — for a key that shapes nothing the
    run computes — the finished run kept as it is. Another mode into the folder is refused as well."""
    from ovd.config import schema_keys
    from ovd.config_schema import Config
    from ovd.replay.fewshot import run_fewshot

    setup, cfg, ckpt = base
    assert set(REPLAY_CHANGES) == {k.split(".", 1)[1] for k in schema_keys(Config) if k.startswith("replay.")}
    out = tmp_path / "run"
    rep = run_fewshot(cfg, ckpt, 5, 0, "replay", out=str(out), evaluate=False, progress=False)
    assert rep["complete"]

    def folder() -> dict:
        return {p.name: p.read_bytes() for p in sorted(out.iterdir())}

    before = folder()
    shutil.copy(cfg.replay.stats, tmp_path / "stats.safetensors")
    shutil.copy(cfg.replay.generator, tmp_path / "gen.safetensors")
    fs_dir = tmp_path / "fewshot"
    shutil.copytree(mini_world / "det" / "fewshot", fs_dir)
    fs = json.loads((fs_dir / "5shot_seed0.json").read_text())
    fs["annotations"] = fs["annotations"][1:]
    (fs_dir / "5shot_seed0.json").write_text(json.dumps(fs))
    special = {"stats": tmp_path / "stats.safetensors", "generator": tmp_path / "gen.safetensors",
               "fewshot_out": tmp_path / "elsewhere", "fewshot_dir": fs_dir}  # fmt: skip
    for key, (value, expect) in REPLAY_CHANGES.items():
        value = special.get(key, value)
        changed = cfg_for(setup, mini_world, setup[0] / "w", f"replay.{key}={json.dumps(value, default=str)}")
        assert OmegaConf.select(changed, f"replay.{key}") != OmegaConf.select(cfg, f"replay.{key}"), key
        run_out = None if expect == "fresh" else str(out)
        if expect == "refused":
            named = r"fewshot\.file\.sha1" if key == "fewshot_dir" else rf"replay\.{key}\b"
            with pytest.raises(OvdError, match=named):
                run_fewshot(changed, ckpt, 5, 0, "replay", out=run_out, evaluate=False, progress=False)
        else:
            rep = run_fewshot(changed, ckpt, 5, 0, "replay", out=run_out, evaluate=False, progress=False)
            if expect == "fresh":
                assert Path(rep["out"]).parent == special["fewshot_out"] / "replay_5shot_seed0", key
        after = folder()
        if expect == "reused":  # final.pt is written again: the same weights and record
            a, b = (torch.load(io.BytesIO(x["final.pt"]), weights_only=True) for x in (before, after))
            assert a["meta_json"] == b["meta_json"] and a["model"].keys() == b["model"].keys(), key
            assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), key
            before["final.pt"] = after["final.pt"]  # (torch.save's bytes of a loaded state may differ)
        assert after == before, key  # the finished run, untouched
    # another mode into the folder: refused before train.json / split.json are overwritten
    with pytest.raises(OvdError, match=r"fewshot.mode: 'replay' -> 'novel'"):
        run_fewshot(cfg, ckpt, 5, 0, "novel", out=str(out), evaluate=False, progress=False)
    assert folder() == before
