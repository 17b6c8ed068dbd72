"""Per-image render tasks, deterministic whatever the worker scheduling: each image draws from its own
generator seeded with (seed, domain, split, index), and results come back in task order."""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from ovd.mini_world.draw import save_png
from ovd.mini_world.kinds import kind_caption
from ovd.mini_world.presets import MiniPreset
from ovd.mini_world.scene import render_det
from ovd.mini_world.vocabulary import web_caption
from ovd.mini_world.web import render_web, render_web_kind, render_web_nonclass

_DOMAIN_WEB, _DOMAIN_DET = 1, 2
_SPLIT_CODES = {"train": 1, "val": 2}
_POOL_MIN_TASKS = 2000  # use worker processes only for worlds at least this big


def _image_rng(seed: int, domain: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, domain, _SPLIT_CODES[split], index])


def _run_task(task: tuple) -> Any:
    # knobs: None for a default world, else {"vocab": its class records, "web_style": ...}
    kind, seed, split, index, payload, preset, path, version, knobs = task
    if kind == "web":
        rng = _image_rng(seed, _DOMAIN_WEB, split, index)
        if payload is None:  # no class in the picture
            arr, caption = render_web_nonclass(rng, preset.web_size)
        elif version == 2:
            arr = render_web(rng, payload, preset.web_size)
            caption = web_caption(rng, payload)
        else:
            style = knobs["web_style"] if knobs else "clean"
            arr, size_frac = render_web_kind(rng, payload, preset.web_size, style)
            caption = kind_caption(rng, payload, size_frac)
        save_png(arr, path)
        return caption
    rng = _image_rng(seed, _DOMAIN_DET, split, index)
    arr, objects, dropped = render_det(rng, payload, preset, version=version, vocab=knobs and knobs["vocab"])
    save_png(arr, path)
    return objects, dropped


def det_layout(seed: int, split: str, n_images: int, p: MiniPreset, n_cls: int) -> list[list[int]]:
    """Category ids per scene: object counts uniform in det_objects, classes balanced over all n_cls."""
    rng = np.random.default_rng([seed, _DOMAIN_DET, _SPLIT_CODES[split], 10**9])
    counts = rng.integers(p.det_objects[0], p.det_objects[1] + 1, n_images)
    total = int(counts.sum())
    seq: list[int] = []
    while len(seq) < total:
        seq.extend(int(i) + 1 for i in rng.permutation(n_cls))
    out, k = [], 0
    for c in counts:
        out.append(seq[k : k + int(c)])
        k += int(c)
    return out


def run_tasks(tasks: list[tuple], desc: str, progress: bool) -> list:
    """``_run_task`` of every task, in task order (in 2 worker processes for big worlds)."""
    workers = min(2, os.cpu_count() or 1)
    bar = tqdm(total=len(tasks), desc=desc, unit="img", disable=not progress)
    try:
        if workers > 1 and len(tasks) >= _POOL_MIN_TASKS:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(workers) as pool:
                results = []
                for r in pool.imap(_run_task, tasks, chunksize=32):
                    results.append(r)
                    bar.update(1)
        else:
            results = []
            for t in tasks:
                results.append(_run_task(t))
                bar.update(1)
    finally:
        bar.close()
    return results
