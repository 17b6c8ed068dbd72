"""Bad input ends in one clear error line — never a traceback, never a silently wrong result.

``test_cli_refuses_bad_input`` is one table: per row a command line (``{placeholders}`` are files of
the module fixture), how the bad file / config is made, and a fragment the error must contain. Each
row runs the real CLI in-process and asserts exit status 2 and stderr exactly one ``ovd: error:``
line (``run_err``). The tests after the table check results that must be *right*, not refused:
16-bit and other PNG modes, a vocabulary in normalised form, the CLIP fingerprint of a copied work_dir.

Nothing here trains: the detector checkpoint is an untrained model saved with ``save_checkpoint``,
the CLIP a 1-layer random one, the data 4 train / 3 val images of the smoke mini-world.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures import run_err, subset_json, tiny_clip_dir
from PIL import Image

from ovd.config import load_config
from ovd.errors import OvdError, describe

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mini" / "smoke.yaml")


class Foreign:
    """Pickled into a file, this is what ``weights_only=True`` refuses (a class, not tensors)."""


# --- the module's files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(mini_world, tmp_path_factory) -> dict:
    from ovd.modeling.build import build_detector
    from ovd.modeling.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bad_input")
    clip = tiny_clip_dir(root / "clip")
    train4 = subset_json(mini_world / "det" / "train.json", root / "train4.json", 4)
    val3 = subset_json(mini_world / "det" / "val.json", root / "val3.json", 3)
    split = json.loads((mini_world / "split.json").read_text())
    base = ["model.distill=false", "model.min_size=64", "model.max_size=64", "train.device=cpu",
            "train.batch_size=2", "train.epochs=1", "train.lr_steps=[1]", "adapter.enabled=false",
            "miner.enabled=false", "adapter.max_crops=8", "miner.topk=3", "miner.stride=64"]  # fmt: skip
    ov = [f"world.dir={mini_world}", f"work_dir={root / 'work'}", f"clip.model=local-dir:{clip}",
          f"data.train_json={train4}", f"data.val_json={val3}", *base]  # fmt: skip
    cfg = load_config(CONFIG, ov)
    model = build_detector(cfg.model, 32)
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(len(split["base"]), 32), dim=-1))
    meta = {"base_names": split["base"], "embed_dim": 32, "clip": f"local-dir:{clip}",
            "clip_spec": {"model": f"local-dir:{clip}", "pretrained": ""},
            "model": json.loads(json.dumps(dict(cfg.model))), "templates": ["a photo of a {}."],
            "train_settings": {}}  # fmt: skip
    ckpt = root / "good.pt"
    save_checkpoint(ckpt, model, None, None, 0, meta)
    val = json.loads(val3.read_text())
    return {
        "root": root, "world": mini_world, "clip": clip, "train4": train4, "val3": val3, "ckpt": ckpt,
        "ov": " ".join(ov), "image": mini_world / "det" / "images" / val["images"][0]["file_name"],
        "config": CONFIG, "split": split, "gt": val3,
    }  # fmt: skip


# --- makers of bad files: (env, tmp) -> path ------------------------------------------------------------
def empty(name):
    def make(env, tmp):
        (tmp / name).write_bytes(b"")
        return tmp / name

    return make


def text(name, content):
    def make(env, tmp):
        (tmp / name).write_text(content)
        return tmp / name

    return make


def as_json(name, obj):
    return text(name, json.dumps(obj))


def foreign_pickle(name):
    def make(env, tmp):
        torch.save({"format": "ovd-detector/1", "model": Foreign()}, tmp / name)
        return tmp / name

    return make


def ckpt(change):
    """The module's good checkpoint with ``change(state)`` applied (state as torch.load gives it)."""

    def make(env, tmp):
        state = torch.load(env["ckpt"], weights_only=True)
        state = change(state) or state
        torch.save(state, tmp / "ckpt.pt")
        return tmp / "ckpt.pt"

    return make


def meta_change(**kw):
    def change(state):
        meta = json.loads(state["meta_json"])
        meta.update(kw)
        meta = {k: v for k, v in meta.items() if v is not None}
        state["meta_json"] = json.dumps(meta)

    return ckpt(change)


def png_claiming(w, h):
    """A PNG whose header claims w x h pixels (and holds none): a decompression bomb's first bytes."""

    def make(env, tmp):
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
        (tmp / "bomb.png").write_bytes(data)
        return tmp / "bomb.png"

    return make


def float_tiff(env, tmp):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp / "float.tif")
    return tmp / "float.tif"


def dets(change):
    """A valid detections list for the val subset with ``change(list)`` applied."""

    def make(env, tmp):
        gt = json.loads(env["val3"].read_text())
        a = gt["annotations"][0]
        good = {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
        out = [dict(good), dict(good)]
        change(out)
        (tmp / "dets.json").write_text(json.dumps(out))
        return tmp / "dets.json"

    return make


def world_copy_with(damage):
    """A 4-image copy of the train world (images included) with ``damage(image_path)`` applied to the
    second image; the bad file is that image."""

    def make(env, tmp):
        data = json.loads(env["train4"].read_text())
        root = tmp / "images"
        for im in data["images"]:
            (root / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(env["world"] / "det" / "images" / im["file_name"], root / im["file_name"])
        (tmp / "train.json").write_text(json.dumps(data))
        bad = root / data["images"][1]["file_name"]
        damage(bad)
        return bad

    return make


def truncate(path):
    path.write_bytes(path.read_bytes()[:60])


def resize(path):
    Image.new("RGB", (17, 13)).save(path)


def clashing_split(env, tmp):
    """A train file with categories 'red circle' and 'Red Circle' (distinct to JSON, one text to CLIP)
    and a split with both as base classes."""
    data = json.loads(env["train4"].read_text())
    name = env["split"]["base"][0]
    data["categories"].append({"id": 999, "name": name.title()})
    (tmp / "train.json").write_text(json.dumps(data))
    (tmp / "split.json").write_text(json.dumps({"base": [name, name.title()], "novel": []}))
    return tmp / "split.json"


def clip_with_empty_weights(env, tmp):
    (tmp / "clip").mkdir()
    shutil.copy(env["clip"] / "open_clip_config.json", tmp / "clip")
    (tmp / "clip" / "open_clip_model.safetensors").write_bytes(b"")
    return tmp / "clip"


def clip_with_pickled_weights(env, tmp):
    shutil.copytree(env["clip"], tmp / "clip")
    (tmp / "clip" / "open_clip_model.safetensors").unlink()
    torch.save({"state_dict": Foreign()}, tmp / "clip" / "open_clip_pytorch_model.bin")
    return tmp / "clip"


# a class name longer than the tiny CLIP's 16-token context once in "a photo of a {}.": the two names
# differ only after the cut, so the text tower would give them one embedding
LONG = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
LONG_NAMES = f"{LONG} one,{LONG} two"


def vocabulary(change=None, other_clip=False, hashed=True):
    """A stored vocabulary of the module's CLIP (``other_clip``: of another tiny CLIP of the same
    width, as `ovd vlm pretrain-mini` with another seed makes), then ``change(path)`` applied."""

    def make(env, tmp):
        from ovd.vlm.clip import ClipModel
        from ovd.vlm.vocab import embed_vocabulary

        clip_dir = tiny_clip_dir(tmp / "other_clip", seed=1) if other_clip else env["clip"]
        path = tmp / "v.safetensors"
        embed_vocabulary(ClipModel.load(str(clip_dir)), env["split"]["base"] + env["split"]["novel"], path,
                         ["a photo of a {}."], source=f"local-dir:{clip_dir}")  # fmt: skip
        if not hashed:
            rewrite_vocab_meta(path, lambda m: m.pop("embeddings_sha256"))
        if change:
            change(path)
        return path

    return make


def overwrite_tensor_bytes(byte):
    """Every byte of the stored embeddings set to ``byte`` (0xFF: NaN, 0x00: zero rows)."""

    def change(path):
        data = bytearray(path.read_bytes())
        start = 8 + struct.unpack("<Q", bytes(data[:8]))[0]
        data[start:] = bytes([byte]) * (len(data) - start)
        path.write_bytes(bytes(data))

    return change


def rewrite_vocab_meta(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(path), metadata=meta)


def config_yaml(content):
    return text("bad.yaml", content)


# --- the table ------------------------------------------------------------------------------------------
# (id, command line, maker of the bad file {bad} or None, fragment of the error line)
TRAIN = "train {config} {ov}"
# fmt: off
ROWS = [
    # -- ovd eval
    ("eval-missing-gt", "eval --gt {root}/nope.json --dets {bad}", dets(lambda d: None), "annotation file not found"),
    ("eval-missing-dets", "eval --gt {gt} --dets {root}/none.json", None, "detections file not found"),
    ("eval-malformed-dets", "eval --gt {gt} --dets {bad}", text("d.json", '[{"image_id": 1,'), "is not valid JSON"),
    ("eval-empty-dets-file", "eval --gt {gt} --dets {bad}", empty("d.json"), "is not valid JSON"),
    ("eval-dets-not-a-list", "eval --gt {gt} --dets {bad}", as_json("d.json", {"a": 1}), "must be a JSON list"),
    ("eval-negative-width", "eval --gt {gt} --dets {bad}",
     dets(lambda d: d[1]["bbox"].__setitem__(2, -5.0)), "[1]: 'bbox' [x, y, w, h] needs width and height > 0"),
    ("eval-zero-height", "eval --gt {gt} --dets {bad}",
     dets(lambda d: d[0]["bbox"].__setitem__(3, 0)), "[0]: 'bbox' [x, y, w, h] needs width and height > 0"),
    ("eval-nan-score", "eval --gt {gt} --dets {bad}",
     dets(lambda d: d[1].__setitem__("score", float("nan"))), "[1]: 'score' must be a finite number"),
    ("eval-inf-bbox", "eval --gt {gt} --dets {bad}",
     dets(lambda d: d[0]["bbox"].__setitem__(0, float("inf"))), "'bbox' must be 4 finite numbers"),
    ("eval-3-number-bbox", "eval --gt {gt} --dets {bad}", dets(lambda d: d[0]["bbox"].pop()), "4 finite numbers"),
    ("eval-unknown-split", "eval --gt {gt} --dets {bad} --split nosuch", dets(lambda d: None), "unknown split"),
    ("eval-missing-arg", "eval --gt {gt}", None, "required: --dets"),
    # -- ovd config
    ("config-duplicate-section", "config {bad}", config_yaml("train:\n  lr: 0.1\nseed: 1\ntrain:\n  epochs: 2\n"),
     "key 'train' is given twice (lines 1 and 4)"),
    ("config-duplicate-nested", "config {bad}", config_yaml("seed: 1\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n"),
     "key 'train.lr' is given twice (lines 3 and 5)"),
    ("config-unknown-key", "config {bad}", config_yaml("train:\n  lrr: 0.1\n"), "unknown config key 'train.lrr'"),
    ("config-bad-yaml", "config {bad}", config_yaml("train: [1, 2\n"), "is not valid YAML"),
    ("config-empty-file-is-fine", "config {bad}", text("bad.yaml", ""), None),  # control: the defaults
    ("config-missing-file", "config {root}/none.yaml", None, "config file not found"),
    ("config-override-no-equals", "config {config} seed", None, "not of the form key=value"),
    ("config-batch-size-0", "config {config} train.batch_size=0", None,
     "'train.batch_size' is 0: expected an integer >= 1"),
    ("config-lr-negative", "config {config} train.lr=-0.1", None, "'train.lr' is -0.1: expected a number > 0"),
    ("config-lr-nan", "config {config} adapter.lr=nan", None, "'adapter.lr' is nan"),
    ("config-nms-over-1", "config {config} miner.nms_thr=1.5", None,
     "'miner.nms_thr' is 1.5: expected a number in [0, 1]"),
    ("config-scales-entry", "config {config} miner.scales=[1,0]", None, "'miner.scales' holds 0.0"),
    ("config-heads", "config {config} pretrain.text_heads=3", None, "multiple of the number of attention heads"),
    ("config-type", "config {config} train.epochs=many", None, "config key 'train.epochs'"),
    # -- ovd train (items 3, 6, 7, 9, 12)
    ("train-batch-size-0", TRAIN + " train.batch_size=0", None, "'train.batch_size' is 0"),
    ("train-checkpoint-every-0", TRAIN + " train.checkpoint_every=0", None, "'train.checkpoint_every' is 0"),
    ("train-epochs-negative", TRAIN + " train.epochs=-1", None, "'train.epochs' is -1: expected an integer >= 1"),
    ("train-epochs-0", TRAIN + " train.epochs=0", None, "'train.epochs' is 0"),
    ("train-eval-every-negative", TRAIN + " train.eval_every=-3", None, "'train.eval_every' is -3"),
    ("train-device", TRAIN + " train.device=gpu0", None, "train.device 'gpu0' is not a device"),
    ("train-empty-backbone-weights", TRAIN + " model.backbone_weights={bad}", empty("w.pth"),
     "w.pth is empty (0 bytes)"),
    ("train-empty-safetensors-weights", TRAIN + " model.backbone_weights={bad}", empty("w.safetensors"),
     "is empty (0 bytes)"),
    ("train-pickled-object-weights", TRAIN + " model.backbone_weights={bad}", foreign_pickle("w.pth"),
     "holds Python objects other than tensors and plain data (test_bad_input.Foreign); ovd does not load such files"),
    ("train-split-names-clash", TRAIN + " data.train_json={tmp}/train.json data.split={bad}", clashing_split,
     "are one name to the CLIP tokenizer"),
    ("train-truncated-image", TRAIN + " data.train_json={tmp}/train.json data.image_root={tmp}/images",
     world_copy_with(truncate), "cannot read image {bad}"),
    ("train-image-size-differs", TRAIN + " data.train_json={tmp}/train.json data.image_root={tmp}/images",
     world_copy_with(resize), "is 17x13, its annotation says 160x160"),
    # -- ovd test (items 3, 4, 12)
    ("test-missing-ckpt", "test {config} {ov} --ckpt {root}/none.pt", None, "checkpoint not found"),
    ("test-empty-ckpt", "test {config} {ov} --ckpt {bad}", empty("c.pt"), "c.pt is empty (0 bytes)"),
    ("test-format-only-ckpt", "test {config} {ov} --ckpt {bad}", ckpt(lambda s: {"format": "ovd-detector/1"}),
     "field 'model' must be a non-empty state dict of tensors (it is missing)"),
    ("test-ckpt-empty-meta", "test {config} {ov} --ckpt {bad}", ckpt(lambda s: s.update(meta_json="")),
     "field 'meta_json' is not valid JSON"),
    ("test-ckpt-meta-no-dim", "test {config} {ov} --ckpt {bad}", meta_change(embed_dim=None),
     "meta_json needs 'embed_dim', a positive integer (it is missing)"),
    ("test-pickled-object-ckpt", "test {config} {ov} --ckpt {bad}", foreign_pickle("c.pt"),
     "other than tensors and plain data"),
    ("test-garbage-ckpt", "test {config} {ov} --ckpt {bad}", text("c.pt", "not a checkpoint"),
     "cannot read checkpoint"),
    ("test-empty-text-embeddings", "test {config} {ov} --ckpt {ckpt} clip.text_embeddings={bad}",
     empty("t.safetensors"), "text embeddings file"),
    # -- ovd detect (items 3, 4, 5, 8, 9)
    ("detect-empty-ckpt", "detect {image} --ckpt {bad} --classes a --out {tmp}/o", empty("c.pt"), "is empty (0 bytes)"),
    ("detect-format-only-ckpt", "detect {image} --ckpt {bad} --classes a --out {tmp}/o",
     ckpt(lambda s: {"format": "ovd-detector/1"}), "field 'model'"),
    ("detect-meta-not-object", "detect {image} --ckpt {bad} --classes a --out {tmp}/o",
     ckpt(lambda s: s.update(meta_json="[1, 2]")), "must hold a JSON object, got list"),
    ("detect-meta-bad-model", "detect {image} --ckpt {bad} --classes a --out {tmp}/o",
     meta_change(model={"min_size": "big"}), "'min_size' is 'big', expected an integer"),
    ("detect-non-tensor-weights", "detect {image} --ckpt {bad} --classes a --out {tmp}/o",
     ckpt(lambda s: s["model"].update(extra=[1, 2])), "non-tensor entry 'extra'"),
    ("detect-no-iteration", "detect {image} --ckpt {bad} --classes a --out {tmp}/o",
     ckpt(lambda s: s.pop("iteration")), "field 'iteration'"),
    ("detect-pickled-object", "detect {image} --ckpt {bad} --classes a --out {tmp}/o", foreign_pickle("c.pt"),
     "ovd does not load such files"),
    ("detect-classes-case", "detect {image} --ckpt {ckpt} --classes 'red square,Red Square' --out {tmp}/o", None,
     "'red square' and 'Red Square' are one name to the CLIP tokenizer"),
    ("detect-classes-space", "detect {image} --ckpt {ckpt} --classes 'red  square,red square' --out {tmp}/o", None,
     "(it reads both as 'red square')"),
    ("detect-classes-empty", "detect {image} --ckpt {ckpt} --classes ' , ' --out {tmp}/o", None, "empty class list"),
    ("detect-bomb-png", "detect {bad} --ckpt {ckpt} --classes a --out {tmp}/o", png_claiming(20000, 20000),
     "bomb.png is too large (20000x20000)"),
    ("detect-float-tiff", "detect {bad} --ckpt {ckpt} --classes a --out {tmp}/o", float_tiff, "floating-point"),
    ("detect-text-png", "detect {bad} --ckpt {ckpt} --classes a --out {tmp}/o", text("x.png", "hello"),
     "cannot read image"),
    ("detect-missing-image", "detect {root}/none.png --ckpt {ckpt} --classes a --out {tmp}/o", None, "image not found"),
    ("detect-score-thr", "detect {image} --ckpt {ckpt} --classes a --score-thr 2 --out {tmp}/o", None,
     "score threshold"),
    ("detect-missing-arg", "detect {image} --classes a", None, "required: --ckpt"),
    # -- stored vocabularies and class names the text tower would get wrong
    ("detect-classes-longer-than-context", "detect {image} --ckpt {ckpt} --classes '" + LONG_NAMES + "' --out {tmp}/o",
     None, f"class name '{LONG} one' is longer than the text tower reads"),
    ("vocab-embed-longer-than-context", "vocab embed {config} {ov} --classes-file {bad} --out {tmp}/v.safetensors",
     text("c.txt", LONG_NAMES.replace(",", "\n")), "is longer than the text tower reads"),
    ("detect-vocab-nan-bytes", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(overwrite_tensor_bytes(0xFF)), "damaged vocabulary file {bad}: its embeddings do not match their "
     "stored content hash"),
    ("detect-vocab-zero-bytes", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(overwrite_tensor_bytes(0x00)), "damaged vocabulary file {bad}: its embeddings do not match"),
    ("detect-vocab-nan-unhashed", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(overwrite_tensor_bytes(0xFF), hashed=False), "non-finite values (NaN or infinity) in the row of"),
    ("detect-vocab-zero-unhashed", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(overwrite_tensor_bytes(0x00), hashed=False), "has norm 0, expected unit text embeddings"),
    ("detect-vocab-no-names", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(lambda p: rewrite_vocab_meta(p, lambda m: m.pop("names"))),
     "damaged vocabulary file {bad}: no 'names' metadata"),
    ("detect-vocab-names-not-json", "detect {image} --ckpt {ckpt} --text-embeddings {bad} --out {tmp}/o",
     vocabulary(lambda p: rewrite_vocab_meta(p, lambda m: m.update(names="[not json"))),
     "damaged vocabulary file {bad}: its 'names' metadata is not JSON"),
    ("test-vocab-of-another-clip", "test {config} {ov} --ckpt {ckpt} clip.text_embeddings={bad}",
     vocabulary(other_clip=True), "were made with another CLIP"),
    ("train-vocab-of-another-clip", TRAIN + " clip.text_embeddings={bad}", vocabulary(other_clip=True),
     "were made with another CLIP"),
    ("test-vocab-of-this-clip-is-fine", "test {config} {ov} --ckpt {ckpt} clip.text_embeddings={bad}", vocabulary(),
     None),
    ("test-template-without-braces", "test {config} {ov} --ckpt {ckpt} 'clip.templates=[a photo]'", None,
     "config key 'clip.templates': prompt template 'a photo' must contain '{{}}' exactly once"),
    ("vlm-eval-template-without-braces", "vlm eval {config} {ov} 'clip.templates=[a photo]'", None,
     "'clip.templates': prompt template 'a photo' must contain"),
    ("test-templates-empty", "test {config} {ov} --ckpt {ckpt} 'clip.templates=[]'", None,
     "config key 'clip.templates': no prompt templates"),
    # -- output paths checked before any work
    ("detect-results-under-a-file", "detect {image} --ckpt {ckpt} --classes a --results {bad}/r.json", text("f", "x"),
     "--results {bad}/r.json: {bad} is not a folder"),
    ("export-out-under-a-file", "export --ckpt {ckpt} --classes a --out {bad}/m.onnx", text("f", "x"),
     "--out {bad}/m.onnx: {bad} is not a folder"),
    ("replay-stats-out-is-a-folder", "replay stats {config} {ov} --ckpt {ckpt} --out {tmp}", None,
     "--out {tmp}: is a folder, expected a file path"),
    # -- ovd extract / mine / adapt / vlm eval / vlm pretrain-mini / data mini / run
    ("extract-chunk-size-0", "extract {config} {ov} extract.chunk_size=0", None, "'extract.chunk_size' is 0"),
    ("extract-bad-shard", "extract {config} {ov} --shard x", None, "--shard must look like i/N"),
    ("extract-empty-adapter", "extract {config} {ov} adapter.enabled=true adapter.out={bad}", empty("a.safetensors"),
     "a.safetensors is empty (0 bytes)"),
    ("extract-empty-clip-weights", "extract {config} {ov} clip.model=local-dir:{bad}", clip_with_empty_weights,
     "could not load CLIP local-dir:{bad}: weights file {bad}/open_clip_model.safetensors is empty (0 bytes)"),
    ("extract-truncated-image", "extract {config} {ov} data.train_json={tmp}/train.json data.image_root={tmp}/images",
     world_copy_with(truncate), "cannot read image {bad}"),
    ("mine-topk-0", "mine {config} {ov} miner.topk=0", None, "'miner.topk' is 0"),
    ("mine-base-iou", "mine {config} {ov} miner.base_iou_thr=-0.5", None, "'miner.base_iou_thr' is -0.5"),
    ("mine-truncated-image", "mine {config} {ov} data.train_json={tmp}/train.json data.image_root={tmp}/images "
     "miner.enabled=true miner.out={tmp}/p.json", world_copy_with(truncate), "cannot read image {bad}"),
    ("adapt-lr-0", "adapt {config} {ov} adapter.lr=0", None, "'adapter.lr' is 0.0: expected a number > 0"),
    ("adapt-batch-negative", "adapt {config} {ov} adapter.batch_size=-1", None, "'adapter.batch_size' is -1"),
    ("vlm-eval-empty-adapter", "vlm eval {config} {ov} --adapter {bad}", empty("a.safetensors"), "is empty (0 bytes)"),
    ("vlm-eval-garbage-adapter", "vlm eval {config} {ov} --adapter {bad}", text("a.safetensors", "xx"),
     "not a readable safetensors file"),
    ("vlm-eval-pickled-clip-weights", "vlm eval {config} {ov} clip.model=local-dir:{bad} --no-adapter",
     clip_with_pickled_weights, "could not load CLIP local-dir:{bad}: UnpicklingError: the file holds Python objects "
     "other than tensors and plain data (test_bad_input.Foreign)"),
    ("vlm-eval-clip-batch-0", "vlm eval {config} {ov} clip.batch_size=0", None, "'clip.batch_size' is 0"),
    ("pretrain-epochs-0", "vlm pretrain-mini {config} {ov} pretrain.epochs=0", None, "'pretrain.epochs' is 0"),
    ("pretrain-patch-too-big", "vlm pretrain-mini {config} {ov} pretrain.patch_size=64", None,
     "'pretrain.patch_size' is 64: expected at most pretrain.image_size (32)"),
    ("data-mini-bad-seed", "data mini --out {tmp}/w --seed -1", None, "seed must be a non-negative integer"),
    ("data-mini-bad-preset", "data mini --out {tmp}/w --preset huge", None, "huge"),
    ("run-seed-negative", "run {config} {ov} seed=-2", None, "'seed' is -2: expected an integer >= 0"),
]
# fmt: on


@pytest.mark.parametrize("argv, make, fragment", [pytest.param(*r[1:], id=r[0]) for r in ROWS])
def test_cli_refuses_bad_input(env, tmp_path, capsys, monkeypatch, argv, make, fragment):
    monkeypatch.chdir(tmp_path)
    bad = make(env, tmp_path) if make else None
    names = {**{k: str(v) for k, v in env.items() if isinstance(v, (str, Path))}, "tmp": str(tmp_path), "bad": str(bad)}
    names["ov"] += f" work_dir={tmp_path / 'work'}"  # nothing a row writes is seen by another
    args = shlex.split(argv.format(**names))
    if fragment is None:  # a control row: this input is fine
        from ovd.cli import main

        assert main(args) == 0
        return
    line = run_err(capsys, *args)
    assert fragment.format(**names) in line, line
    assert "weights_only" not in line  # never torch's advice to unpickle an untrusted file


def test_the_table_covers_every_command():
    commands = {r[1].split()[0] + (" " + r[1].split()[1] if r[1].split()[0] in ("vlm", "data") else "") for r in ROWS}
    assert {"eval", "config", "train", "test", "detect", "extract", "mine", "adapt", "vlm eval",
            "vlm pretrain-mini", "data mini", "run"} <= commands  # fmt: skip
    assert len(ROWS) >= 40


# --- describe: the one formatter of foreign exceptions ------------------------------------------------
def test_describe_handles_empty_messages_and_torch_advice(tmp_path):
    assert describe(EOFError()) == "EOFError"
    assert describe(ValueError("\n\n  ")) == "ValueError"
    assert describe(RuntimeError("first\nsecond")) == "RuntimeError: first"
    torch.save({"x": Foreign()}, tmp_path / "f.pt")
    with pytest.raises(Exception) as e:
        torch.load(tmp_path / "f.pt", weights_only=True)
    text = describe(e.value)
    assert "weights_only" not in text and "Foreign" in text and "\n" not in text


def test_load_checkpoint_of_a_good_file_still_works(env):
    from ovd.modeling.checkpoint import load_checkpoint

    state = load_checkpoint(env["ckpt"])
    assert state["meta"]["embed_dim"] == 32 and state["iteration"] == 0


# --- images: every PIL mode read correctly ---------------------------------------------------------------
def test_16bit_grayscale_png_is_scaled_by_its_bit_depth(tmp_path):
    from ovd.data.images import load_image

    values = np.array([[0, 1, 255, 256], [4096, 32768, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # what Pillow makes of a 16-bit grey PNG ("I;16")
    x = load_image(tmp_path / "g16.png")
    assert x.shape == (3, 2, 4)
    expected = torch.from_numpy(values.astype(np.float64) / 65535).float()
    for c in range(3):
        assert torch.allclose(x[c], expected, atol=1e-7)
    assert x.max() == 1.0 and x.min() == 0.0 and 0.49 < float(x[0, 1, 1]) < 0.51  # not all white


def test_load_image_pil_is_the_same_pixels_in_8_bits(tmp_path):
    from ovd.data.images import load_image_pil

    Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g.png")
    im = load_image_pil(tmp_path / "g.png")
    assert im.mode == "RGB" and np.asarray(im)[0, :, 0].tolist() == [0, 128, 255]


def test_16bit_png_through_the_detector_api_equals_the_path(tmp_path):
    from ovd.engine.predictor import as_image_tensor

    values = (np.arange(48, dtype=np.uint16) * 1000).reshape(6, 8)
    Image.fromarray(values).save(tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        assert torch.equal(as_image_tensor(im), as_image_tensor(tmp_path / "g.png"))


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "PA"])
def test_8bit_modes_become_the_rgb_pillow_shows(tmp_path, mode):
    from ovd.data.images import load_image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    im = rgb.convert("RGBA").convert(mode) if mode == "PA" else rgb.convert(mode)
    ext = "jpg" if mode == "CMYK" else "tif" if mode == "PA" else "png"
    if mode == "PA":
        pytest.importorskip("PIL.TiffImagePlugin")
        try:
            im.save(tmp_path / f"x.{ext}")
        except (OSError, ValueError, KeyError):
            pytest.skip("Pillow cannot write PA files")
    else:
        im.save(tmp_path / f"x.{ext}", **({"quality": 100} if ext == "jpg" else {}))
    with Image.open(tmp_path / f"x.{ext}") as f:
        ref = np.asarray(f.convert("RGBA").convert("RGB") if f.mode in ("P", "PA") else f.convert("RGB"))
    x = load_image(tmp_path / f"x.{ext}")
    assert x.shape == (3, 5, 7)
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(ref.copy()).permute(2, 0, 1))


def test_check_images_finds_bad_files_without_decoding_good_ones(env, tmp_path):
    from ovd.data.coco import load_detection_dataset
    from ovd.data.images import check_image_files

    ds = load_detection_dataset(env["world"] / "det" / "train.json", env["world"] / "det" / "images")
    t0 = time.perf_counter()
    assert check_image_files(ds) == len(ds) == 100
    assert time.perf_counter() - t0 < 5  # ~10 ms on the smoke world (headers + PNG checksums)
    data = json.loads(env["train4"].read_text())
    data["images"][2]["file_name"] = "nope.png"
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(OvdError, match=r"1 of 4 images listed in .*t\.json cannot be used: image not found: .*nope"):
        load_detection_dataset(tmp_path / "t.json", env["world"] / "det" / "images", check_images=True)


# --- vocabulary: the tokenizer's view of names ---------------------------------------------------------
def test_predict_refuses_names_the_tokenizer_merges(env):
    from ovd.engine.predictor import Detector

    det = Detector.from_checkpoint(env["ckpt"])
    with pytest.raises(OvdError, match="'blue star' and 'Blue Star' are one name"):
        det.predict(env["image"], classes=["blue star", "Blue Star"])
    with pytest.raises(OvdError, match="one name"):
        det.clip.encode_text(["a &amp; b", "a & b"])
    out = det.predict(env["image"], classes=["blue star", "red circle"])  # distinct names still work
    assert set(out["names"]) <= {"blue star", "red circle"}


def test_text_embeddings_file_refuses_merged_names(env, tmp_path):
    from ovd.vlm.clip import write_text_embeddings

    with pytest.raises(OvdError, match="one name to the CLIP tokenizer"):
        write_text_embeddings(tmp_path / "t.safetensors", torch.zeros(2, 4), ["Cat", "cat"], "x")


# --- the CLIP fingerprint: content, not paths ---------------------------------------------------------
def test_fingerprint_follows_the_weights_not_the_folder(env, tmp_path):
    from ovd.vlm.adapter_file import apply_adapter, layernorm_parameters, save_adapter
    from ovd.vlm.clip import ClipModel

    a = ClipModel.load(str(env["clip"]))
    copy = Path(shutil.copytree(env["clip"], tmp_path / "elsewhere" / "clip"))
    b = ClipModel.load(str(copy))
    assert a.fingerprint() == b.fingerprint()  # a copied / moved work_dir keeps its feature cache
    os.utime(copy / "open_clip_model.safetensors", (1, 1))  # touched, same bytes
    assert ClipModel.load(str(copy)).fingerprint() == a.fingerprint()

    other = tiny_clip_dir(tmp_path / "other", seed=1)  # same config, other weights
    assert ClipModel.load(str(other)).fingerprint() != a.fingerprint()

    # the same adapter file under two paths: one fingerprint; no adapter: another
    with torch.no_grad():
        for p in layernorm_parameters(a.model).values():
            p.add_(0.01)
    save_adapter(tmp_path / "a1.safetensors", a, layernorm_parameters(a.model))
    shutil.copy(tmp_path / "a1.safetensors", tmp_path / "a2.safetensors")
    c, d = ClipModel.load(str(env["clip"])), ClipModel.load(str(copy))
    before = c.fingerprint()
    apply_adapter(c, tmp_path / "a1.safetensors")
    apply_adapter(d, tmp_path / "a2.safetensors")
    assert c.fingerprint() == d.fingerprint() != before


def test_random_init_fingerprint_hashes_the_tensors():
    from ovd.vlm.clip import _tensors_digest

    a = {"logit_scale": torch.tensor(2.5), "w": torch.ones(2, 3, dtype=torch.bfloat16), "e": torch.zeros(0)}
    assert _tensors_digest(a) == _tensors_digest({k: v.clone() for k, v in a.items()})
    assert _tensors_digest(a) != _tensors_digest({**a, "logit_scale": torch.tensor(2.0)})


def test_a_copied_work_dir_reuses_its_feature_cache(env, tmp_path):
    from ovd.mining.feature_cache import run_extract

    ov = env["ov"].split() + ["extract.chunk_size=2"]
    work = tmp_path / "w1"
    shutil.copytree(env["clip"], work / "clip")
    first = run_extract(load_config(CONFIG, [*ov, f"work_dir={work}", f"clip.model=local-dir:{work / 'clip'}"]),
                        progress=False)  # fmt: skip
    assert first["chunks_written"] == 2
    moved = Path(shutil.copytree(work, tmp_path / "w2"))
    again = run_extract(load_config(CONFIG, [*ov, f"work_dir={moved}", f"clip.model=local-dir:{moved / 'clip'}"]),
                        progress=False)  # fmt: skip
    assert again["chunks_written"] == 0 and again["chunks_skipped"] == 2


# --- a full disk: one error naming the file, whichever library writes ----------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 5 MiB tmpfs filled up to its last 16 KiB (root only: mounting needs it; skipped otherwise)."""
    import subprocess

    folder = tmp_path / "full"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("a small tmpfs needs root (mount -t tmpfs)")
    try:
        free = shutil.disk_usage(folder).free
        (folder / "filler").write_bytes(b"\0" * (free - (16 << 10)))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_disk_is_one_error_for_every_writer(env, full_disk, tmp_path, capsys):
    from ovd.engine.trainer import _JsonlLog
    from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from ovd.utils.io import atomic_path, write_json
    from ovd.vlm.clip import write_text_embeddings

    state = load_checkpoint(env["ckpt"])
    detector = model_from_checkpoint(state, env["ckpt"])  # megabytes of weights
    detector.set_vocabulary(state["text"])
    emb = torch.nn.functional.normalize(torch.randn(2000, 128), dim=-1)

    def png(path):
        with atomic_path(path) as tmp:  # how ovd detect writes its drawings
            Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(
                tmp, format="PNG")

    def onnx_bytes(path):
        with atomic_path(path) as tmp:  # how ovd export writes the model
            tmp.write_bytes(b"\x08" * (1 << 20))

    def log(path):
        lg = _JsonlLog(path, 0)
        try:
            for i in range(10_000):
                lg.write({"iter": i, "loss": 0.123456789, "pad": "x" * 100})
        finally:
            lg.close()

    writers = {
        "ckpt.pt": lambda p: save_checkpoint(p, detector, None, None, 0, state["meta"]),  # torch.save
        "v.safetensors": lambda p: write_text_embeddings(p, emb, [f"n{i}" for i in range(2000)], "x"),
        "big.json": lambda p: write_json(p, list(range(200_000))),
        "m.onnx": onnx_bytes,
        "d.png": png,
        "log.jsonl": log,
    }
    for name, write in writers.items():
        with pytest.raises(OvdError) as e:
            write(full_disk / name)
        assert str(e.value) == f"cannot write {full_disk / name}: no space left on device", name
        if name == "log.jsonl":  # an appended log keeps the lines it could write; all else is atomic
            (full_disk / name).unlink()
        assert sorted(p.name for p in full_disk.iterdir()) == ["filler"], name
    # the commands of the reproduction: a training run and a stored vocabulary
    from ovd.cli import main

    out = full_disk / "train"
    capsys.readouterr()
    assert main(shlex.split(f"train {env['config']} {env['ov']} work_dir={tmp_path / 'w'} train.out={out} "
                            f"train.max_iters=2 train.checkpoint_every=1")) == 2  # fmt: skip
    err = capsys.readouterr().err  # the progress bar of the step that ran, then the one error line
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"ovd: error: cannot write {out / 'last.pt'}: no space left on device"), err[-500:]
    assert not [p for p in out.rglob("*.tmp")]
    (tmp_path / "names.txt").write_text("".join(f"thing {i}\n" for i in range(1000)))  # 128 KiB of embeddings
    line = run_err(capsys, "vocab", "embed", env["config"], *env["ov"].split(), "--classes-file",
                   str(tmp_path / "names.txt"), "--out", str(full_disk / "v.safetensors"))  # fmt: skip
    assert line == f"ovd: error: cannot write {full_disk / 'v.safetensors'}: no space left on device", line


def test_bench_onnx_on_a_truncated_model_is_one_error(env, tmp_path, monkeypatch, capsys):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_onnx", Path(CONFIG).parents[2] / "tools" / "bench_onnx.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "t.onnx").write_bytes(b"\x08\x07\x12\x07pytorch\x1a\x03" + b"\xff" * 40)  # cut mid-message
    for onnx in (tmp_path / "t.onnx", tmp_path / "none.onnx"):
        monkeypatch.setattr(sys, "argv", ["bench_onnx.py", "--ckpt", str(env["ckpt"]), "--onnx", str(onnx),
                                          str(env["image"])])  # fmt: skip
        with pytest.raises(SystemExit) as e:
            tool.main()
        msg = str(e.value.code)
        assert msg.startswith("bench_onnx: error: ") and "\n" not in msg and str(onnx) in msg, msg
        assert ("cannot read ONNX model" if onnx.name == "t.onnx" else "ONNX model not found") in msg


def test_a_refused_run_leaves_no_folder_holding_only_its_lock(env, tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"")
    out = tmp_path / "runs" / "t"
    run_err(capsys, *shlex.split(f"train {env['config']} {env['ov']} work_dir={tmp_path / 'w'} train.out={out} "
                                 f"model.backbone_weights={tmp_path / 'w.pth'}"))  # fmt: skip
    assert not out.exists()
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")  # a folder that was there before is left as it was, lock aside
    run_err(capsys, *shlex.split(f"train {env['config']} {env['ov']} work_dir={tmp_path / 'w'} train.out={out} "
                                 f"model.backbone_weights={tmp_path / 'w.pth'}"))  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine"


def test_names_a_tokenizer_reads_as_the_same_tokens_are_refused():
    """A tokenizer that drops what it cannot read (here: digits) makes two names one embedding even
    when the CLIP's text cleaning keeps them apart; the token rows themselves are compared."""
    from ovd.vlm.clip import check_tokens

    def tok(texts, context_length=8):
        rows = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [1, *(ord(c) for c in t if not c.isdigit()), 2]
            if len(ids) > context_length:  # cut, the end token kept last (as open_clip's tokenizers do)
                ids = [*ids[: context_length - 1], 2]
            rows[i, : len(ids)] = torch.tensor(ids)
        return rows

    names, templates = ["cat 1", "cat 2"], ["{}"]
    with pytest.raises(OvdError, match="'cat 1' and 'cat 2' are identical as the CLIP tokenizer sees them"):
        check_tokens(tok, names, templates, names, tok(names))
    check_tokens(tok, ["cat", "dog"], templates, ["cat", "dog"], tok(["cat", "dog"]))  # distinct: fine
    long = ["a very long name"]
    with pytest.raises(OvdError, match="longer than the text tower reads"):
        check_tokens(tok, long, templates, long, tok(long))
