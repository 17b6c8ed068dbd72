"""The schema of every config key ovd accepts (defaults included).

A YAML file or a ``key=value`` override naming a key that is not here is an error, so a typo never
silently falls back to a default. Sections grow with the pipeline stages that read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # COCO- or LVIS-format annotation files; image paths are ``image_root / file_name``.
    train_json: str = ""
    val_json: str = ""
    image_root: str = ""
    # Open-vocabulary split: "coco_ovd_48_17", "lvis_rare", or a YAML/JSON file {base: [...], novel: [...]}.
    split: str = ""
    # Evaluate val with the LVIS API (None: detect from the annotation file).
    lvis: bool | None = None


@dataclass
class Config:
    name: str = "ovd"
    work_dir: str = "work_dirs/${name}"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
