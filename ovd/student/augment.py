"""IKD's two input augmentations for distillation ("Inconsistent Knowledge Distillation", ACM MM 2023).

Both give teacher and student an input on which the teacher's response differs from what the
labels say, so that the student learns the teacher's way of seeing, not only the labels:

* :class:`FrequencyAug` — the sample-specific augmentation. The paper frames it in the frequency
  domain: transfer the teacher's response to the high-frequency components of an image, which a
  detector relies on most for small objects. The released code (MMDetection pipeline steps
  ``InstanceAug`` + adaptive ``RandomCrop`` of its IKD configs) realises it as: with probability
  0.3, an image whose GT boxes are *all* small (area < 32², COCO's "small") is replaced by a copy
  corrupted with Gaussian noise (``imagecorruptions`` ``gaussian_noise`` severity 1, sigma 0.08 on
  the [0, 1] scale) — white noise has a flat spectrum while natural images fall off as 1/f, so the
  copy differs from the original above all in its high frequencies; every other image (at least one
  box not small) gets a random crop of 0.8-1.0 of its height and width. We follow the code in each of
  these numbers; differences: "small" is measured in the image as loaded (the code measures the
  noise rule before and the crop rule after its resize), and a crop that would cut away every box
  is drawn again (up to 10 times, then the image stays uncropped) where MMDetection drops the image.
* :func:`difgsm` — adversarial images against the teacher (DI-FGSM, "Improving Transferability of
  Adversarial Examples with Input Diversity"; the code's ``tools/adversarial/difgsm.py`` with its
  ``ta_GT.py`` settings): ``steps`` (5) signed-gradient steps of size ``alpha`` (2/255) that raise
  the teacher's classification losses on the GT boxes, momentum ``decay`` 1.0 on the L1-normalised
  gradient, input diversity (with probability 0.5 the teacher sees the image shrunk to a random
  90-100 % and zero-padded back to its size), the perturbation kept within ``eps`` (8/255) of the
  input. Pixel scale: ovd's images are [0, 1] floats, so the code's 8 and 2 (in /255 units of the
  image's range) become 8/255 and 2/255, and the result is clamped to [0, 1] (the code clamps to
  each channel's own min / max). Unlike the code, the GT boxes follow the diversity resize (the
  code scores the shrunk image against the unshrunk boxes).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ovd.modeling.distillation import DISTILL_KEYS

BOX_KEYS = ("boxes",)  # box-aligned keys of a training target besides the distillation ones


def _box_area(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


class FrequencyAug:
    """IKD's sample-specific augmentation (see the module docstring): noise copy of an all-small-box
    image with probability ``prob``, adaptive random crop of the others.

    ``__call__(images, targets, generator)`` changes the two lists in place (a training batch as the
    :class:`~ovd.engine.trainer.Trainer` hands it to its input hooks) and returns, per image, what
    was done: ``"noise"``, ``"crop"`` or ``""``. All random draws come from ``generator``.
    """

    def __init__(self, prob: float = 0.3, small_side: float = 32.0, sigma: float = 0.08, crop_min: float = 0.8,
                 tries: int = 10):  # fmt: skip
        self.prob, self.small_area, self.sigma, self.crop_min, self.tries = prob, small_side**2, sigma, crop_min, tries

    def all_small(self, target: dict) -> bool:
        """True when every GT box is small (also when there is none: the code's rule)."""
        return bool((_box_area(target["boxes"]) < self.small_area).all())

    def noise(self, image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n = torch.randn(image.shape, generator=g).to(image)
        return (image + self.sigma * n).clamp(0, 1)

    def crop_window(self, h: int, w: int, target: dict, g: torch.Generator) -> tuple[int, int, int, int] | None:
        """(top, left, height, width) of a random crop of ``crop_min``-1.0 of each side that keeps at
        least one GT box (with positive area after clipping); None when ``tries`` draws fail."""
        boxes = target["boxes"]
        for _ in range(self.tries):
            u = torch.rand(4, generator=g).tolist()
            ch = max(1, int(h * (self.crop_min + (1 - self.crop_min) * u[0])))
            cw = max(1, int(w * (self.crop_min + (1 - self.crop_min) * u[1])))
            top, left = int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1))
            top, left = min(top, h - ch), min(left, w - cw)
            kept = _clip(boxes, top, left, ch, cw)
            if len(boxes) == 0 or bool((_box_area(kept) > 0).any()):
                return top, left, ch, cw
        return None

    def crop(self, image: torch.Tensor, target: dict, window) -> tuple[torch.Tensor, dict]:
        top, left, ch, cw = window
        out = dict(target)
        for key in BOX_KEYS + (DISTILL_KEYS[0],):
            if key not in target:
                continue
            b = _clip(target[key], top, left, ch, cw)
            keep = _box_area(b) > 0
            out[key] = b[keep]
            # the rows that travel with the boxes: labels with GT boxes, embeddings / weights with
            # the cached distillation boxes
            for other in ("labels",) if key == "boxes" else DISTILL_KEYS[1:]:
                if other in target:
                    out[other] = target[other][keep]
        return image[:, top : top + ch, left : left + cw], out

    def __call__(self, images: list, targets: list, g: torch.Generator) -> list[str]:
        done = []
        for i, (image, target) in enumerate(zip(images, targets)):
            u = float(torch.rand(1, generator=g))  # drawn for every image: later draws do not shift
            if self.all_small(target):
                if u < self.prob:
                    images[i] = self.noise(image, g)
                    done.append("noise")
                else:
                    done.append("")
                continue
            window = self.crop_window(image.shape[-2], image.shape[-1], target, g)
            if window is None:
                done.append("")
                continue
            images[i], targets[i] = self.crop(image, target, window)
            done.append("crop")
        return done


def _clip(boxes: torch.Tensor, top: int, left: int, h: int, w: int) -> torch.Tensor:
    """xyxy ``boxes`` in the frame of the crop window (top, left, h, w), clipped to it."""
    if len(boxes) == 0:
        return boxes.reshape(-1, 4)
    b = boxes - boxes.new_tensor([left, top, left, top])
    return torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], dim=1)


@contextlib.contextmanager
def loss_mode(model: nn.Module):
    """A frozen detector that returns its training losses (torchvision computes them only in train
    mode) while its normalisation layers keep their statistics (BatchNorm in eval mode)."""
    was = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    try:
        yield model
    finally:
        model.train(was)


def input_diversity(x: torch.Tensor, target: dict, resize_rate: float, prob: float, g: torch.Generator):
    """DI-FGSM's input transform for one (3, H, W) image: with probability ``prob``, shrink to a random
    ``resize_rate``-1.0 of its size and zero-pad back to (H, W) at a random offset; the target's GT
    boxes follow (returns a new target dict)."""
    h, w = x.shape[-2:]
    u = torch.rand(4, generator=g).tolist()
    if u[0] >= prob:
        return x, target
    s = resize_rate + (1 - resize_rate) * u[1]
    nh, nw = max(1, int(h * s)), max(1, int(w * s))
    top, left = int(u[2] * (h - nh + 1)), int(u[3] * (w - nw + 1))
    top, left = min(top, h - nh), min(left, w - nw)
    small = F.interpolate(x[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    out = F.pad(small, [left, w - nw - left, top, h - nh - top], value=0.0)
    t = dict(target)
    t["boxes"] = target["boxes"] * target["boxes"].new_tensor([nw / w, nh / h, nw / w, nh / h]) + target[
        "boxes"
    ].new_tensor([left, top, left, top])
    return out, t


def classification_loss(losses: dict) -> torch.Tensor:
    """The terms DI-FGSM raises: the teacher's classification losses (RoI classifier + RPN objectness;
    the code sums every loss with "cls" in its name, i.e. these two for a two-stage detector)."""
    return losses["loss_classifier"] + losses["loss_objectness"]


def difgsm(teacher: nn.Module, images: list, targets: list, g: torch.Generator, eps: float = 8 / 255,
           alpha: float = 2 / 255, steps: int = 5, decay: float = 1.0, resize_rate: float = 0.9,
           diversity_prob: float = 0.5) -> list[torch.Tensor]:  # fmt: skip
    """Adversarial copies of ``images`` ((3, H, W) in [0, 1]) against the frozen ``teacher``'s
    classification losses on ``targets`` (GT ``boxes`` / ``labels`` in the teacher's vocabulary);
    every pixel stays within ``eps`` of the input and in [0, 1]. The teacher's sampled RoIs draw from
    torch's global generator, so the call runs under a forked generator seeded from ``g``: the
    caller's random stream is untouched and the result is a function of ``g``'s state."""
    clean = [x.detach() for x in images]
    gt = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]  # no distillation rows
    adv = [x.clone() for x in clean]
    momentum = [torch.zeros_like(x) for x in clean]
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    devices = [x.device for x in clean if x.device.type == "cuda"]
    with torch.random.fork_rng(devices=sorted(set(devices), key=str)), loss_mode(teacher), torch.enable_grad():
        torch.manual_seed(seed)
        for _ in range(steps):
            leaves = [x.clone().requires_grad_(True) for x in adv]
            seen = [input_diversity(x, t, resize_rate, diversity_prob, g) for x, t in zip(leaves, gt)]
            loss = classification_loss(teacher([s[0] for s in seen], [s[1] for s in seen]))
            grads = torch.autograd.grad(loss, leaves)
            for k, (x, gr) in enumerate(zip(adv, grads)):
                gr = gr / gr.abs().sum().clamp(min=1e-12)  # the code's L1 normalisation per image
                momentum[k] = gr + decay * momentum[k]
                step = x + alpha * momentum[k].sign()
                adv[k] = (clean[k] + (step - clean[k]).clamp(-eps, eps)).clamp(0, 1).detach()
    return adv


def attack_settings(s) -> dict:
    """:func:`difgsm`'s keyword arguments from the ``student`` config section (eps and step in 1/255)."""
    return {"eps": s.adversarial_eps / 255, "alpha": s.adversarial_step / 255, "steps": s.adversarial_steps,
            "decay": s.adversarial_decay, "resize_rate": s.adversarial_resize_rate,
            "diversity_prob": s.adversarial_diversity_prob}  # fmt: skip
