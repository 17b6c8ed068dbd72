"""SHA-256 of every file of a tiny v3 mini-world: the fingerprint that pins the default world.

The world knobs must leave a default world byte for byte as the generator made it before them. The
test fixture ``tests/data/world_v3_golden.json`` holds this fingerprint as computed by the generator
*before* the knobs existed, at annotation version 2 (each object's silhouette as its segmentation;
its 187 images hash as at annotation version 1, only the six JSON files differ), made with (from the
repository root, ``PARENT`` = the silhouette-segmentation commit, which has no knobs)::

    git archive PARENT | tar -x -C /tmp/parent
    PYTHONPATH=/tmp/parent python tools/world_hashes.py --write tests/data/world_v3_golden.json

The script uses only APIs that generator already had (``generate_mini_world``, ``PRESETS_V3``,
``MiniPreset``), so the same script runs against either code base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

from ovd.mini_world import PRESETS_V3, MiniPreset, generate_mini_world

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", help="write the fingerprint to this JSON file (default: print it)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        hashes = world_hashes(Path(tmp) / "world")
    text = json.dumps({"preset": GOLDEN.name, "seed": GOLDEN_SEED, "sha256": hashes}, indent=1, sort_keys=True)
    if args.write:
        Path(args.write).write_text(text + "\n", encoding="utf-8")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
