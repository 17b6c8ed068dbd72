"""The feature generator: forged base-class RoI features from stored statistics, no image needed.

Architecture (NIFF's class-wise heads, sized for a CPU): noise ``z`` → shared trunk (MLP to a
``trunk_channels`` × 7 × 7 map, one 3 × 3 convolution) → one light head per row (background + each
base class: a 3 × 3 convolution to the RoI-pooled channels) → standardised features, which are
de-standardised with that row's stored per-channel mean and standard deviation (buffers, so a
generator file is self-contained). Output: (N, C, 7, 7), the shape of the base model's RoI pooling.

Fitting (``ovd replay fit``) runs forged features through the frozen base RoI head (box head →
region embedding → cosine classifier over the base vocabulary) and minimises, per row:

* statistic matching at every watched layer (``pooled`` per channel, each box-head layer and the
  embedding per unit): standardised mean error ``((m̂ - m) / s)²`` plus the log standard-deviation
  ratio ``log(ŝ / s)²``, averaged over units and rows, summed over layers;
* cross-entropy of the frozen classifier towards the intended row (0 = background);
* diversity, against mode collapse: a hinge ``relu(1 - d̂ / d)`` per row on the RMS pairwise distance
  of the forged last-box-head-layer features ``d̂`` against the real one ``d = sqrt(2 Σ var)``
  (from the statistics) — it is zero unless the forged features of a class are less spread out
  than the real ones.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ovd.errors import OvdError
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint
from ovd.replay.watchers import ReplayStats, check_matches_base, head_forward, load_stats, pooled_shape
from ovd.stages import section_reads
from ovd.utils.io import atomic_path, check_writable, file_sha1
from ovd.utils.safe_load import read_safetensors

GENERATOR_FORMAT = "ovd-replay-generator/1"


class FeatureGenerator(nn.Module):
    def __init__(self, rows: int, shape: list[int], noise_dim: int = 64, hidden: int = 64, trunk_channels: int = 16):
        super().__init__()
        c, h, w = shape
        self.rows, self.shape, self.noise_dim, self.trunk_channels = rows, list(shape), noise_dim, trunk_channels
        self.trunk = nn.Sequential(
            nn.Linear(noise_dim, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, trunk_channels * h * w),
            nn.LeakyReLU(0.2),
        )
        self.trunk_conv = nn.Conv2d(trunk_channels, trunk_channels, 3, padding=1)
        self.head_weight = nn.Parameter(torch.randn(rows, c, trunk_channels, 1, 1) / math.sqrt(trunk_channels))
        self.head_bias = nn.Parameter(torch.zeros(rows, c))
        self.register_buffer("mean", torch.zeros(rows, c))  # per-row, per-channel statistics of the pooled features
        self.register_buffer("std", torch.ones(rows, c))

    def set_statistics(self, mean: torch.Tensor, var: torch.Tensor, valid: torch.Tensor) -> None:
        """Per-row pooled statistics; rows without statistics (``valid`` False) get the average row's."""
        mean, var = mean.clone(), var.clone()
        mean[~valid], var[~valid] = mean[valid].mean(0), var[valid].mean(0)
        self.mean.copy_(mean)
        self.std.copy_(var.clamp(min=1e-12).sqrt())

    def forward(self, labels: torch.Tensor, z: torch.Tensor | None = None, generator=None) -> torch.Tensor:
        """Features (N, C, h, w) of rows ``labels`` (N,) in 0..rows-1 (0 = background)."""
        c, h, w = self.shape
        if z is None:
            z = torch.randn(len(labels), self.noise_dim, generator=generator).to(self.mean.device)
        t = self.trunk(z).view(len(labels), self.trunk_channels, h, w)
        t = F.leaky_relu(self.trunk_conv(t), 0.2)
        # the head of each RoI's row: a 1 x 1 convolution is a per-RoI matrix product
        wgt = self.head_weight[labels].flatten(2)  # (N, C, trunk_channels)
        y = torch.bmm(wgt, t.flatten(2)) + self.head_bias[labels][:, :, None]  # (N, C, h * w)
        return (self.mean[labels][:, :, None] + self.std[labels][:, :, None] * y).view(len(labels), c, h, w)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator=None) -> torch.Tensor:
        return self.forward(labels, generator=generator)


def _row_moments(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased variance of a class-balanced batch (rows contiguous, equal counts):
    4-d features per channel (positions are samples), 2-d per unit."""
    b = x.shape[0] // rows
    if x.ndim == 4:
        x = x.view(rows, b, x.shape[1], -1).transpose(2, 3).reshape(rows, -1, x.shape[1])
    else:
        x = x.view(rows, b, -1)
    return x.mean(dim=1), x.var(dim=1)


def stat_losses(outs: dict, stats: ReplayStats, rows: int) -> dict[str, torch.Tensor]:
    """Per watched layer: standardised mean error² + log std ratio², averaged over units and rows."""
    losses = {}
    ok = stats.valid
    for layer in stats.layers:
        m, v = _row_moments(outs[layer], rows)
        m, v = m[ok], v[ok]
        rm, rv = stats.mean(layer)[ok].to(m), stats.var(layer)[ok].to(m)
        eps = 1e-4 * rv.mean() + 1e-12
        mean_err = (m - rm).pow(2) / (rv + eps)
        std_err = 0.25 * torch.log((v + eps) / (rv + eps)).pow(2)
        losses[layer] = (mean_err + std_err).mean()
    return losses


def diversity(outs: dict, stats: ReplayStats, layer: str, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the RMS pairwise distance of the forged features in ``layer`` and of the real ones."""
    _, v = _row_moments(outs[layer], rows)
    forged = (2 * v.sum(dim=1)).clamp(min=1e-12).sqrt()
    return forged[stats.valid], stats.rms_pair_distance(layer).to(forged)[stats.valid]


def measure(gen: FeatureGenerator, heads, stats: ReplayStats, per_row: int = 64, seed: int = 1) -> dict:
    """How well forged features stand in for real ones (no gradients, a fresh noise draw):
    classification by the frozen base head, statistic match per layer, diversity."""
    rows = gen.rows
    labels = torch.arange(rows).repeat_interleave(per_row)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        outs = head_forward(heads, gen.sample(labels, generator=g))
    pred = outs["logits"].argmax(dim=1)
    hit = (pred == labels).float().view(rows, per_row).mean(dim=1)
    among = (outs["logits"][:, 1:].argmax(dim=1) + 1 == labels).float().view(rows, per_row).mean(dim=1)
    match = {}
    ok = stats.valid
    for layer in stats.layers:
        m, v = _row_moments(outs[layer], rows)
        m, v, rm, rv = m[ok], v[ok], stats.mean(layer)[ok], stats.var(layer)[ok]
        z = ((m - rm).abs() / rv.clamp(min=1e-12).sqrt()).mean().item()
        ratio = (v.clamp(min=1e-12) / rv.clamp(min=1e-12)).sqrt().median().item()
        match[layer] = {"mean_abs_z": round(z, 4), "median_std_ratio": round(ratio, 4)}
    last = [k for k in stats.layers if k not in ("pooled", "embedding")][-1]
    div = {}
    for layer in (last, "embedding"):
        f, r = diversity(outs, stats, layer, rows)
        f, r = f[int(ok[0]) :], r[int(ok[0]) :]  # classes only (row 0 is background)
        div[layer] = {"forged_rms_pair_distance": round(f.mean().item(), 4),
                      "real_rms_pair_distance": round(r.mean().item(), 4),
                      "min_ratio_over_classes": round((f / r).min().item(), 4)} if len(f) else None  # fmt: skip
    return {
        "accuracy": round(hit.mean().item(), 4),
        "accuracy_foreground": round(hit[1:].mean().item(), 4),
        "accuracy_background": round(hit[0].item(), 4),
        "accuracy_among_classes": round(among[1:].mean().item(), 4),
        "worst_class_accuracy": round(hit[1:].min().item(), 4),
        "chance": round(1 / rows, 4),
        "chance_among_classes": round(1 / (rows - 1), 4),
        "classes_without_statistics": int((~ok[1:]).sum()),
        "stat_match": match,
        "diversity": div,
    }


def frozen_base(state: dict, path) -> torch.nn.Module:
    model = model_from_checkpoint(state, path)
    model.set_vocabulary(state["text"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fit_generator(gen: FeatureGenerator, heads, stats: ReplayStats, r, progress_every: int = 0) -> list[dict]:
    """Fit ``gen`` (replay config ``r``) against the frozen RoI head ``heads``; the loss log."""
    rows, b = gen.rows, r.fit_batch_per_class
    opt = torch.optim.Adam(gen.parameters(), lr=r.fit_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r.fit_iters)
    labels = torch.arange(rows).repeat_interleave(b)
    last = [k for k in stats.layers if k not in ("pooled", "embedding")][-1]
    log = []
    for it in range(r.fit_iters):
        outs = head_forward(heads, gen(labels))
        sl = stat_losses(outs, stats, rows)
        ce = F.cross_entropy(outs["logits"], labels)
        f, real = diversity(outs, stats, last, rows)
        div = F.relu(1 - f / real).mean()
        loss = r.stat_weight * sum(sl.values()) + r.ce_weight * ce + r.diversity_weight * div
        if not torch.isfinite(loss):
            raise OvdError(f"generator fitting diverged at iteration {it}: lower replay.fit_lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rec = {"iter": it + 1, "loss": round(loss.item(), 5), "ce": round(ce.item(), 5),
               "diversity": round(div.item(), 5),
               **{f"stat_{k}": round(v.item(), 5) for k, v in sl.items()}}  # fmt: skip
        log.append(rec)
        if progress_every and (it + 1) % progress_every == 0:
            print(json.dumps(rec), flush=True)
    return log


def save_generator(path, gen: FeatureGenerator, meta: dict) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, str(tmp),
                  metadata={"format": GENERATOR_FORMAT, "meta": json.dumps(meta)})  # fmt: skip
    return path.stat().st_size


def load_generator(path, base_meta: dict | None = None, base_sha1: str | None = None, feature_shape=None):
    """(generator, meta); with ``base_meta`` / ``base_sha1`` it must have been made from that checkpoint."""
    tensors, raw = read_safetensors(path, "replay generator file", GENERATOR_FORMAT)
    try:
        meta = json.loads(raw["meta"])
        gen = FeatureGenerator(len(meta["class_names"]) + 1, meta["shapes"]["pooled"], meta["noise_dim"],
                               meta["hidden"], meta["trunk_channels"])  # fmt: skip
    except (KeyError, TypeError, ValueError, json.JSONDecodeError):
        raise OvdError(f"replay generator file {path} is damaged: incomplete metadata") from None
    if base_meta is not None:
        check_matches_base("replay generator file", path, meta, base_meta, base_sha1, feature_shape)
    try:
        gen.load_state_dict(tensors)
    except RuntimeError:
        raise OvdError(f"replay generator file {path} is damaged: its weights do not fit its metadata") from None
    return gen.eval(), meta


def generator_settings(cfg) -> dict:
    """The generator's architecture and fitting settings as stored in its file's metadata: a file
    whose stored settings differ from a config's was fitted otherwise."""
    r = cfg.replay
    arch = ("noise_dim", "hidden", "trunk_channels")  # the network's shape; the rest: how it was fitted
    fit = [k for k in section_reads("replay fit", "replay") if k not in arch]  # the stage's keys, ovd.stages
    return {**{k: r[k] for k in arch}, "fit": {k: r[k] for k in fit} | {"seed": int(cfg.seed)}}


def run_fit(cfg, ckpt: str, stats_path: str | None = None, out: str | None = None, progress: bool = True) -> dict:
    """``ovd replay fit``: fit the generator to the statistics ``stats_path`` of base detector ``ckpt``.
    Reads no image and no annotation file."""
    r = cfg.replay
    stats_path, out = stats_path or r.stats, check_writable(out or r.generator, "--out" if out else "replay.generator")
    state = load_checkpoint(ckpt)
    sha1 = file_sha1(ckpt)
    stats = load_stats(stats_path)
    base = frozen_base(state, ckpt)
    shape = pooled_shape(base)
    check_matches_base("replay statistics file", stats_path, stats.meta, state["meta"], sha1, shape)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    gen = FeatureGenerator(len(stats.class_names) + 1, shape, r.noise_dim, r.hidden, r.trunk_channels)
    gen.set_statistics(stats.mean("pooled"), stats.var("pooled"), stats.valid)
    gen.train()
    log = fit_generator(gen, base.roi_heads, stats, r, progress_every=max(1, r.fit_iters // 10) if progress else 0)
    gen.eval()
    report = measure(gen, base.roi_heads, stats)
    params = sum(p.numel() for p in gen.parameters())
    meta = {
        "class_names": stats.class_names,
        "shapes": {"pooled": shape},
        "embed_dim": int(state["meta"]["embed_dim"]),
        "base_ckpt_sha1": sha1,
        "stats_sha1": file_sha1(stats_path),
        **generator_settings(cfg),
        "measure": report,
        "final_losses": log[-1],
    }
    size = save_generator(out, gen, meta)
    return {"out": str(out), "bytes": size, "parameters": params, "seconds": round(time.time() - t0, 1),
            "final_losses": log[-1], **report}  # fmt: skip
