"""The schema of every config key ovd accepts (defaults included).

A YAML file or a ``key=value`` override naming a key that is not here is an error, so a typo never
silently falls back to a default. Sections grow with the pipeline stages that read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WorldConfig:
    # The generated mini-world (``ovd data mini``): where it lives and how it is made.
    dir: str = ""
    preset: str = "smoke"
    seed: int = 0
    # shapes whose classes are all novel in a second split (split_heldout_<shapes>.json and
    # det/train_heldout_<shapes>.json, ``ovd data mini-split``); [] = only the standard split
    heldout_shapes: list[str] = field(default_factory=list)


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
    batch_size: int = 256
    device: str = "cpu"
    # Stored vocabulary (ovd.vlm.clip.save_text_embeddings): train/test read class text embeddings
    # from this file instead of running the text tower; "" = encode with the CLIP above.
    text_embeddings: str = ""


@dataclass
class PretrainConfig:
    # Tiny open_clip CLIP for the mini-world, trained with open_clip's ClipLoss on the web domain.
    out: str = "${work_dir}/tiny_clip"
    embed_dim: int = 128
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 3
    text_heads: int = 4
    context_length: int = 16
    epochs: int = 6
    batch_size: int = 128
    lr: float = 1.0e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    threads: int = 0  # 0: torch default


@dataclass
class AdapterConfig:
    # EZSD adapter: fine-tune only the image tower's LayerNorm weight/bias on base-class GT crops.
    enabled: bool = True
    out: str = "${work_dir}/clip_adapter.safetensors"
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    max_crops: int = 0  # 0: every base GT box of the train split
    hflip: bool = True


@dataclass
class MinerConfig:
    # EZSD proposal miner: dense anchors scored by CLIP against base + novel names.
    enabled: bool = True
    out: str = "${work_dir}/proposals.json"
    stride: int = 32
    scales: list[float] = field(default_factory=lambda: [float(s) for s in range(1, 17)])
    ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    min_size: float = 4.0
    objectness: str = "entropy"  # entropy (log C - H(p)) | max_prob
    vocabulary: str = "all"  # all: base + novel names | base: base names only (the base-biased ablation)
    nms_thr: float = 0.7
    base_iou_thr: float = 0.5  # candidates overlapping a base GT box above this are dropped
    topk: int = 200
    batch_size: int = 256
    external_proposals: str = ""  # optional JSON list of {image_id, bbox xywh} added to the anchors
    # Names of "stuff" that is not an object (e.g. "striped pattern"): scored with the class names,
    # a crop that looks most like one of them gets low objectness. Empty: EZSD's class names only.
    background_prompts: list[str] = field(default_factory=list)


@dataclass
class ExtractConfig:
    # Feature cache of CLIP embeddings for GT boxes + mined proposals (safetensors chunks + index).
    out: str = "${work_dir}/feature_cache"
    chunk_size: int = 64
    dtype: str = "float16"
    include_gt: bool = True
    # with miner.enabled=false: this many random dense-anchor boxes per image instead (ViLD-style
    # base-biased targets for the ablation); 0 = GT boxes only
    random_boxes: int = 0


@dataclass
class ModelConfig:
    # Open-vocabulary Faster R-CNN (ovd/modeling). Each card component can be switched off for ablations.
    backbone: str = "resnet50_fpn"  # resnet50_fpn | resnet18_fpn_small
    # "imagenet": torchvision's ImageNet weights (hub cache / download); or a local file
    # (.safetensors / .pth state dict); "" = random init
    backbone_weights: str = ""
    trainable_layers: int = 3
    # frozen_bn: torchvision's frozen ImageNet statistics | bn: trained BatchNorm (backbones from scratch)
    norm: str = "frozen_bn"
    fpn_channels: int = 256
    min_size: int = 800
    max_size: int = 1333
    semantic_regression: bool = True
    distill: bool = True
    distill_weight: float = 1.0
    box_score_thresh: float = 0.05
    box_detections_per_img: int = 100
    representation_size: int = 1024  # width of the two-layer box head
    box_batch_size_per_image: int = 512  # sampled RoIs per image in training
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000


@dataclass
class TrainConfig:
    out: str = "${work_dir}/train"
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    batch_size: int = 8
    # Named lengths: "1x" = 12 epochs with lr steps after 8 and 11 (x N for "Nx"); "" uses epochs.
    schedule: str = "1x"
    epochs: int = 12
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    warmup_iters: int = 100
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    checkpoint_every: int = 50  # iterations
    hflip: bool = True
    device: str = "auto"  # auto: cuda when available, else cpu
    amp: bool = True  # float16 autocast + grad scaling on CUDA; ignored on CPU
    eval_every: int = 0  # iterations between val evaluations (train.out/eval.jsonl); 0 = off


@dataclass
class Config:
    name: str = "ovd"
    work_dir: str = "work_dirs/${name}"
    seed: int = 0
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
