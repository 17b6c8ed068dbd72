"""Small file helpers: atomic writes (never a half-written output file) and checked JSON reads."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ovd.errors import OvdError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The rename is atomic on POSIX, so a reader sees either the old file or the complete new one,
    and a crash mid-write leaves no partial file behind.
    """
    path = Path(path)
    if path.is_dir():
        raise OvdError(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OvdError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    # mkstemp creates 0600; give the file the mode a plain open() would (umask applied).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        raise OvdError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON atomically. Keys keep insertion order, so output is deterministic."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
    return Path(path)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with one clear error for a missing file or malformed content."""
    path = Path(path)
    if not path.is_file():
        raise OvdError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise OvdError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError:
        raise OvdError(f"{what} {path} is not UTF-8 text (is it a binary file?)") from None
