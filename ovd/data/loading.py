"""The dataset a command works on, loaded from the config with its open-vocabulary split resolved.

Every command that reads ``data.train_json`` or ``data.val_json`` together with ``data.split``
(train, the periodic eval, test, mine, extract, adapt, vlm eval) starts with the same steps:
refuse a missing split before any slow work, load and check the annotation file (and every image's
header), resolve the split against the file's categories. They live here, once.
"""

from __future__ import annotations

from ovd.data.coco import DetectionDataset, load_detection_dataset
from ovd.data.splits import Split, resolve_split
from ovd.errors import OvdError

PARTS = ("train", "val")


def load_split_dataset(
    data_cfg,
    part: str = "train",
    *,
    need_split: str | None = None,
    why: str = "",
    as_ground_truth: bool | None = None,
    check_images: bool = True,
) -> tuple[DetectionDataset, Split | None]:
    """Load ``data_cfg``'s train or val annotation file and resolve ``data_cfg.split`` against it.

    ``data_cfg``: the config's ``data`` section (``train_json``, ``val_json``, ``image_root``,
    ``val_image_root``, ``split``, ``lvis``).

    ``part``: ``"train"`` reads ``train_json`` with images under ``image_root``; ``"val"`` reads
    ``val_json`` with images under ``val_image_root``, else ``image_root``.

    ``need_split``: the command's name (``"train"``, ``"test"``, ``"mine"`` …) when it cannot run
    without a split: an empty ``data.split`` is then refused *before* anything is read, with
    "<need_split> needs data.split: <why>". Without it an empty ``data.split`` gives
    ``(dataset, None)``, so pass it wherever the caller goes on to use the split.

    ``as_ground_truth`` (default: ``part == "val"``): read the file as evaluation ground truth,
    exactly as written — the LVIS API per ``data.lvis``, degenerate boxes kept (so metrics equal the
    official APIs'). ``False``: read it for learning from its boxes (training, mining, cropping) —
    format detected from the file, degenerate boxes skipped with one warning. ``vlm eval`` crops
    the val set's boxes, so it passes ``part="val", as_ground_truth=False``.

    ``check_images``: open every image's header now (:func:`ovd.data.images.check_image_files`), so
    a missing or corrupt image stops the run at its start.

    The trainer's three call sites map to: training set ``load_split_dataset(cfg.data,
    need_split="train", why=...)``; the periodic-eval and ``ovd test`` val sets
    ``load_split_dataset(cfg.data, "val", need_split=...)``.
    """
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if need_split and not data_cfg.split:
        raise OvdError(f"{need_split} needs data.split" + (f": {why}" if why else ""))
    if as_ground_truth is None:
        as_ground_truth = part == "val"
    if part == "train":
        path, root = data_cfg.train_json, data_cfg.image_root
    else:
        path, root = data_cfg.val_json, data_cfg.val_image_root or data_cfg.image_root
    dataset = load_detection_dataset(
        path,
        root or None,
        lvis=data_cfg.lvis if as_ground_truth else None,
        drop_degenerate=not as_ground_truth,
        check_images=check_images,
    )
    if not data_cfg.split:
        return dataset, None
    return dataset, resolve_split(data_cfg.split, dataset.categories, source=str(dataset.path))
