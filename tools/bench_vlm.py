"""Measure the CLIP stages on a mini-world preset: tiny-CLIP pre-training (web zero-shot accuracy),
detection-domain crop accuracy of the raw CLIP, the adapter, and the adapted crop accuracy, each
with its wall time. Writes ``{work_dir}/bench_vlm.json``.

    python tools/bench_vlm.py configs/mini/bench.yaml          # generates the world if missing
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ovd.config import load_config
from ovd.mini_world import generate_mini_world
from ovd.utils.io import write_json
from ovd.vlm.adapter import run_adapt
from ovd.vlm.crop_eval import run_crop_eval
from ovd.vlm.pretrain import pretrain_tiny_clip


def timed(fn, *a, **k):
    t = time.perf_counter()
    out = fn(*a, **k)
    return out, round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    cfg = load_config(args.config, args.overrides)
    res: dict = {"config": args.config, "overrides": args.overrides, "torch_threads": torch.get_num_threads()}
    _, res["world_seconds"] = timed(
        generate_mini_world, cfg.world.dir, cfg.world.preset, cfg.world.seed, progress=False, version=cfg.world.version
    )
    pre, res["pretrain_seconds"] = timed(pretrain_tiny_clip, cfg, progress=False)
    res["web_val_zero_shot_top1"] = pre["web_val_zero_shot_top1"]
    res["raw"], res["raw_eval_seconds"] = timed(run_crop_eval, cfg, None, progress=False)
    ad, res["adapt_seconds"] = timed(run_adapt, cfg, progress=False)
    res["adapter_final_loss"] = ad["final_loss"]
    res["adapted"], res["adapted_eval_seconds"] = timed(run_crop_eval, cfg, cfg.adapter.out, progress=False)
    write_json(Path(cfg.work_dir) / "bench_vlm.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
