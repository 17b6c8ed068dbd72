"""SHA-256 of every file of a tiny v3 mini-world: the fingerprint that pins the default world.

The world knobs must leave a default world byte for byte as the generator made it before them. The
test fixture ``tests/data/world_v3_golden.json`` holds this fingerprint as computed by the generator
*before* the knobs existed, at annotation version 2 (each object's silhouette as its segmentation;
its 187 images hash as at annotation version 1, only the six JSON files differ).

One fingerprint per numpy SIMD path. numpy's AVX-512 loops for float64 ``exp``, ``log``, ``power``
and ``arctan`` round the last bit differently from its AVX2 loops, and the renderer's shapes go
through them, so on this golden world 3 of its 187 images differ by CPU: ``avx512`` is the world
where numpy runs its AVX-512 loops, ``no_avx512`` where it cannot (an AVX2-only CPU) or is told not
to (``NPY_DISABLE_CPU_FEATURES``). Within one path the world is exact. ``--write`` makes both on
an AVX-512 CPU, the second in a child process with numpy's AVX-512 features disabled. Made with (from
the repository root, ``PARENT`` = the silhouette-segmentation commit c18ced2, which has no knobs and
keeps the generator under ``ovd.data.mini_world``)::

    git archive PARENT | tar -x -C /tmp/parent
    python tools/world_hashes.py --code /tmp/parent --write tests/data/world_v3_golden.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _use_code(root: str) -> None:
    """Import ``ovd`` from ``root`` instead of the installed package (an editable install's finder
    would otherwise win over ``sys.path``)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, root)


# before the import below: --code picks which generator is fingerprinted
if __name__ == "__main__" and "--code" in sys.argv[:-1]:
    _use_code(sys.argv[sys.argv.index("--code") + 1])

try:
    from ovd.mini_world import PRESETS_V3, MiniPreset, generate_mini_world
except ImportError:  # the pre-knob generator lived under ovd.data
    from ovd.data.mini_world import PRESETS_V3, MiniPreset, generate_mini_world

#: Small enough for a test (seconds), big enough to use every renderer: class and non-class web
#: images of every kind, and scenes with several objects.
GOLDEN = MiniPreset(
    "golden",
    web_train_per_class=1,
    web_val_per_class=1,
    det_train_images=16,
    det_val_images=6,
    fewshot_shots=(1,),
    fewshot_seeds=(0,),
)
GOLDEN_SEED = 1


def world_hashes(out: Path, seed: int = GOLDEN_SEED, **kwargs) -> dict[str, str]:
    """Generate the golden-preset world into ``out`` and return ``{relative path: sha256}``.

    ``kwargs`` go to ``generate_mini_world`` (``knobs=...``). The preset is registered for the call
    only, so the preset table is left as it was.
    """
    PRESETS_V3[GOLDEN.name] = GOLDEN
    try:
        generate_mini_world(out, preset=GOLDEN.name, seed=seed, progress=False, **kwargs)
    finally:
        del PRESETS_V3[GOLDEN.name]
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _umath():
    try:
        import numpy._core._multiarray_umath as umath
    except ImportError:  # numpy 1.x
        import numpy.core._multiarray_umath as umath
    return umath


def _avx512_features() -> list[str]:
    """The CPU's AVX-512 features as numpy names them (what ``NPY_DISABLE_CPU_FEATURES`` takes)."""
    feats = _umath().__cpu_features__
    return [k for k, on in feats.items() if on and (k.startswith("AVX512") or k == "X86_V4")]


def no_avx512_env() -> dict:
    """This process's environment with numpy's AVX-512 loops switched off (for a child process)."""
    return dict(os.environ, NPY_DISABLE_CPU_FEATURES=" ".join(_avx512_features()))


def simd_path() -> str:
    """Which fingerprint this process's numpy gives: ``avx512`` or ``no_avx512``.

    Read from the loop numpy dispatched for float64 ``power`` (numpy 2 reports it), which honours
    ``NPY_DISABLE_CPU_FEATURES``; older numpy: from the CPU's features."""
    info = getattr(_umath(), "__cpu_targets_info__", {}).get("power", {}).get("ddd")
    if info:
        return "avx512" if info["current"].startswith(("X86_V4", "AVX512")) else "no_avx512"
    return "avx512" if "AVX512F" in _avx512_features() else "no_avx512"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="write the fingerprints to this JSON file (default: print them)")
    ap.add_argument("--code", help="fingerprint the ovd package found in this folder")
    ap.add_argument("--this-path-only", action="store_true", help="only this process's numpy SIMD path")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fingerprints = {simd_path(): world_hashes(Path(tmp) / "world")}
    if not args.this_path_only:
        if simd_path() != "avx512":
            raise SystemExit("world_hashes: both fingerprints need a CPU on which numpy runs AVX-512 loops")
        cmd = [sys.executable, __file__, "--this-path-only"] + (["--code", args.code] if args.code else [])
        child = json.loads(subprocess.run(cmd, env=no_avx512_env(), check=True, capture_output=True, text=True).stdout)
        fingerprints.update(child["sha256"])
    doc = {"preset": GOLDEN.name, "seed": GOLDEN_SEED, "sha256": fingerprints}
    text = json.dumps(doc, indent=1, sort_keys=True)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
