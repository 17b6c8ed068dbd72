"""One writer per output: a lock file held with ``flock`` for as long as a command writes.

Why ``flock`` rather than "create the file if absent": the kernel drops the lock when its process
dies, however it dies (``kill -9`` included), so a lock left behind by a dead process is stale by
construction and the next writer simply takes it — no PID guessing, no manual clean-up. The file
holds the holder's PID and host so that a refused writer can say who holds it.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from ovd.errors import OvdError
from ovd.utils.io import write_error


class OutputLock:
    """``with OutputLock(path, what):`` — exclusive, non-blocking; a second writer gets one clear error.

    ``path`` is the lock file (created if needed, never deleted: deleting it would let two
    processes hold locks on two different inodes of the same name).
    """

    def __init__(self, path: str | os.PathLike, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self._made_folder = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OvdError(f"cannot create lock file {self.path}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise OvdError(
                f"{self.what} is in use by {holder} (lock {self.path}): wait for it to finish, or write elsewhere"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError as e:  # a full disk
            os.close(fd)
            raise write_error(self.path, e) from None
        self._fd = fd
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._fd is not None:
            try:
                if exc_type is not None and self._made_folder:
                    self._remove_if_alone()
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)  # closing the last descriptor releases the flock
                self._fd = None

    def _remove_if_alone(self) -> None:
        """A refused command that made its output folder leaves no folder holding only this lock.
        Done while the lock is held; a folder with anything else in it is kept, lock and all."""
        try:
            if [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
                self.path.unlink()
                self.path.parent.rmdir()
        except OSError:
            pass
