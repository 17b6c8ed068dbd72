"""Time `ovd export` of a large stored vocabulary against `ovd detect` with the same vocabulary.

    PYTHONPATH=<ovd tree> OMP_NUM_THREADS=1 python tools/time_export.py --ckpt CK IMAGE \\
        [--names 5000] [--detect-runs 3] [--work DIR] [--out F]

Embeds ``--names`` class names ("object 0", "object 1", ...) with the checkpoint's own CLIP into a
stored vocabulary (``ovd vocab embed``'s format, so export accepts it), then times, in this process:
``ovd export --ckpt CK --text-embeddings V --out DIR/m.onnx`` (trace, parity check, write) and
``--detect-runs`` times ``ovd detect IMAGE --ckpt CK --text-embeddings V`` (checkpoint load,
vocabulary load, one image; the CLI's work without its file output). The target: the export costs
about as much as a few detect calls, whatever the vocabulary size. The tree under test is the one on
PYTHONPATH (this script imports ``ovd`` from there), so the same file times an older tree too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ovd.engine.export import run_export
from ovd.engine.predictor import Detector
from ovd.vlm.vocab import embed_vocabulary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image", help="an image for the detect calls")
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--names", type=int, default=5000, help="vocabulary size")
    ap.add_argument("--detect-runs", type=int, default=3)
    ap.add_argument("--work", default=None, help="folder for the vocabulary and the .onnx (default: a temp folder)")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="time_export."))
    work.mkdir(parents=True, exist_ok=True)
    import ovd

    det = Detector.from_checkpoint(a.ckpt)
    vocab = work / f"vocab{a.names}.safetensors"
    t0 = time.perf_counter()
    embed_vocabulary(det.clip, [f"object {i}" for i in range(a.names)], vocab, det.templates, source=det.clip.source)
    embed_s = time.perf_counter() - t0
    detect = []
    for _ in range(a.detect_runs):
        t0 = time.perf_counter()
        d = Detector.from_checkpoint(a.ckpt, text_embeddings=str(vocab))
        d.predict(a.image)
        detect.append(time.perf_counter() - t0)
    print(f"ovd tree {Path(ovd.__file__).parent.parent}, {a.names} names (embedded in {embed_s:.1f} s), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}; detect: "
          f"{', '.join(f'{x:.2f}' for x in detect)} s", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    rep = run_export(a.ckpt, work / "m.onnx", text_embeddings=str(vocab))
    export_s = time.perf_counter() - t0
    med = statistics.median(detect)
    res = {"names": a.names, "export_seconds": round(export_s, 2), "detect_seconds_median": round(med, 2),
           "export_over_detect": round(export_s / med, 1), "check": rep.get("check"),
           "load_average_after": round(os.getloadavg()[0], 2)}  # fmt: skip
    print(json.dumps(res), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
