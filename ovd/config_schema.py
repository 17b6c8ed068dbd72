"""The schema of every config key ovd accepts (defaults included).

A YAML file or a ``key=value`` override naming a key that is not here is an error, so a typo never
silently falls back to a default. Sections grow with the pipeline stages that read them.
"""

from __future__ import annotations

import math
from dataclasses import MISSING as dataclasses_MISSING
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ovd.errors import OvdError

# teacher outputs a replayed (forged) RoI can be distilled to, see ovd.modeling.distillation.teacher_losses
TEACHER_TERMS = ("embedding", "logits", "deltas")


def lim(
    default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None
) -> Any:
    """A numeric field (or list of numbers) with a valid range, checked by :func:`validate_config`
    for every command: a zero batch size or a negative epoch count is one error naming the key."""
    meta = {"range": (ge, gt, le, lt)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class WorldConfig:
    # The generated mini-world (``ovd data mini``): where it lives and how it is made.
    dir: str = ""
    preset: str = "smoke"
    seed: int = lim(0, ge=0)
    # 3: 65 kinds with atomic invented names (the default); 2: the 36 "<colour> <shape>" classes
    # the v2 numbers in docs/ were measured on (docs/mini_world.md)
    version: int = lim(3, ge=2, le=3)
    # shapes whose classes are all novel in a second split (split_heldout_<shapes>.json and
    # det/train_heldout_<shapes>.json, ``ovd data mini-split``); [] = only the standard split
    heldout_shapes: list[str] = field(default_factory=list)
    # World knobs (v3; docs/mini_world.md "World knobs"); the defaults give the v3 world unchanged.
    # shared: novel kinds reuse base kinds' colours, patterns, silhouette families | own: their own
    novel_attributes: str = "shared"
    # square: instances near each kind's outline | coco: each kind a characteristic box aspect 1:3-3:1
    kind_aspect: str = "square"
    # web train images per kind, 0: the preset's (more teacher data; pretraining time grows with it)
    web_per_class: int = lim(0, ge=0)
    # clean: centred objects on clean backgrounds | scene: web images that look like detection crops
    web_style: str = "clean"


@dataclass
class DataConfig:
    # COCO- or LVIS-format annotation files; image paths are ``image_root / file_name``.
    train_json: str = ""
    val_json: str = ""
    image_root: str = ""
    val_image_root: str = ""  # val images, if not under image_root (COCO: train2017/ vs val2017/)
    # Open-vocabulary split: "coco_ovd_48_17", "lvis_rare", or a YAML/JSON file {base: [...], novel: [...]}.
    split: str = ""
    # Evaluate val with the LVIS API (None: detect from the annotation file).
    lvis: bool | None = None
    # Web-domain image/caption records (the tiny CLIP's pre-training data; mini-world only).
    web_train_json: str = ""
    web_val_json: str = ""
    web_image_root: str = ""


@dataclass
class ClipConfig:
    # open_clip model name (ViT-B-32), or "local-dir:FOLDER" / a folder with open_clip_config.json.
    model: str = "ViT-B-32"
    # Pretrained tag ("openai") or a local checkpoint file; "" = random init (tests only).
    pretrained: str = ""
    # Prompt templates, averaged per class name ("{}" is replaced by the name).
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    # None: download allowed unless HF_HUB_OFFLINE is set.
    allow_download: bool | None = None
    batch_size: int = lim(256, ge=1)
    device: str = "cpu"
    # fp32 | bf16: autocast dtype of the image tower when embedding crops (mine, extract, eval);
    # part of the CLIP fingerprint, so caches made at one precision are not read at the other
    precision: str = "fp32"
    # Stored vocabulary (ovd.vlm.clip.save_text_embeddings): train/test read class text embeddings
    # from this file instead of running the text tower; "" = encode with the CLIP above.
    text_embeddings: str = ""


@dataclass
class PretrainConfig:
    # Tiny open_clip CLIP for the mini-world, trained with open_clip's ClipLoss on the web domain.
    out: str = "${work_dir}/tiny_clip"
    embed_dim: int = lim(128, ge=1)
    image_size: int = lim(32, ge=1)
    patch_size: int = lim(8, ge=1)
    vision_width: int = lim(128, ge=1)
    vision_layers: int = lim(4, ge=1)
    vision_head_width: int = lim(32, ge=1)
    text_width: int = lim(128, ge=1)
    text_layers: int = lim(3, ge=1)
    text_heads: int = lim(4, ge=1)
    context_length: int = lim(16, ge=3)  # start + end tokens and at least one word
    epochs: int = lim(6, ge=1)
    batch_size: int = lim(128, ge=2)  # a contrastive batch needs two pairs
    lr: float = lim(1.0e-3, gt=0)
    weight_decay: float = lim(0.1, ge=0)
    warmup_steps: int = lim(50, ge=0)
    threads: int = lim(0, ge=0)  # 0: torch default


@dataclass
class AdapterConfig:
    # EZSD adapter: fine-tune only the image tower's LayerNorm weight/bias on base-class GT crops.
    enabled: bool = True
    out: str = "${work_dir}/clip_adapter.safetensors"
    epochs: int = lim(3, ge=1)
    batch_size: int = lim(64, ge=1)
    lr: float = lim(1.0e-4, gt=0)
    weight_decay: float = lim(0.0, ge=0)
    max_crops: int = lim(0, ge=0)  # 0: every base GT box of the train split
    hflip: bool = True
    # EZSD-faithful options (docs/mini_world.md "EZSD-faithful options"): also tune the text tower's
    # LayerNorms (every later text embedding then comes from the adapted tower), and EZSD's loss:
    # softmax: cross-entropy at the CLIP's logit scale | sigmoid: per-class BCE on 100 * cos
    text_tower: bool = False
    loss: str = "softmax"


@dataclass
class MinerConfig:
    # EZSD proposal miner: dense anchors scored by CLIP against base + novel names.
    enabled: bool = True
    # `ovd mine` writes a proposal store folder here (chunks + index, like the feature cache);
    # `ovd extract` also accepts a JSON list of {image_id, bbox, weight} (a file) for external proposals
    out: str = "${work_dir}/proposals"
    # images per chunk (dataset order): the unit of work, resumption and --shard / torchrun splitting
    chunk_size: int = lim(64, ge=1)
    stride: int = lim(32, ge=1)
    scales: list[float] = lim([float(s) for s in range(1, 17)], gt=0)
    ratios: list[float] = lim([0.5, 1.0, 2.0], gt=0)
    min_size: float = lim(4.0, ge=0)
    objectness: str = "entropy"  # entropy (log C - H(p)) | max_prob
    vocabulary: str = "all"  # all: base + novel names | base: base names only (the base-biased ablation)
    nms_thr: float = lim(0.7, ge=0, le=1)
    base_iou_thr: float = lim(0.5, ge=0, le=1)  # candidates overlapping a base GT box above this are dropped
    topk: int = lim(200, ge=1)
    batch_size: int = lim(256, ge=1)
    external_proposals: str = ""  # optional JSON list of {image_id, bbox xywh} added to the anchors
    # Names of "stuff" that is not an object (e.g. "striped pattern"): scored with the class names,
    # a crop that looks most like one of them gets low objectness. Empty: EZSD's class names only.
    background_prompts: list[str] = field(default_factory=list)
    # DataLoader worker processes decoding images and cutting their candidate crops; 0 = in the
    # main process, as the CLIP forward. Affects speed only, never a result (docs/data_loading.md).
    workers: int = lim(0, ge=0)
    # EZSD: after the NMS, drop the proposals whose best class is a base class (its miner keeps
    # only likely-novel regions); needs miner.vocabulary=all
    drop_base_argmax: bool = False


@dataclass
class ExtractConfig:
    # Feature cache of CLIP embeddings for GT boxes + mined proposals (safetensors chunks + index).
    out: str = "${work_dir}/feature_cache"
    chunk_size: int = lim(64, ge=1)
    dtype: str = "float16"
    include_gt: bool = True
    # with miner.enabled=false: this many random dense-anchor boxes per image instead (ViLD-style
    # base-biased targets for the ablation); 0 = GT boxes only
    random_boxes: int = lim(0, ge=0)
    # DataLoader worker processes decoding images and cutting their box crops; 0 = in the main
    # process, as the CLIP forward. Affects speed only, never a result (docs/data_loading.md).
    workers: int = lim(0, ge=0)


@dataclass
class ModelConfig:
    # Open-vocabulary Faster R-CNN (ovd/modeling). Each card component can be switched off for ablations.
    # resnet50_fpn | resnet18_fpn_small | resnet18_fpn_narrow | mobilenet_v3_large_fpn (ovd/modeling/backbones.py)
    backbone: str = "resnet50_fpn"
    # "imagenet": torchvision's ImageNet weights (hub cache / download); or a local file
    # (.safetensors / .pth state dict); "" = random init
    backbone_weights: str = ""
    trainable_layers: int = lim(3, ge=0, le=5)
    # frozen_bn: torchvision's frozen ImageNet statistics | bn: trained BatchNorm (backbones from scratch)
    norm: str = "frozen_bn"
    fpn_channels: int = lim(256, ge=1)
    min_size: int = lim(800, ge=1)
    max_size: int = lim(1333, ge=1)
    semantic_regression: bool = True
    distill: bool = True
    distill_weight: float = lim(1.0, ge=0)
    box_score_thresh: float = lim(0.05, ge=0, le=1)
    box_detections_per_img: int = lim(100, ge=1)
    representation_size: int = lim(1024, ge=1)  # width of the two-layer box head
    box_batch_size_per_image: int = lim(512, ge=1)  # sampled RoIs per image in training
    rpn_post_nms_top_n_train: int = lim(2000, ge=1)
    rpn_post_nms_top_n_test: int = lim(1000, ge=1)
    # class-agnostic mask branch (torchvision's Mask R-CNN mask head, one output channel): trained on
    # the base classes' GT masks, a mask for every detection whatever its class. Off: boxes only.
    mask_head: bool = False
    # width of the mask head's four 3 x 3 convolutions and its deconvolution (torchvision's: 256); the
    # head runs on every detection at inference, so on CPU its width is most of the mask branch's cost
    mask_channels: int = lim(256, ge=1)
    # Classifier (EZSD's code: an unnormalised learned background vector, temperature from 100):
    # true: the background vector is scored as a unit vector | false: by its learnt length too
    background_unit: bool = True
    init_logit_scale: float = lim(1 / 0.07, gt=0, le=100)  # the classifier's temperature at start


@dataclass
class TrainConfig:
    out: str = "${work_dir}/train"
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = lim(0.02, gt=0)
    momentum: float = lim(0.9, ge=0, lt=1)
    weight_decay: float = lim(1.0e-4, ge=0)
    batch_size: int = lim(8, ge=1)
    # Named lengths: "1x" = 12 epochs with lr steps after 8 and 11 (x N for "Nx"); "" uses epochs.
    schedule: str = "1x"
    epochs: int = 12  # >= 1 when schedule is "" (checked in validate_config)
    lr_steps: list[int] = lim([8, 11], ge=0)
    warmup_iters: int = lim(100, ge=0)
    grad_clip: float = lim(0.0, ge=0)  # max gradient norm; 0 = off
    checkpoint_every: int = lim(50, ge=1)  # iterations
    hflip: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: bool = True  # float16 autocast + grad scaling on CUDA; ignored on CPU
    eval_every: int = lim(0, ge=0)  # iterations between val evaluations (train.out/eval.jsonl); 0 = off
    # Stop this run once the iteration counter reaches max_iters (a checkpoint is written there; a
    # later run with a larger value, or 0, resumes). The schedule stays that of the full run.
    # 0 = run the whole schedule.
    max_iters: int = lim(0, ge=0)
    # A new run that starts from a trained detector's weights (not a resume: fresh optimizer,
    # schedule and iteration 0). Its architecture settings must match this config's.
    init_from: str = ""
    # Parameter-name prefixes to freeze (requires_grad off), e.g. ["backbone.", "rpn."]. An unmatched
    # prefix is an error. BatchNorm statistics of trained-BN layers still update (use model.norm).
    freeze: list[str] = field(default_factory=list)
    # DataLoader worker processes decoding images and reading their cached distillation rows;
    # 0 = in the main process. Affects speed only, never a result (docs/data_loading.md).
    workers: int = lim(0, ge=0)


@dataclass
class TestConfig:
    # Evaluation (`ovd test`, the periodic evaluation during training, the few-shot measurements).
    # DataLoader worker processes decoding and preparing images; 0 = in the main process.
    # Affects speed only, never a result (docs/data_loading.md).
    workers: int = lim(0, ge=0)
    # images per detector forward; 1 gives the numbers of one-image inference, larger batches are
    # padded together (torchvision's batching) and may move scores in their last digits
    batch_size: int = lim(1, ge=1)


@dataclass
class ReplayConfig:
    # Data-free few-shot replay (NIFF-style; docs/replay.md): `ovd replay stats` (class-wise RoI
    # statistics of the base model), `ovd replay fit` (generator of base RoI features), `ovd fewshot`.
    stats: str = "${work_dir}/replay/stats.safetensors"
    generator: str = "${work_dir}/replay/generator.safetensors"
    fewshot_out: str = "${work_dir}/fewshot"  # runs: <fewshot_out>/<mode>_<K>shot_seed<S>/
    fewshot_dir: str = ""  # folder of <K>shot_seed<S>.json; "" = <folder of data.train_json>/fewshot
    # generator: noise -> shared trunk -> one light head per base class + background -> (C, 7, 7)
    # 64 / 16 / 800: 110,752 parameters (0.47 MB), statistics matched as well as 256 / 32 / 200 (0.53 M
    # parameters, 2.2 MB) and the memory ratio on the bench world under 1 % (docs/replay.md)
    noise_dim: int = lim(64, ge=1)
    hidden: int = lim(64, ge=1)
    trunk_channels: int = lim(16, ge=1)
    fit_iters: int = lim(800, ge=1)
    fit_batch_per_class: int = lim(8, ge=2)  # a class's variance needs two samples
    fit_lr: float = lim(5.0e-3, gt=0)
    stat_weight: float = lim(1.0, ge=0)
    ce_weight: float = lim(2.0, ge=0)
    diversity_weight: float = lim(1.0, ge=0)
    # few-shot fine-tuning: every heldout_every-th novel class (in category order, from the 2nd) gets
    # no boxes and is measured zero-shot afterwards; 0 = every novel class gets its K shots
    heldout_every: int = lim(2, ge=0)
    # put the held-out names in the fine-tuning vocabulary (they then meet the cross-entropy as
    # negatives of every RoI); off by default, measured in docs/replay.md
    heldout_in_vocabulary: bool = False
    iters: int = lim(100, ge=1)
    lr: float = lim(3.0e-4, gt=0)  # lr x iters chosen on the bench world, K=5 (docs/replay.md, the sweep)
    batch_size: int = lim(4, ge=1)
    warmup_iters: int = lim(10, ge=0)
    checkpoint_every: int = lim(50, ge=1)  # last.pt every so many steps: a killed run resumes exactly
    freeze: list[str] = field(default_factory=lambda: ["backbone.", "rpn."])
    replay_rois: int = lim(64, ge=1)  # forged RoIs per step (mode replay)
    replay_background: float = lim(0.25, ge=0, lt=1)  # their share labelled background
    teacher_weight: float = lim(1.0, ge=0)
    # which teacher outputs the forged RoIs are distilled to (docs/replay.md measures each one's share)
    teacher_terms: list[str] = field(default_factory=lambda: list(TEACHER_TERMS))


@dataclass
class StudentConfig:
    # A smaller detector distilled from a trained one (`ovd student CONFIG --teacher CKPT`,
    # docs/student.md). Its architecture: the `model` section with these keys replaced (any
    # model.* key, e.g. {backbone: ..., fpn_channels: 32}); its schedule: the `train` section.
    out: str = "${work_dir}/student"
    teacher: str = ""  # the teacher checkpoint (--teacher)
    model: dict = field(default_factory=lambda: {"backbone": "mobilenet_v3_large_fpn"})
    # losses (docs/student.md): FPN feature imitation (mean squared error relative to the teacher
    # level's mean square, 1x1 adapters where the channels differ); L1 of the region embeddings to the
    # teacher's on the student's sampled RoIs (summed over the dims, like model.distill_weight's);
    # optionally the teacher's logits and box deltas on the same RoIs (0 = off). Not tuned.
    feature_weight: float = lim(1.0, ge=0)
    embedding_weight: float = lim(1.0, ge=0)
    logits_weight: float = lim(0.0, ge=0)
    deltas_weight: float = lim(0.0, ge=0)
    # IKD sample-specific (frequency) augmentation; the numbers are the released code's
    frequency_aug: bool = False
    frequency_prob: float = lim(0.3, ge=0, le=1)  # noise copy of an image whose GT boxes are all small
    small_side: float = lim(32.0, gt=0)  # "small": box area below small_side ** 2 pixels
    noise_sigma: float = lim(0.08, ge=0)  # on the [0, 1] pixel scale (imagecorruptions severity 1)
    crop_min: float = lim(0.8, gt=0, le=1)  # adaptive crop: 0.8-1.0 of each side
    # IKD adversarial feature augmentation: DI-FGSM images against the teacher, either made on the fly
    # for every batch (step: 5 teacher forward + backward passes per step) or once per training image
    # before training and kept on disk (cache: the released code's way; shared by every student of
    # the same teacher, attack and seed), see ovd/student/adversarial_cache.py
    adversarial_aug: bool = False
    adversarial_source: str = "step"
    adversarial_cache_dir: str = "${work_dir}/adversarial"
    adversarial_eps: float = lim(8.0, gt=0)  # in 1/255 of the [0, 1] pixel range
    adversarial_step: float = lim(2.0, gt=0)  # in 1/255
    adversarial_steps: int = lim(5, ge=1)
    adversarial_decay: float = lim(1.0, ge=0)  # momentum of the L1-normalised gradient
    adversarial_resize_rate: float = lim(0.9, gt=0, le=1)  # input diversity: shrink to 0.9-1.0
    adversarial_diversity_prob: float = lim(0.5, ge=0, le=1)
    adversarial_weight: float = lim(0.1, ge=0)  # feature imitation on the adversarial images


@dataclass
class Config:
    name: str = "ovd"
    work_dir: str = "work_dirs/${name}"
    seed: int = lim(0, ge=0)
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    student: StudentConfig = field(default_factory=StudentConfig)


# --- validation -----------------------------------------------------------------------------------
def template_problem(templates) -> str | None:
    """What is wrong with a list of prompt templates (None: nothing): at least one, each a string
    holding exactly one ``{}`` for the class name, no other braces, none given twice. Without a
    ``{}`` every class gets the same text; the config loader and ``--template`` both ask this."""
    templates = list(templates or [])
    if not templates:
        return "no prompt templates: give at least one, e.g. 'a photo of a {}.'"
    for t in templates:
        if not isinstance(t, str) or t.count("{}") != 1:
            return f"prompt template {t!r} must contain '{{}}' exactly once (where the class name goes)"
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError):
            return f"prompt template {t!r}: other braces than one '{{}}' (write '{{{{' for a brace)"
    dup = sorted({t for t in templates if templates.count(t) > 1})
    return f"prompt template given twice: {dup[0]!r}" if dup else None


def _expected(rng: tuple, integer: bool) -> str:
    ge, gt, le, lt = rng
    kind = "an integer" if integer else "a number"
    if ge is not None and le is not None:
        return f"{kind} in [{ge}, {le}]"
    if ge is not None and lt is not None:
        return f"{kind} in [{ge}, {lt})"
    parts = [f">= {ge}" if ge is not None else "", f"> {gt}" if gt is not None else "",
             f"<= {le}" if le is not None else "", f"< {lt}" if lt is not None else ""]  # fmt: skip
    return f"{kind} " + " and ".join(x for x in parts if x)


def _in_range(v: Any, rng: tuple, integer: bool) -> bool:
    ge, gt, le, lt = rng
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        return False
    if not math.isfinite(v):
        return False
    return not (
        (ge is not None and v < ge) or (gt is not None and v <= gt) or (le is not None and v > le)
        or (lt is not None and v >= lt)
    )  # fmt: skip


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses_MISSING else f.default


def check_values(values: Any, schema: Any, where: str, prefix: str = "", types: bool = False) -> None:
    """Check the keys present in ``values`` (a plain or OmegaConf mapping) against ``schema`` (a
    dataclass type): the range of every :func:`lim` field, and with ``types`` — for plain data such
    as a checkpoint's stored settings; OmegaConf types a config itself — that each value has its
    default's type. Unknown keys pass (the config loader refuses those itself). ``where`` prefixes
    the error ("configs/x.yaml", ...)."""
    for f in fields(schema):
        if f.name not in values:
            continue
        v, key, default = values[f.name], f"{prefix}{f.name}", _default(f)
        if is_dataclass(default):
            if hasattr(v, "keys"):
                check_values(v, type(default), where, f"{key}.", types)
            continue
        integer = isinstance(default, int) and not isinstance(default, bool)
        if not types:
            ok = True
        elif isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(v, int) or not integer)
        elif isinstance(default, str):
            ok = isinstance(v, str)
        else:
            ok = True
        if not ok:
            kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type(default)]
            raise OvdError(f"{where}: '{key}' is {v!r:.60}, expected {kind}")
        rng = f.metadata.get("range")
        if rng is None:
            continue
        if isinstance(default, list):
            items = list(v) if hasattr(v, "__len__") and not isinstance(v, str) else [v]
            elem_int = bool(default) and all(isinstance(x, int) and not isinstance(x, bool) for x in default)
            bad = [x for x in items if not _in_range(x, rng, elem_int)]
            if bad:
                raise OvdError(
                    f"{where}: config key '{key}' holds {bad[0]!r:.40}: every entry must be {_expected(rng, elem_int)}"
                )
        elif not _in_range(v, rng, integer):
            raise OvdError(f"{where}: config key '{key}' is {v!r:.40}: expected {_expected(rng, integer)}")


def validate_config(cfg: Any, schema: Any, source: str) -> None:
    """Every value range of ``schema`` (see :func:`lim`) plus the rules that tie keys together;
    called by :func:`ovd.config.load_config` after overrides, so every command gets them."""
    check_values(cfg, schema, source)
    if schema is not Config:
        return
    t, p = cfg.train, cfg.pretrain
    problem = template_problem(cfg.clip.templates)
    if problem:
        raise OvdError(f"{source}: config key 'clip.templates': {problem}")
    bad = [x for x in cfg.replay.teacher_terms if x not in TEACHER_TERMS]
    if bad:
        raise OvdError(
            f"{source}: config key 'replay.teacher_terms' holds {bad[0]!r:.40}: expected entries from "
            f"{', '.join(TEACHER_TERMS)}"
        )
    if not t.schedule and not (isinstance(t.epochs, int) and t.epochs >= 1):
        raise OvdError(
            f"{source}: config key 'train.epochs' is {t.epochs!r}: expected an integer >= 1 "
            f"(train.schedule is '', so train.epochs sets the length)"
        )
    if p.patch_size > p.image_size:
        raise OvdError(
            f"{source}: config key 'pretrain.patch_size' is {p.patch_size}: expected at most "
            f"pretrain.image_size ({p.image_size})"
        )
    towers = [(p.vision_width, p.vision_width // p.vision_head_width, "vision", "vision_head_width"),
              (p.text_width, p.text_heads, "text", "text_heads")]  # fmt: skip
    for width, heads, what, by in towers:
        if heads < 1 or width % heads:
            raise OvdError(
                f"{source}: config key 'pretrain.{what}_width' is {width}: expected a multiple of the number of "
                f"attention heads ({heads}; set by pretrain.{by})"
            )
