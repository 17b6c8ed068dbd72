"""Throughput of the bench pipeline's slow stages under each way of using this machine's cores.

    python tools/profile_stages.py configs/mini/bench.yaml [--images 192] [--pretrain-steps 60]
        [--train-iters 60] [--only pretrain mine train] [overrides ...]

Needs the stages' inputs on disk (run ``ovd run CONFIG`` once). Each measurement is a separate
``ovd`` process on a slice of the real inputs, with ``OMP_NUM_THREADS`` set:

* ``pretrain``: tiny-CLIP pre-training, steps/s with 1 and with 2 threads (``--pretrain-steps``
  steps: one epoch of a web-train subset);
* ``mine``: proposal mining, images/s with 1 thread, 2 threads, and 2 shards of 1 thread each
  running at once (``ovd mine --shard i/2``);
* ``train``: detector training, iterations/s with 1 and 2 threads (``train.max_iters``; the
  trainer's own loop time, so start-up and data checks are excluded).

Run it on an otherwise idle machine. Writes ``<work_dir>/profile_stages.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ovd(argv: list[str], threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "ovd.cli", *argv], cwd=ROOT, env=env, stdout=f,
                            stderr=subprocess.STDOUT)  # fmt: skip


def timed(procs: list[subprocess.Popen], logs: list[Path]) -> float:
    t0 = time.perf_counter()
    for p, log in zip(procs, logs):
        if p.wait():
            sys.exit(f"failed: see {log}")
    return time.perf_counter() - t0


def subset(src: str, dst: Path, n: int) -> Path:
    data = json.loads(Path(src).read_text())
    keep = {im["id"] for im in data["images"][:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    if "annotations" in data:  # the web files carry their captions in the image records
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    dst.write_text(json.dumps(data))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--images", type=int, default=192, help="train images mined per measurement")
    ap.add_argument("--pretrain-steps", type=int, default=60)
    ap.add_argument("--train-iters", type=int, default=60)
    ap.add_argument("--only", nargs="+", default=["pretrain", "mine", "train"], choices=["pretrain", "mine", "train"])
    args = ap.parse_intermixed_args()  # key=value overrides may follow the options
    from ovd.config import load_config

    cfg = load_config(args.config, args.overrides)
    base = [args.config, *args.overrides]
    tmp = Path(tempfile.mkdtemp(prefix="ovd-profile-"))
    result: dict = {"config": args.config, "overrides": args.overrides, "cpus": os.cpu_count()}

    if "pretrain" in args.only:
        n = args.pretrain_steps * cfg.pretrain.batch_size
        web = subset(cfg.data.web_train_json, tmp / "web.json", n)
        rows = {}
        for threads in (1, 2):
            log = tmp / f"pretrain{threads}.log"
            ov = [f"data.web_train_json={web}", f"pretrain.out={tmp / f'clip{threads}'}", "pretrain.epochs=1",
                  "pretrain.threads=0"]  # fmt: skip
            s = timed([ovd(["vlm", "pretrain-mini", *base, *ov], threads, log)], [log])
            rows[f"{threads} thread(s)"] = {"seconds": round(s, 1), "steps_per_s": round(args.pretrain_steps / s, 2)}
            print("pretrain", threads, rows[f"{threads} thread(s)"], flush=True)
        result["pretrain"] = {"steps": args.pretrain_steps, "including_startup_and_web_val": True, **rows}

    if "mine" in args.only:
        train = subset(cfg.data.train_json, tmp / "train.json", args.images)
        rows = {}
        for label, threads, shards in (("1 thread", 1, 1), ("2 threads", 2, 1), ("2 shards x 1 thread", 1, 2)):
            out = tmp / f"mine-{threads}-{shards}"
            ov = [f"data.train_json={train}", f"miner.out={out}", f"miner.chunk_size={args.images // 4}"]
            cmds = [["mine", *base, *ov, "--shard", f"{i}/{shards}"] for i in range(shards)]
            logs = [tmp / f"{out.name}-{i}.log" for i in range(shards)]
            s = timed([ovd(c, threads, log) for c, log in zip(cmds, logs)], logs)
            rows[label] = {"seconds": round(s, 1), "images_per_s": round(args.images / s, 2)}
            print("mine", label, rows[label], flush=True)
        result["mine"] = {"images": args.images, "including_startup": True, **rows}

    if "train" in args.only:
        rows = {}
        for threads in (1, 2):
            out = tmp / f"train{threads}"
            log = tmp / f"train{threads}.log"
            ov = [f"train.out={out}", f"train.max_iters={args.train_iters}", "train.eval_every=0"]
            timed([ovd(["train", *base, *ov], threads, log)], [log])
            text = log.read_text()
            report = json.loads(text[text.rfind("\n{\n") + 1 :])  # the report ovd train prints last
            rows[f"{threads} thread(s)"] = {"iters_per_s": round(report["iterations"] / report["seconds"], 2)}
            print("train", threads, rows[f"{threads} thread(s)"], flush=True)
        result["train"] = {"iters": args.train_iters, **rows}

    out = Path(cfg.work_dir) / "profile_stages.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
