"""CPU latency of an exported detector in onnxruntime vs the same detector in PyTorch, per image.

    python tools/bench_onnx.py --ckpt final.pt --onnx model.onnx IMAGE_OR_FOLDER ... \\
        [--threads 1 2] [--rounds 5] [--warmup 2] [--out bench.json]

PyTorch runs the checkpoint's detector with the vocabulary read back from the ONNX file (its
``model.roi_heads.classifier.text`` initializer: the same embeddings, no CLIP); both take the same
float32 (3, H, W) image and return boxes / scores / labels after post-processing (resize, RPN, RoI
heads, NMS, boxes scaled back: all in the timed call on both sides). Per thread count, both get the
same number of intra-op threads (``torch.set_num_threads`` / onnxruntime ``intra_op_num_threads``,
one inter-op thread), and the two alternate image by image, round by round, so that both see the
same machine load. Per image the median over rounds is kept; the table gives the mean and median
over images of those, and the ratio onnxruntime / PyTorch of the means. The first ``--warmup``
passes over the images are not timed. Each image's outputs are also compared (ovd.engine.export's
tolerances) and the largest differences reported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.data.images import load_image  # noqa: E402
from ovd.detect_cli import expand_images  # noqa: E402
from ovd.engine.export import box_tolerance, compare_detections, onnx_session, read_onnx_classes  # noqa: E402
from ovd.errors import OvdError, describe  # noqa: E402
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402

TEXT_INIT = "model.roi_heads.classifier.text"


def onnx_text(path) -> torch.Tensor:
    import onnx

    try:
        m = onnx.load(str(path))
    except FileNotFoundError:
        raise OvdError(f"ONNX model not found: {path}") from None
    except Exception as e:  # a truncated / foreign file: protobuf's DecodeError and others
        raise OvdError(f"cannot read ONNX model {path}: {describe(e)}") from None
    for init in m.graph.initializer:
        if init.name == TEXT_INIT:
            return torch.from_numpy(onnx.numpy_helper.to_array(init).copy())
    raise OvdError(f"{path}: no {TEXT_INIT} initializer (not an ovd export?)")


def bench(model, sess, images, threads: int, rounds: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    pt_times = [[] for _ in images]
    ort_times = [[] for _ in images]
    worst = {"max_box_diff": 0.0, "max_score_diff": 0.0, "detections": 0, "all_ok": True}
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for i, x in enumerate(images):
                xn = x.numpy()
                t0 = time.perf_counter()
                o = model([x])[0]
                t1 = time.perf_counter()
                got = sess.run(None, {"image": xn})
                t2 = time.perf_counter()
                if r >= warmup:
                    pt_times[i].append(t1 - t0)
                    ort_times[i].append(t2 - t1)
                if r == 0:
                    ref = (o["boxes"].numpy(), o["scores"].numpy(), (o["labels"] - 1).numpy())
                    d = compare_detections(ref, got, box_tol=box_tolerance(*x.shape[-2:], model.transform))
                    worst["all_ok"] &= d["ok"]
                    worst["detections"] += d["count"]
                    worst["max_box_diff"] = max(worst["max_box_diff"], d["max_box_diff"])
                    worst["max_score_diff"] = max(worst["max_score_diff"], d["max_score_diff"])
    pt = [statistics.median(t) * 1e3 for t in pt_times]
    ort = [statistics.median(t) * 1e3 for t in ort_times]
    return {
        "threads": threads,
        "pytorch_ms_mean": statistics.mean(pt),
        "pytorch_ms_median": statistics.median(pt),
        "onnxruntime_ms_mean": statistics.mean(ort),
        "onnxruntime_ms_median": statistics.median(ort),
        "ratio_onnxruntime_over_pytorch": statistics.mean(ort) / statistics.mean(pt),
        "parity": worst,
    }


def main() -> None:
    try:
        _main()
    except OvdError as e:  # one line, as the ovd commands print it
        sys.exit(f"bench_onnx: error: {e}")


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    ap.add_argument("--ckpt", required=True, help="the checkpoint the ONNX file was exported from")
    ap.add_argument("--onnx", required=True, help="ovd export output")
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="intra-op thread counts to run")
    ap.add_argument("--rounds", type=int, default=5, help="timed passes over the images")
    ap.add_argument("--warmup", type=int, default=2, help="untimed passes first")
    ap.add_argument("--limit", type=int, default=0, help="use the first N images only (0: all)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args()

    paths = expand_images(args.images)
    if args.limit:
        paths = paths[: args.limit]
    images = [load_image(p) for p in paths]
    model = model_from_checkpoint(load_checkpoint(args.ckpt), args.ckpt)
    model.set_vocabulary(onnx_text(args.onnx))
    classes = read_onnx_classes(args.onnx)
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    print(f"{len(images)} images {sizes}, {len(classes)} classes, torch {torch.__version__}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, cpus {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)  # fmt: skip
    results = []
    for n in args.threads:
        sess = onnx_session(args.onnx, threads=n)
        res = bench(model, sess, images, n, args.rounds, args.warmup)
        res["load_average_after"] = round(os.getloadavg()[0], 2)
        results.append(res)
        p = res["parity"]
        print(f"threads {n}: PyTorch {res['pytorch_ms_mean']:.1f} ms/image (median {res['pytorch_ms_median']:.1f}), "
              f"onnxruntime {res['onnxruntime_ms_mean']:.1f} ms/image (median {res['onnxruntime_ms_median']:.1f}), "
              f"ratio {res['ratio_onnxruntime_over_pytorch']:.2f}; parity {'ok' if p['all_ok'] else 'FAILED'} "
              f"({p['detections']} detections, max box diff {p['max_box_diff']:.2g} px, "
              f"max score diff {p['max_score_diff']:.2g}); load average {res['load_average_after']}",
              flush=True)  # fmt: skip
    if args.out:
        rec = {"ckpt": str(args.ckpt), "onnx": str(args.onnx), "images": [str(p) for p in paths],
               "rounds": args.rounds, "warmup": args.warmup, "torch": torch.__version__,
               "results": results}  # fmt: skip
        Path(args.out).write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    main()
