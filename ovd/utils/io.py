"""Small file helpers: atomic writes (never a half-written output file), checked JSON reads, and the
crash points that the fault-injection tests kill a process at.

Crash points: every durable step of an output (a temporary file complete, its rename, an index
removed) calls :func:`crash_point`. With ``OVD_CRASH_AT=N`` in the environment the process kills
itself with SIGKILL at the N-th point; with ``OVD_CRASH_LOG=FILE`` it appends one line per point
(how a test learns how many points a command has, to sweep all of them). Neither is set in normal
use, where a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ovd.errors import OvdError, describe

_crash_count = 0


def crash_point(label: str) -> None:
    """A point where a real crash could happen; see the module docstring."""
    global _crash_count
    if "OVD_CRASH_AT" not in os.environ and "OVD_CRASH_LOG" not in os.environ:
        return
    _crash_count += 1
    log = os.environ.get("OVD_CRASH_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{_crash_count} {label}\n")
    if os.environ.get("OVD_CRASH_AT") == str(_crash_count):
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temps(folder: str | os.PathLike, name_glob: str = "*") -> int:
    """Delete the temporary files that :func:`atomic_path` calls of dead processes left in ``folder``
    (a write killed mid-way). A temporary file's name holds its writer's PID; files of live
    processes (another shard writing beside this one) are left alone."""
    n = 0
    for p in Path(folder).glob(f".{name_glob}.*.tmp"):
        stem = p.name[: -len(".old.tmp")] if p.name.endswith(".old.tmp") else p.name[: -len(".tmp")]
        pid = stem.rsplit(".", 2)[-2] if stem.count(".") >= 2 else ""
        if pid.isdigit() and _alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _plain_mode(path: str | os.PathLike, mode: int) -> None:
    """Give a temporary file / folder the mode a plain open() / mkdir() would (umask applied), so
    every output of every stage has the same permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


NO_SPACE = "no space left on device"


def _no_space(e: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC itself, or a library's own error type
    (torch.save's "unexpected pos", safetensors' SafetensorError) while the file system has no room."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


FULL_BELOW = 1 << 20  # bytes free: a writer that failed with less than this left ran out of disk


def write_error(path: str | os.PathLike, e: BaseException) -> OvdError:
    """The one error of a failed write of ``path``: "no space left on device" for a full disk
    (whichever library wrote), else the OS's reason."""
    path = Path(path)
    if _no_space(e, path.parent if path.parent.exists() else Path(".")):
        return OvdError(f"cannot write {path}: {NO_SPACE}")
    return OvdError(f"cannot write {path}: {getattr(e, 'strerror', None) or describe(e)}")


def _failed_write(path: Path, e: Exception) -> None:
    """Turn a writer's exception into :func:`write_error`; exceptions that are not about the disk
    (a bug, an ovd error) pass through unchanged."""
    if isinstance(e, OvdError):
        return
    if isinstance(e, OSError) or _no_space(e, path.parent):
        raise write_error(path, e) from None


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: ``path`` is a folder where a file
    is meant (or the reverse), or its nearest existing parent folder is not writable. ``what``
    names the option in the error ("--results", "replay.stats")."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise OvdError(f"{what} {path}: " + ("a file of that name exists, expected a folder" if folder
                                                  else "is a folder, expected a file path"))  # fmt: skip
    parent = path if folder else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OvdError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OvdError(f"{what} {path}: cannot write into {parent} (permission denied or read-only)")
    return path


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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OvdError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    _plain_mode(tmp, 0o666)  # mkstemp creates 0600
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        crash_point(f"written {tmp_path.name}")
        os.replace(tmp_path, path)
        crash_point(f"renamed onto {path.name}")
    except Exception as e:
        _failed_write(path, e)
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` as a whole.

    For outputs made of several files that only make sense together (a model's weights and its
    config): a reader finds the old folder, the new one, or — for the instant between two renames,
    or after a crash in that instant — no folder (a clear "not found"), never old and new files
    mixed. Leftovers of a killed writer are removed by :func:`remove_stale_temps` on the parent.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OvdError(f"cannot write folder {path}: a file of that name exists")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OvdError(f"cannot write {path}: {e.strerror or e}") from None
    _plain_mode(tmp, 0o777)  # mkdtemp creates 0700
    old = tmp.with_name(tmp.name[: -len(".tmp")] + ".old.tmp")
    try:
        yield tmp
        crash_point(f"written {tmp.name}/")
        if path.exists():
            os.replace(path, old)
            crash_point(f"moved {path.name} aside")
        os.replace(tmp, path)
        crash_point(f"renamed onto {path.name}/")
    except Exception as e:
        _failed_write(path, e)
        raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


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


def file_sha1(path) -> str:
    """SHA-1 of a file's bytes, read in 1 MiB blocks (0.27 s for a 448 MB file, page-cached, on the
    2-core development machine: a few percent of parsing COCO's train JSON, which it runs beside)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
