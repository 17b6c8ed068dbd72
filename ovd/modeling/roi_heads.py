"""Open-vocabulary RoI heads (EZSD): torchvision's ``RoIHeads`` with the card's three changes.

* classification: region embedding (CLIP dimension) → :class:`ZeroShotClassifier` (cosine vs text
  embeddings of the current vocabulary + a learned background embedding, learnable temperature);
* distillation (:mod:`ovd.modeling.distillation`): weighted L1 between the L2-normalised region
  embeddings of cached boxes (GT boxes and mined proposals) and their L2-normalised CLIP embeddings;
* semantic-aware regression (:mod:`ovd.modeling.semantic_regression`): class-agnostic deltas from the
  box feature concatenated with the text embedding of the assigned class (training) or of the
  predicted class (inference).

Proposal sampling, target assignment, box coding and post-processing are torchvision's own.

The forward pass is split into parts a subclass or a caller can use on their own::

    batch = heads.pool_rois(features, proposals, image_shapes, targets)   # sampling + RoI pooling
    outputs = heads.predict(batch, extra_rois)        # box head → embedding → logits / box deltas
    losses = heads.compute_losses(batch, outputs, targets, extra_rois)    # training
    detections = heads.detections(batch, outputs, image_shapes)           # inference

Two entry points beyond torchvision's:

* ``extra_rois=ExtraRoIs(features, labels, teacher_...)``: RoIs given as already pooled features
  (N, C, 7, 7) with labels in 0..C (0 = background). They enter after RoI pooling, go through the
  same box head, classifier and classification loss as the sampled proposals, and may carry a frozen
  teacher's outputs to distil (data-free replay of forged base-class RoI features). They have no box,
  so they take no part in the box-regression loss.
* ``with heads.observe() as obs: model(images, targets)``: ``obs.records`` receives, per forward, the
  pooled features and the box head's layer activations of the sampled RoIs with their labels (class-
  wise statistics); in eval mode ``observe(sample_in_eval=True)`` records the training-time sampled,
  GT-labelled RoIs instead of the inference proposals (also :meth:`OVRoIHeads.sample_and_observe`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.roi_heads import RoIHeads

from ovd.errors import OvdError
from ovd.modeling.distillation import DISTILL_BOXES, distill_loss, has_distill_targets, teacher_losses
from ovd.modeling.semantic_regression import SemanticBoxRegressor, class_text
from ovd.modeling.zero_shot_classifier import ZeroShotClassifier

__all__ = ["ExtraRoIs", "OVRoIHeads", "RoIBatch", "RoIObserver", "RoIOutputs", "RoIPredictions", "SemanticBoxRegressor"]


@dataclass
class ExtraRoIs:
    """RoIs fed to the RoI head after RoI pooling: features without an image or a box.

    ``features`` (N, C, h, w): pooled like ``box_roi_pool``'s output (C = FPN channels, 7 × 7);
    ``labels`` (N,) int64 in 0..C (0 = background, k = the vocabulary's k-th class), the convention of
    the sampled proposals. They join the classification loss (one cross-entropy over sampled + extra
    RoIs) but not the box-regression loss, which stays normalised by the sampled RoIs alone.

    Teacher targets (optional, for the same N RoIs, e.g. a frozen base model's RoI head run on the
    same features): ``teacher_embeddings`` (N, D) unit region embeddings, ``teacher_logits``
    (N, 1 + C) over the same vocabulary, ``teacher_deltas`` (N, 4) class-agnostic deltas regressed with
    the label's text. Each one given adds a ``loss_teacher_*`` term (see
    :func:`ovd.modeling.distillation.teacher_losses`) weighted by ``teacher_weight``.
    """

    features: torch.Tensor
    labels: torch.Tensor
    teacher_embeddings: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    teacher_deltas: torch.Tensor | None = None
    teacher_weight: float = 1.0

    def __len__(self) -> int:
        return self.features.shape[0]

    def check(self, pooled_shape: tuple | None, num_classes: int) -> None:
        f, lab = self.features, self.labels
        if f.ndim != 4:
            raise OvdError(f"extra RoI features must be pooled (N, C, h, w), got shape {tuple(f.shape)}")
        if pooled_shape is not None and tuple(f.shape[1:]) != tuple(pooled_shape):
            raise OvdError(
                f"extra RoI features of shape {tuple(f.shape[1:])} per RoI do not fit the RoI pooling's "
                f"{tuple(pooled_shape)}"
            )
        if lab.ndim != 1 or lab.shape[0] != f.shape[0] or lab.dtype != torch.int64:
            raise OvdError(
                f"extra RoI labels must be int64 of shape ({f.shape[0]},), got {lab.dtype} {tuple(lab.shape)}"
            )
        if len(lab) and (int(lab.min()) < 0 or int(lab.max()) > num_classes):
            raise OvdError(
                f"extra RoI labels must lie in 0..{num_classes} (0 = background, then the vocabulary), "
                f"got {int(lab.min())}..{int(lab.max())}"
            )


@dataclass
class RoIBatch:
    """The image RoIs of one forward after sampling and pooling (:meth:`OVRoIHeads.pool_rois`).

    ``pooled`` rows are, image after image, the image's proposals (sampled ones in training) followed
    by its cached distillation boxes when distillation is on; ``is_proposal`` marks the proposal rows
    (None: all rows are proposals). ``pooled`` is None when there is no image.
    """

    proposals: list[torch.Tensor]  # per image (P_i, 4) proposal boxes, in the transformed image frame
    pooled: torch.Tensor | None = None  # (P + Q, C, h, w)
    is_proposal: torch.Tensor | None = None  # (P + Q,) bool, or None when Q == 0
    labels: list[torch.Tensor] | None = None  # per image (P_i,) sampled labels (training / sampling)
    regression_targets: list[torch.Tensor] | None = None  # per image (P_i, 4)
    matched_idxs: list[torch.Tensor] | None = None  # per image (P_i,) matched GT index (for labels > 0)
    distill: bool = False  # the cached distillation boxes are among the rows


@dataclass
class RoIPredictions:
    """The RoI head's outputs for a set of RoIs, one row each."""

    box_features: torch.Tensor  # (N, R) box-head output
    embeddings: torch.Tensor  # (N, D) unit region embeddings
    logits: torch.Tensor  # (N, 1 + C), column 0 = background
    deltas: torch.Tensor  # (N, 4) class-agnostic deltas (label text if labelled, else predicted class's)


@dataclass
class RoIOutputs:
    """:meth:`OVRoIHeads.predict`'s result: outputs of the proposals, the distillation boxes and the extra RoIs."""

    rois: RoIPredictions | None = None  # the proposal rows of the RoIBatch (None without images)
    distill_embeddings: torch.Tensor | None = None  # (Q, D) unit embeddings of the cached boxes
    extra: RoIPredictions | None = None  # the ExtraRoIs rows
    activations: dict[str, torch.Tensor] | None = None  # proposal rows' pooled features + box-head layers


@dataclass(eq=False)  # identity: observe() removes exactly its own observer
class RoIObserver:
    """What :meth:`OVRoIHeads.observe` yields: ``records`` receives one dict per observed forward (see there)."""

    callback: Callable[[dict], None] | None = None
    keep: bool = True
    sample_in_eval: bool = False
    subsample: bool = True
    records: list[dict] = field(default_factory=list)

    def add(self, record: dict) -> None:
        if self.callback is not None:
            self.callback(record)
        if self.keep:
            self.records.append(record)


class OVRoIHeads(RoIHeads):
    def __init__(
        self,
        box_roi_pool: nn.Module,
        box_head: nn.Module,
        classifier: ZeroShotClassifier,
        regressor: SemanticBoxRegressor,
        distill_weight: float = 1.0,
        **kwargs,
    ):
        # torchvision's predictor slot is unused: the classifier and regressor replace it.
        super().__init__(box_roi_pool, box_head, nn.Identity(), **kwargs)
        self.classifier = classifier
        self.regressor = regressor
        self.distill_weight = distill_weight
        self._observers: list[RoIObserver] = []  # plain attribute: no state_dict entry

    def _class_text(self, labels: torch.Tensor) -> torch.Tensor:
        """Text embedding per RoI for labels in torchvision convention (0 = background → zeros)."""
        return class_text(self.classifier.text, labels)

    # --- part 1: sampling + RoI pooling ----------------------------------------------------------------
    def sample_rois(self, proposals: list[torch.Tensor], targets: list[dict], subsample: bool = True):
        """Training-time target assignment: GT boxes are added to the proposals, each is matched to a GT
        box (labels 1..C, 0 = background), then torchvision's balanced sampler keeps a fixed-size subset.

        ``subsample=False`` keeps every matched proposal instead (those between the IoU thresholds,
        label -1, are dropped) and draws no random numbers. Returns ``(proposals, matched_idxs, labels,
        regression_targets)``, per image, like torchvision's ``select_training_samples``.
        """
        if subsample:
            return self.select_training_samples(proposals, targets)
        self.check_targets(targets)
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, [t["labels"] for t in targets])
        matched_gt_boxes = []
        for i in range(len(proposals)):
            keep = torch.where(labels[i] >= 0)[0]
            proposals[i], labels[i], matched_idxs[i] = proposals[i][keep], labels[i][keep], matched_idxs[i][keep]
            gt = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(gt[matched_idxs[i]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, matched_idxs, labels, regression_targets

    def pool_rois(self, features, proposals, image_shapes, targets=None) -> RoIBatch:
        """Box features part 1: in training, sample the proposals (:meth:`select_training_samples`) and
        add each image's cached distillation boxes when distillation is on; RoI-pool them all in one pass
        (RoI pooling dominates a CPU training step). In eval, pool the proposals as given."""
        if len(proposals) == 0:
            return RoIBatch(proposals=[])
        labels = regression_targets = matched_idxs = None
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        distill = self.training and self.distill_weight > 0 and has_distill_targets(targets)
        rois, is_proposal = proposals, None
        if distill:
            rois = [torch.cat([p, t[DISTILL_BOXES].to(p.dtype)]) for p, t in zip(proposals, targets)]
            is_proposal = torch.cat([torch.arange(len(r), device=r.device) < len(p) for r, p in zip(rois, proposals)])
        pooled = self.box_roi_pool(features, rois, image_shapes)
        return RoIBatch(proposals, pooled, is_proposal, labels, regression_targets, matched_idxs, distill)

    # --- part 2: box head → embedding → classifier / semantic regression -------------------------------
    def _run_box_head(self, pooled: torch.Tensor, capture: bool):
        if not capture:
            return self.box_head(pooled), None
        acts: dict[str, torch.Tensor] = {}

        def hook(name):
            def store(_module, _inputs, output):
                if isinstance(output, torch.Tensor):
                    acts[name] = output.detach().clone()  # clone: a later in-place op must not change it

            return store

        handles = [m.register_forward_hook(hook(name)) for name, m in self.box_head.named_children()]
        try:
            return self.box_head(pooled), acts
        finally:
            for h in handles:
                h.remove()

    def head_outputs(
        self, box_features: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor | None
    ) -> RoIPredictions:
        """Logits and deltas of box-head outputs and their unit embeddings; the regression is steered by
        the text of ``labels`` if given (training), else of the predicted class (inference)."""
        logits = self.classifier(embeddings)
        if labels is None:
            labels = logits[:, 1:].argmax(dim=1) + 1  # the predicted class's text steers the regression
        deltas = self.regressor(box_features, self._class_text(labels))
        return RoIPredictions(box_features, embeddings, logits, deltas)

    def predict(self, batch: RoIBatch, extra_rois: ExtraRoIs | None = None, capture: bool = False) -> RoIOutputs:
        """Box features part 2 and predictions: one box-head pass over the batch's pooled rows followed by
        the extra RoIs' features, then the region embeddings, and logits / deltas per part.

        ``capture``: also return the proposal rows' pooled features and the output of each of the box
        head's child modules (``fc6``, ``fc7`` for torchvision's ``TwoMLPHead``; its ReLUs are functional,
        so these are pre-activation) in ``RoIOutputs.activations``.
        """
        if extra_rois is not None:
            extra_rois.check(None if batch.pooled is None else batch.pooled.shape[1:], len(self.classifier.text))
        parts = [p for p in (batch.pooled, None if extra_rois is None else extra_rois.features) if p is not None]
        if not parts:
            raise OvdError("the RoI head got no RoIs: neither images with proposals nor extra_rois")
        pooled = parts[0] if len(parts) == 1 else torch.cat(parts)
        box_all, acts = self._run_box_head(pooled, capture)
        emb_all = self.classifier.embed(box_all)
        out = RoIOutputs()
        n = 0
        if batch.pooled is not None:
            n = batch.pooled.shape[0]
            box, emb = (box_all, emb_all) if extra_rois is None else (box_all[:n], emb_all[:n])
            keep = batch.is_proposal
            if keep is not None:
                emb, out.distill_embeddings = emb[keep], emb[~keep]
                box = box[keep]
            labels = None if batch.labels is None else torch.cat(batch.labels)
            out.rois = self.head_outputs(box, emb, labels)
            if capture:
                rows = (lambda x: x[:n]) if keep is None else (lambda x: x[:n][keep])
                out.activations = {"pooled": rows(batch.pooled.detach())}
                out.activations.update({k: rows(v) for k, v in acts.items() if v.shape[:1] == pooled.shape[:1]})
        if extra_rois is not None:
            out.extra = self.head_outputs(box_all[n:], emb_all[n:], extra_rois.labels)
        return out

    # --- part 3: losses / detections -------------------------------------------------------------------
    def compute_losses(
        self, batch: RoIBatch, outputs: RoIOutputs, targets=None, extra_rois: ExtraRoIs | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss_classifier``: cross-entropy over the sampled and the extra RoIs together;
        ``loss_box_reg``: torchvision's smooth L1 over the positive sampled RoIs divided by the number of
        sampled RoIs (extra RoIs have no box: not counted); ``loss_distill`` when the cached boxes were
        pooled; ``loss_teacher_*`` when the extra RoIs carry teacher targets."""
        logits, labels = [], []
        if outputs.rois is not None:
            logits.append(outputs.rois.logits)
            labels.append(torch.cat(batch.labels))
        if outputs.extra is not None:
            logits.append(outputs.extra.logits)
            labels.append(extra_rois.labels)
        cat = (lambda xs: xs[0]) if len(logits) == 1 else torch.cat
        losses = {"loss_classifier": F.cross_entropy(cat(logits), cat(labels))}
        if outputs.rois is not None:
            labels_cat = labels[0]
            pos = torch.where(labels_cat > 0)[0]
            reg_targets = torch.cat(batch.regression_targets)
            # torchvision's fastrcnn_loss normalisation: smooth L1 summed over positives / all sampled RoIs
            losses["loss_box_reg"] = (
                F.smooth_l1_loss(outputs.rois.deltas[pos], reg_targets[pos], beta=1 / 9, reduction="sum")
                / labels_cat.numel()
            )
        else:
            losses["loss_box_reg"] = outputs.extra.deltas.sum() * 0.0
        if batch.distill:
            losses["loss_distill"] = self.distill_weight * distill_loss(outputs.distill_embeddings, targets)
        if extra_rois is not None:
            e = outputs.extra
            losses.update(
                teacher_losses(
                    e.embeddings,
                    e.logits,
                    e.deltas,
                    extra_rois.teacher_embeddings,
                    extra_rois.teacher_logits,
                    extra_rois.teacher_deltas,
                    weight=extra_rois.teacher_weight,
                )
            )
        return losses

    def detections(self, batch: RoIBatch, outputs: RoIOutputs, image_shapes) -> list[dict[str, torch.Tensor]]:
        """torchvision's post-processing (decode, clip, score threshold, per-class NMS) of the proposal rows."""
        if outputs.rois is None:
            return []
        logits = outputs.rois.logits
        box_regression = outputs.rois.deltas.repeat(1, logits.shape[1])  # class-agnostic → per-class layout
        boxes, scores, labels = self.postprocess_detections(logits, box_regression, batch.proposals, image_shapes)
        return [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]

    # --- observation -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def observe(
        self,
        callback: Callable[[dict], None] | None = None,
        keep: bool | None = None,
        sample_in_eval: bool = False,
        subsample: bool = True,
    ) -> Iterator[RoIObserver]:
        """Record the RoIs of every forward inside the block: ``with heads.observe() as obs: model(...)``.

        Each forward appends to ``obs.records`` (and/or passes to ``callback``; ``keep`` defaults to
        True without a callback, False with one) a dict of detached tensors, one row per RoI:

        * ``pooled`` (N, C, 7, 7) RoI-pooled features; one entry per child module of the box head with
          its output (``fc6``, ``fc7`` (N, R) for torchvision's ``TwoMLPHead``: pre-ReLU);
          ``box_features`` (N, R) the box head's output (post-ReLU); ``embedding`` (N, D);
          ``logits`` (N, 1 + C); ``deltas`` (N, 4);
        * ``boxes`` (N, 4) the RoIs in the transformed image frame, ``image_index`` (N,) their image in the batch;
        * when the RoIs were sampled: ``labels`` (N,) in 0..C (0 = background) and ``matched_idxs`` (N,)
          the index of the matched GT box in its image's target (meaningful where ``labels > 0``).

        Training forward: the sampled proposals (not the cached distillation boxes, not extra RoIs).
        Eval forward: the inference proposals (no labels) — or, with ``sample_in_eval=True`` and only
        when the forward is given targets, the training-time sampled RoIs with their labels instead
        (:meth:`sample_and_observe`; the detections are unchanged, but ``subsample=True`` draws the
        sampler's random numbers from torch's global generator; ``subsample=False`` keeps all matched
        proposals and draws none). Hooks are only installed while observing: outputs are identical.
        """
        obs = RoIObserver(callback, (callback is None) if keep is None else keep, sample_in_eval, subsample)
        self._observers.append(obs)
        try:
            yield obs
        finally:
            self._observers.remove(obs)

    def observation(self, batch: RoIBatch, outputs: RoIOutputs) -> dict[str, torch.Tensor]:
        """The record of the proposal rows (see :meth:`observe`); ``outputs`` from ``predict(capture=True)``."""
        r = outputs.rois
        rec = dict(outputs.activations or {})
        rec.update(
            box_features=r.box_features.detach(),
            embedding=r.embeddings.detach(),
            logits=r.logits.detach(),
            deltas=r.deltas.detach(),
            boxes=torch.cat(batch.proposals).detach(),
            image_index=torch.cat(
                [torch.full((len(p),), i, dtype=torch.int64, device=p.device) for i, p in enumerate(batch.proposals)]
            ),
        )
        if batch.labels is not None:
            rec["labels"] = torch.cat(batch.labels)
            rec["matched_idxs"] = torch.cat(batch.matched_idxs)
        return rec

    def sample_and_observe(self, features, proposals, image_shapes, targets, subsample: bool = True) -> dict:
        """The :meth:`observe` record of training-time sampled RoIs, in any mode, without gradients:
        GT boxes join the proposals, every RoI is labelled by its matched GT class (0 = background) and,
        with ``subsample``, torchvision's balanced sampler picks the training-size subset (random; see
        :meth:`sample_rois`). For data watchers running a frozen model over a training set."""
        with torch.no_grad():
            proposals = [p.detach() for p in proposals]
            proposals, matched_idxs, labels, regression_targets = self.sample_rois(proposals, targets, subsample)
            pooled = self.box_roi_pool(features, proposals, image_shapes)
            batch = RoIBatch(proposals, pooled, None, labels, regression_targets, matched_idxs)
            return self.observation(batch, self.predict(batch, capture=True))

    # --- forward ------------------------------------------------------------------------------------------
    def forward(self, features, proposals, image_shapes, targets=None, extra_rois: ExtraRoIs | None = None):
        """torchvision's ``RoIHeads.forward`` plus ``extra_rois`` (training only, see :class:`ExtraRoIs`).

        With no image (``proposals == []``) and ``extra_rois`` given, only the extra RoIs are used.
        """
        if extra_rois is not None and not self.training:
            raise OvdError("extra_rois are a training input: in eval, call predict(RoIBatch([]), extra_rois)")
        observers = list(self._observers)
        if not self.training:
            sampling = [o for o in observers if o.sample_in_eval]
            observers = [o for o in observers if not o.sample_in_eval]
            if sampling and targets is not None and len(proposals):
                for subsample in sorted({o.subsample for o in sampling}):
                    rec = self.sample_and_observe(features, proposals, image_shapes, targets, subsample)
                    for o in sampling:
                        if o.subsample == subsample:
                            o.add(rec)
        batch = self.pool_rois(features, proposals, image_shapes, targets)
        capture = bool(observers) and batch.pooled is not None
        outputs = self.predict(batch, extra_rois, capture=capture)
        if capture:
            rec = self.observation(batch, outputs)
            for o in observers:
                o.add(rec)
        if self.training:
            return [], self.compute_losses(batch, outputs, targets, extra_rois)
        return self.detections(batch, outputs, image_shapes), {}
