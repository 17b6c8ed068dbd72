"""The distilled student (ovd student): training from a frozen teacher, IKD's augmentations, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _fixtures import subset_json, tiny_clip_dir

from ovd.config import load_config
from ovd.engine.export import run_export
from ovd.engine.trainer import run_train
from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.student.augment import FrequencyAug, classification_loss, difgsm, loss_mode
from ovd.student.distill import ADAPTERS, FeatureImitation, embedding_gap, match_levels
from ovd.student.train import run_student

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


def overrides(setup, mini_world, work: Path, *extra: str) -> list[str]:
    root, clip_dir = setup
    return [
        f"world.dir={mini_world}", f"work_dir={work}", f"clip.model=local-dir:{clip_dir}",
        f"data.train_json={root / 'train8.json'}", "model.distill=false", "model.min_size=96", "model.max_size=96",
        "model.box_batch_size_per_image=32", "train.batch_size=2", "train.epochs=1", "train.lr_steps=[]",
        "train.warmup_iters=1", "train.checkpoint_every=100", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def teacher(mini_world, tmp_path_factory):
    """A tiny teacher (ResNet-18 FPN, 64 channels; 16 iterations on 8 images) and its config."""
    root = tmp_path_factory.mktemp("student")
    setup = (root, tiny_clip_dir(root / "clip"))
    subset_json(mini_world / "det" / "train.json", root / "train8.json", 8)
    cfg = load_config(CONFIG, overrides(setup, mini_world, root / "w", "train.epochs=4"))
    run_train(cfg, progress=False)
    return setup, cfg, str(root / "w" / "train" / "final.pt")


def student_cfg(teacher, mini_world, work: Path, *extra: str):
    setup, _, _ = teacher
    return load_config(CONFIG, overrides(setup, mini_world, work, *extra))


def _images_and_boxes(cfg, n: int = 4):
    from ovd.data.loading import load_split_dataset
    from ovd.data.train_set import DetectionTrainSet

    train, split = load_split_dataset(cfg.data, need_split="train", why="test")
    data = DetectionTrainSet(train, list(split.base_ids), None)
    pairs = [data.get(i) for i in range(n)]
    return [p[0] for p in pairs], [p[1]["boxes"] for p in pairs], [p[1] for p in pairs]


def _model(path):
    return model_from_checkpoint(load_checkpoint(path), path)


@pytest.mark.slow
def test_student_region_embeddings_move_toward_the_teachers(teacher, mini_world, tmp_path):
    """A tiny narrow student (32-channel FPN, adapters to the teacher's 64) trained 12 steps: its region
    embeddings of GT boxes end closer to the teacher's than after its first step, and closer than those
    of the same student trained without the teacher."""
    _, tcfg, ckpt = teacher
    t_model = _model(ckpt)
    common = ("train.epochs=3", "train.lr=3e-3")
    kd = student_cfg(teacher, mini_world, tmp_path / "kd", *common)
    kd.train.max_iters = 1
    first = run_student(kd, ckpt, progress=False)
    assert not first["complete"] and first["iterations"] == 1
    shutil.copy(tmp_path / "kd" / "student" / "last.pt", tmp_path / "first.pt")
    kd.train.max_iters = 0
    rep = run_student(kd, ckpt, progress=False)  # resumes at iteration 1
    assert rep["complete"] and rep["iterations"] == 12
    assert rep["student_parameters"] < rep["teacher_parameters"] / 2
    assert rep["loss_terms"] == ["loss_kd_feature", "loss_kd_embedding"]

    alone = student_cfg(teacher, mini_world, tmp_path / "alone", *common, "student.feature_weight=0",
                        "student.embedding_weight=0")  # fmt: skip
    rep_alone = run_student(alone, ckpt, progress=False)
    assert rep_alone["loss_terms"] == []

    images, boxes, _ = _images_and_boxes(tcfg)
    state = torch.load(tmp_path / "first.pt", weights_only=True)
    early = _model(rep["out"])
    early.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith(ADAPTERS)})
    gap_first = embedding_gap(early, t_model, images, boxes)
    gap_kd = embedding_gap(_model(rep["out"]), t_model, images, boxes)
    gap_alone = embedding_gap(_model(rep_alone["out"]), t_model, images, boxes)
    assert gap_kd < 0.8 * gap_first, (gap_first, gap_kd)
    assert gap_kd < 0.8 * gap_alone, (gap_alone, gap_kd)
    log = [json.loads(ln) for ln in (tmp_path / "kd" / "student" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == list(range(1, 13)) and all("loss_kd_embedding" in r for r in log)


@pytest.fixture(scope="module")
def trained_student(teacher, mini_world, tmp_path_factory):
    # no score threshold in the model: a 4-step student's scores are all low, the test is about names
    work = tmp_path_factory.mktemp("st")
    cfg = student_cfg(teacher, mini_world, work, "student.frequency_aug=true", "student.adversarial_aug=true",
                      "student.adversarial_steps=2", "student.frequency_prob=1.0",
                      "model.box_score_thresh=0.0")  # fmt: skip
    return cfg, run_student(cfg, teacher[2], progress=False)


def test_student_checkpoint_is_a_plain_detector_that_takes_new_names(teacher, trained_student, tmp_path):
    from ovd.cli import main
    from ovd.engine.predictor import Detector

    cfg, rep = trained_student
    assert rep["complete"] and "loss_kd_adversarial" in rep["loss_terms"]
    assert rep["augmented"]["crop"] + rep["augmented"]["noise"] > 0
    state = load_checkpoint(rep["out"])
    assert not [k for k in state["model"] if k.startswith(ADAPTERS)]
    assert state["meta"]["model"]["backbone"] == "resnet18_fpn_narrow"
    det = Detector.from_checkpoint(rep["out"])
    split = json.loads(Path(cfg.data.split).read_text())
    novel = split["novel"][:3]
    assert not set(novel) & set(state["meta"]["base_names"])
    x, _, _ = _images_and_boxes(cfg, 1)
    pred = det.predict(x[0], classes=novel, score_thr=0.0)
    assert len(pred["names"]) > 0 and set(pred["names"]) <= set(novel)
    out = tmp_path / "dets"
    img = tmp_path / "img.png"
    from torchvision.io import write_png

    write_png((x[0] * 255).to(torch.uint8), str(img))
    assert main(["detect", str(img), "--ckpt", rep["out"], "--classes", ",".join(novel), "--score-thr", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    names = {d["category_name"] for d in json.loads((out / "img.json").read_text())["detections"]}
    assert names and names <= set(novel)
    # and it exports like any detector (onnxruntime agrees with PyTorch)
    rep_x = run_export(rep["out"], tmp_path / "student.onnx", classes=novel)
    assert rep_x["names"] == novel and (tmp_path / "student.onnx").is_file()


def test_bad_teacher_is_one_error_and_writes_nothing(teacher, mini_world, tmp_path, capsys):
    from ovd.cli import main

    setup, _, ckpt = teacher
    cfg = student_cfg(teacher, mini_world, tmp_path / "w")
    out = Path(cfg.student.out)

    def refused(match, path, c=cfg):
        with pytest.raises(OvdError, match=match):
            run_student(c, None if path is None else str(path), progress=False)
        assert not out.exists()

    refused(r"teacher checkpoint not found: .*missing.pt", tmp_path / "missing.pt")
    argv = ["student", CONFIG, "--teacher", str(tmp_path / "missing.pt"), *overrides(setup, mini_world, tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("ovd: error: teacher checkpoint not found") and err.count("\n") == 1
    refused(r"teacher checkpoint not found: .*train/final.pt", None)  # student.teacher: the config's default
    cfg.student.teacher = ""
    refused("no teacher: give --teacher", None)
    state = torch.load(ckpt, weights_only=True)
    meta = json.loads(state["meta_json"])
    other = dict(state, meta_json=json.dumps({**meta, "base_names": meta["base_names"][::-1]}))
    torch.save(other, tmp_path / "vocab.pt")
    refused(r"trained on another vocabulary .* same names in another order", tmp_path / "vocab.pt")
    other = dict(state, meta_json=json.dumps({**meta, "inputs": {**meta["inputs"], "clip.fingerprint": "f00"}}))
    torch.save(other, tmp_path / "clip.pt")
    refused(r"trained with another CLIP \(text-embedding fingerprint f00", tmp_path / "clip.pt")
    # a CLIP of another width
    wide = load_config(CONFIG, overrides((setup[0], tiny_clip_dir(tmp_path / "clip64", embed_dim=64)), mini_world,
                                         tmp_path / "w"))  # fmt: skip
    refused(r"teacher .* has 32-d embeddings but the text embeddings .* are 64-d", ckpt, wide)
    bad = student_cfg(teacher, mini_world, tmp_path / "w", "student.model={backbone: resnet18_fpn_narrow, fpn: 3}")
    refused(r"student.model has unknown key\(s\) \['fpn'\]", ckpt, bad)
    bad = student_cfg(teacher, mini_world, tmp_path / "w", "student.model={backbone: resnet9}")
    refused(r"unknown backbone model.backbone='resnet9'", ckpt, bad)


def test_frequency_aug_noises_all_small_images_and_crops_the_others():
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(128.0), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(xx / 15) * torch.cos(yy / 11)).expand(3, -1, -1).clone()
    small = {"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 40, 70, 58]]), "labels": torch.tensor([1, 2])}
    large = {"boxes": torch.tensor([[4.0, 4, 60, 60], [100, 70, 120, 90]]), "labels": torch.tensor([3, 4]),
             "distill_boxes": torch.tensor([[0.0, 0, 127, 95], [120, 90, 127, 95]]),
             "distill_embeddings": torch.eye(2), "distill_weights": torch.tensor([1.0, 2.0])}  # fmt: skip
    images, targets = [smooth.clone(), smooth.clone()], [dict(small), dict(large)]
    done = FrequencyAug(prob=1.0)(images, targets, g)
    assert done == ["noise", "crop"]
    # the noise copy: same boxes, changed pixels, the change almost all above the image's own frequencies
    assert torch.equal(targets[0]["boxes"], small["boxes"]) and not torch.equal(images[0], smooth)
    spec = torch.fft.rfft2(images[0] - smooth).abs() ** 2
    low = spec[:, :8, :8].sum() + spec[:, -8:, :8].sum()
    assert low / spec.sum() < 0.05
    assert (images[0] - smooth).std() > 0.05
    # the crop: 0.8-1.0 of each side, boxes shifted into it and clipped, rows kept together
    h, w = images[1].shape[-2:]
    assert 0.8 * 96 - 1 <= h <= 96 and 0.8 * 128 - 1 <= w <= 128 and (h, w) != (96, 128)
    b = targets[1]["boxes"]
    assert len(b) >= 1 and len(b) == len(targets[1]["labels"]) and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
    assert (
        len(targets[1]["distill_boxes"]) == len(targets[1]["distill_embeddings"]) == len(targets[1]["distill_weights"])
    )
    # an all-small image is left alone when the draw misses; an image is never both
    images, targets = [smooth.clone()], [dict(small)]
    assert FrequencyAug(prob=0.0)(images, targets, g) == [""] and torch.equal(images[0], smooth)
    # same generator state, same result
    a = [smooth.clone(), smooth.clone()], [dict(small), dict(large)]
    c = [smooth.clone(), smooth.clone()], [dict(small), dict(large)]
    FrequencyAug(prob=0.5)(*a, torch.Generator().manual_seed(3))
    FrequencyAug(prob=0.5)(*c, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a[0], c[0]))


def test_difgsm_stays_within_eps_and_raises_the_teachers_loss(teacher):
    _, cfg, ckpt = teacher
    t_model = _model(ckpt)
    for p in t_model.parameters():
        p.requires_grad_(False)
    t_model.set_vocabulary(load_checkpoint(ckpt)["text"])
    images, _, targets = _images_and_boxes(cfg, 2)
    before = [x.clone() for x in images]
    eps, attack = 8 / 255, {"alpha": 2 / 255, "steps": 10}
    advs = [difgsm(t_model, images, targets, torch.Generator().manual_seed(s), eps=eps, **attack) for s in range(3)]
    adv = advs[0]
    assert all(torch.equal(x, y) for x, y in zip(images, before))  # inputs untouched
    for a, x in zip(adv, images):
        assert a.shape == x.shape and float((a - x).abs().max()) <= eps + 1e-6
        assert float(a.min()) >= 0 and float(a.max()) <= 1 and float((a - x).abs().max()) > eps / 2

    def loss(xs):  # averaged over the RoI sampler's draws
        gt = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        out = []
        with torch.random.fork_rng(), loss_mode(t_model), torch.no_grad():
            for seed in range(8):
                torch.manual_seed(seed)
                out.append(float(classification_loss(t_model(xs, gt))))
        return sum(out) / len(out)

    def sign_noise(seed):
        g = torch.Generator().manual_seed(seed)
        return [(x + eps * torch.sign(torch.randn(x.shape, generator=g))).clamp(0, 1) for x in images]

    # The attack raises the loss well beyond what random noise of the same size does. One attack draw
    # against this barely trained teacher varies (its input diversity is random: one 5-step draw gave
    # +3.7 %, others +7 %, and the teacher itself differs by CPU), so the mean over three draws is
    # compared with the worst of clean and three noise draws (noise moves the loss by up to ~2 %).
    floor = max([loss(images)] + [loss(sign_noise(s)) for s in (1, 2, 3)])
    assert sum(loss(a) for a in advs) / len(advs) > floor * 1.05
    assert not t_model.training  # the teacher is back in eval mode
    rng = torch.get_rng_state()
    again = difgsm(t_model, images, targets, torch.Generator().manual_seed(0), eps=eps, **attack)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert all(torch.equal(a, b) for a, b in zip(adv, again))


def test_feature_imitation_aligns_levels_by_stride_and_adapts_channels(teacher):
    from ovd.config_schema import ModelConfig
    from ovd.modeling.build import build_detector

    t_model = _model(teacher[2])
    m = ModelConfig(backbone="mobilenet_v3_large_fpn", norm="bn", fpn_channels=16, representation_size=32,
                    min_size=96, max_size=96)  # fmt: skip
    student = build_detector(m, 32)
    pairs = match_levels(student, t_model, (96, 96))
    # teacher: strides 8, 16, 32, 64 (pool); torchvision's MobileNetV3 FPN: 32, 32 (the first block of
    # the last stage and the stage's end), 64
    assert [(s, t) for s, t, _, _ in pairs] == [("0", "2"), ("1", "2"), ("pool", "pool")]
    assert all(cs == 16 and ct == 64 for _, _, cs, ct in pairs)
    imitation = FeatureImitation(pairs)
    fs = {"0": torch.randn(1, 16, 6, 6), "1": torch.randn(1, 16, 3, 3), "pool": torch.randn(1, 16, 2, 2)}
    ft = {"0": torch.randn(1, 64, 12, 12), "1": torch.randn(1, 64, 6, 6), "2": torch.randn(1, 64, 3, 3),
          "pool": torch.randn(1, 64, 2, 2)}  # fmt: skip
    loss = imitation(fs, ft)
    loss.backward()
    assert all(a.weight.grad is not None for a in imitation.adapters.values())
    same = FeatureImitation([("0", "0", 4, 4)])
    f = {"0": torch.randn(2, 4, 5, 5)}
    assert float(same(f, f)) == 0.0
    # relative to the teacher's scale: a zero student scores 1, and scaling both changes nothing
    g = {"0": torch.randn(2, 4, 5, 5)}
    assert float(same({"0": torch.zeros(2, 4, 5, 5)}, g)) == pytest.approx(1.0)
    assert float(same({"0": 100 * f["0"]}, {"0": 100 * g["0"]})) == pytest.approx(float(same(f, g)), rel=1e-5)


@pytest.mark.slow
def test_adversarial_cache_is_made_once_reused_and_checked(teacher, mini_world, tmp_path):
    """adversarial_source=cache: one DI-FGSM image per training image (within eps, 8-bit), made before
    training and reused by a second student of the same teacher; a student trains from it with the
    adversarial loss on; a cached image that is not its training image's is one error."""
    from ovd.data.images import load_image

    extra = ("student.adversarial_aug=true", "student.adversarial_source=cache", "student.adversarial_steps=2",
             f"student.adversarial_cache_dir={tmp_path / 'adv'}", "train.hflip=true")  # fmt: skip
    cfg = student_cfg(teacher, mini_world, tmp_path / "a", *extra)
    rep = run_student(cfg, teacher[2], progress=False)
    assert rep["complete"] and "loss_kd_adversarial" in rep["loss_terms"]
    cache = rep["adversarial_cache"]
    assert cache["images"] == 8 and cache["made"] == 8
    folder = Path(cache["folder"])
    images, _, targets = _images_and_boxes(cfg, 8)
    for x, t in zip(images, targets):
        a = load_image(folder / f"{t['image_id']}.png")
        assert a.shape == x.shape and float((a - x).abs().max()) <= 8 / 255 + 1e-4
    assert sum(float((load_image(folder / f"{t['image_id']}.png") - x).abs().max()) > 2 / 255
               for x, t in zip(images, targets)) >= 4  # fmt: skip
    # a second student (frequency augmentation on too) reuses the same images
    again = run_student(student_cfg(teacher, mini_world, tmp_path / "b", *extra, "student.frequency_aug=true"),
                        teacher[2], progress=False)  # fmt: skip
    assert again["adversarial_cache"]["made"] == 0 and again["adversarial_cache"]["folder"] == str(folder)
    # another attack setting is another folder (never a stale image)
    other = run_student(student_cfg(teacher, mini_world, tmp_path / "c", *extra[:2], "student.adversarial_steps=1",
                                    *extra[3:]), teacher[2], progress=False)  # fmt: skip
    assert other["adversarial_cache"]["folder"] != str(folder) and other["adversarial_cache"]["made"] == 8
    # a damaged cache (an image swapped for another) stops the run with one error
    first = folder / f"{targets[0]['image_id']}.png"
    shutil.copy(folder / f"{targets[1]['image_id']}.png", first)
    with pytest.raises(OvdError, match="not within eps of its training image"):
        run_student(student_cfg(teacher, mini_world, tmp_path / "d", *extra), teacher[2], progress=False)
    with pytest.raises(OvdError, match="adversarial_source must be one of step, cache"):
        run_student(student_cfg(teacher, mini_world, tmp_path / "e", "student.adversarial_source=disk"), teacher[2],
                    progress=False)  # fmt: skip


@pytest.mark.slow
def test_a_stopped_student_run_resumes_exactly(teacher, mini_world, tmp_path):
    """Stopped after 2 of 4 steps and resumed, with both IKD augmentations on (their random draws and
    the teacher's RoI sampling during the attack): the same weights as an uninterrupted run."""
    extra = ("train.epochs=1", "student.frequency_aug=true", "student.frequency_prob=1.0",
             "student.adversarial_aug=true", "student.adversarial_steps=1")  # fmt: skip
    whole = student_cfg(teacher, mini_world, tmp_path / "a", *extra)
    ref = run_student(whole, teacher[2], progress=False)
    parts = student_cfg(teacher, mini_world, tmp_path / "b", *extra)
    parts.train.max_iters = 2
    assert run_student(parts, teacher[2], progress=False)["iterations"] == 2
    parts.train.max_iters = 0
    got = run_student(parts, teacher[2], progress=False)
    assert ref["complete"] and got["complete"]
    a, b = load_checkpoint(ref["out"])["model"], load_checkpoint(got["out"])["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # another student setting is refused on resume, naming it
    changed = student_cfg(teacher, mini_world, tmp_path / "b", *extra, "student.noise_sigma=0.2")
    with pytest.raises(OvdError, match=r"student.noise_sigma: 0.08 -> 0.2"):
        run_student(changed, teacher[2], progress=False)


@pytest.mark.slow
def test_table_driver_and_latency_bench_on_a_tiny_run(teacher, mini_world, tmp_path, capsys):
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "tools"
    mods = {}
    for name in ("run_student", "bench_student_latency"):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mods[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[name])
    setup, _, ckpt = teacher
    args = [CONFIG, "--seeds", "0", "--teacher", ckpt, "--rows", "alone", "kd", "--no-latency",
            *overrides(setup, mini_world, tmp_path / "w")]  # fmt: skip
    assert mods["run_student"].main(args) == 0
    table = json.loads((tmp_path / "w" / "student_table" / "table.json").read_text())
    assert list(table["rows"]) == ["teacher", "alone", "kd"]
    assert all(isinstance(table["rows"]["kd"][m][0], float) for m in ("AP50_base", "AP50_novel"))
    capsys.readouterr()
    assert mods["run_student"].main(args) == 0  # finished runs are reused
    assert capsys.readouterr().out.count("reused") == 2
    with pytest.raises(SystemExit, match="holds a kd run with other settings"):
        mods["run_student"].main(args + ["student.feature_weight=0.5"])
    # the latency bench: both detectors, both runtimes, side by side
    img = mini_world / "det" / "images" / "val"
    rec = mods["bench_student_latency"].main([str(img), "--teacher", ckpt, "--student",
                                              table["per_seed"]["0"]["kd"]["ckpt"], "--limit", "1", "--rounds",
                                              "1", "--warmup", "0", "--threads", "1"])  # fmt: skip
    r = rec["results"][0]
    assert rec["parameters"]["student"] < rec["parameters"]["teacher"]
    assert r["pytorch"]["student_over_teacher"] > 0 and r["onnxruntime"]["student_over_teacher"] > 0
