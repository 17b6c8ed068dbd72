"""The detector's training set: images, base-class GT and the cached distillation targets."""

from __future__ import annotations

import torch

from ovd.data.images import load_image
from ovd.data.masks import decode

# target keys of the cached distillation rows, read by the detector's distillation loss: the data
# side defines the format it produces (the model side imports it), so data never imports modeling
DISTILL_BOXES = "distill_boxes"  # (K, 4) xyxy cached boxes, in the image's pixel frame
DISTILL_EMBEDDINGS = "distill_embeddings"  # (K, D) their CLIP embeddings (normalised in the loss)
DISTILL_WEIGHTS = "distill_weights"  # (K,) per-box loss weights
DISTILL_KEYS = (DISTILL_BOXES, DISTILL_EMBEDDINGS, DISTILL_WEIGHTS)


class DetectionTrainSet(torch.utils.data.Dataset):
    """Images + GT of the vocabulary's classes (labels 1..C in vocabulary order) + cached distillation
    boxes/embeddings/weights from a :class:`~ovd.mining.feature_cache.FeatureCache`.

    Map-style: ``data[i]`` or ``data[(i, flip)]`` is ``(image, target)``; the flip is drawn by the
    sampler (:class:`~ovd.data.loader.TrainBatchSampler`), not here, so a sample does not depend on
    which loader worker reads it.

    ``masks``: also each box's instance mask, ``masks`` uint8 (N, H, W) in the image's size and the
    boxes' order (torchvision's Mask R-CNN convention), decoded from the file's segmentations with
    pycocotools. Only then are segmentations read at all: every one is checked here, once, so a bad
    one stops the run before its first step; a box-only run pays nothing for them."""

    def __init__(self, dataset, class_ids: list[int], cache=None, masks: bool = False):
        self.dataset = dataset
        self.index = {c: i + 1 for i, c in enumerate(class_ids)}
        self.cache = cache
        self.masks = bool(masks)
        if self.masks:
            dataset.check_segmentations(cat_ids=set(class_ids))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, bool]) -> tuple[torch.Tensor, dict]:
        i, flip = key if isinstance(key, tuple) else (key, False)
        return self.get(int(i), bool(flip))

    def get(self, i: int, flip: bool = False) -> tuple[torch.Tensor, dict]:
        rec = self.dataset.record(i)
        image = load_image(rec["path"])
        keep = [j for j, c in enumerate(rec["labels"]) if c in self.index]
        t = {
            "boxes": torch.tensor([rec["boxes"][j] for j in keep], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.index[rec["labels"][j]] for j in keep], dtype=torch.int64),
            "image_id": rec["image_id"],
        }
        if self.masks:
            h, w = image.shape[-2:]
            m = [torch.from_numpy(decode(rec["segmentations"][j], h, w)) for j in keep]
            t["masks"] = torch.stack(m) if m else torch.zeros((0, h, w), dtype=torch.uint8)
        if self.cache is not None:
            c = self.cache.get(rec["image_id"])
            t[DISTILL_BOXES], t[DISTILL_EMBEDDINGS], t[DISTILL_WEIGHTS] = (
                c["boxes"],
                c["embeddings"],
                c["weights"],
            )
        if flip:
            w = image.shape[-1]
            image = image.flip(-1)
            if "masks" in t:
                t["masks"] = t["masks"].flip(-1)
            for k in ("boxes", DISTILL_BOXES):
                if k in t and len(t[k]):
                    b = t[k].clone()
                    b[:, [0, 2]] = w - t[k][:, [2, 0]]
                    t[k] = b
        return image, t
