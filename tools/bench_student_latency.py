"""CPU latency per image of a student next to its teacher: PyTorch and onnxruntime, side by side.

    python tools/bench_student_latency.py --teacher TEACHER.pt --student STUDENT.pt IMAGE_OR_FOLDER ... \\
        [--threads 1 2] [--rounds 5] [--warmup 2] [--limit 50] [--out latency.json]

Both detectors take their checkpoint's base vocabulary (the same names: a student is trained on its
teacher's base classes; no CLIP is loaded) and are exported to ONNX (``ovd export``'s exporter, with
its onnxruntime = PyTorch check) into a temporary folder. Per thread count (``torch.set_num_threads``
and onnxruntime's ``intra_op_num_threads``, one inter-op thread), each image goes through teacher
PyTorch, student PyTorch, teacher onnxruntime, student onnxruntime in turn, round after round, so all
four see the same machine load; per image the median over rounds is kept, then the mean over
images. Reported: those means (ms), the student / teacher ratio per runtime and thread count, and
the parameter counts. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ovd.data.images import load_image  # noqa: E402
from ovd.detect_cli import expand_images  # noqa: E402
from ovd.engine.export import export_onnx, onnx_session  # noqa: E402
from ovd.errors import OvdError  # noqa: E402
from ovd.modeling.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402

ROLES = ("teacher", "student")


def load(path: str) -> tuple[torch.nn.Module, list[str]]:
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path)
    model.set_vocabulary(state["text"])
    names = list(state["meta"].get("base_names") or [f"class{i}" for i in range(len(state["text"]))])
    return model, names


def bench(models: dict, sessions: dict, images: list, threads: int, rounds: int, warmup: int) -> dict:
    """Per runtime and role: mean over images of the per-image median latency (ms)."""
    torch.set_num_threads(threads)
    times = {(rt, r): [[] for _ in images] for rt in ("pytorch", "onnxruntime") for r in ROLES}
    with torch.inference_mode():
        for rnd in range(warmup + rounds):
            for i, x in enumerate(images):
                for rt in ("pytorch", "onnxruntime"):
                    for r in ROLES:
                        t0 = time.perf_counter()
                        if rt == "pytorch":
                            models[r]([x])
                        else:
                            sessions[r].run(None, {"image": x.numpy()})
                        if rnd >= warmup:
                            times[(rt, r)][i].append(time.perf_counter() - t0)
    out: dict = {"threads": threads}
    for rt in ("pytorch", "onnxruntime"):
        ms = {r: statistics.mean(statistics.median(t) * 1e3 for t in times[(rt, r)]) for r in ROLES}
        out[rt] = {"teacher_ms": round(ms["teacher"], 2), "student_ms": round(ms["student"], 2),
                   "student_over_teacher": round(ms["student"] / ms["teacher"], 3)}  # fmt: skip
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--limit", type=int, default=50, help="use the first N images (0: all)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    paths = expand_images(args.images)[: args.limit or None]
    images = [load_image(p) for p in paths]
    models, names = {}, {}
    for r in ROLES:
        models[r], names[r] = load(getattr(args, r))
    if names["teacher"] != names["student"]:
        raise OvdError("teacher and student have different base vocabularies: not a student of this teacher")
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in ROLES:
            export_onnx(models[r], names[r], Path(tmp) / f"{r}.onnx")
            sessions[r] = {n: onnx_session(Path(tmp) / f"{r}.onnx", threads=n) for n in args.threads}
    params = {r: sum(p.numel() for p in models[r].parameters()) for r in ROLES}
    sizes = sorted({tuple(x.shape[-2:]) for x in images})
    print(f"{len(images)} images {sizes}, {len(names['teacher'])} classes, parameters teacher "
          f"{params['teacher']:,} student {params['student']:,} ({params['student'] / params['teacher']:.2f}), "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    results = []
    for n in args.threads:
        res = bench(models, {r: sessions[r][n] for r in ROLES}, images, n, args.rounds, args.warmup)
        res["load_average_after"] = round(os.getloadavg()[0], 2)
        results.append(res)
        pt, ort = res["pytorch"], res["onnxruntime"]
        print(f"threads {n}: PyTorch teacher {pt['teacher_ms']} ms, student {pt['student_ms']} ms "
              f"(x{pt['student_over_teacher']}); onnxruntime teacher {ort['teacher_ms']} ms, student "
              f"{ort['student_ms']} ms (x{ort['student_over_teacher']}); load {res['load_average_after']}",
              flush=True)  # fmt: skip
    rec = {"teacher": args.teacher, "student": args.student, "images": len(images), "rounds": args.rounds,
           "warmup": args.warmup, "parameters": params, "torch": torch.__version__, "results": results}  # fmt: skip
    if args.out:
        from ovd.utils.io import write_json

        write_json(args.out, rec)
    return rec


if __name__ == "__main__":
    try:
        main()
    except OvdError as e:
        sys.exit(f"error: {e}")
