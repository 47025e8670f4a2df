"""The disk tier's health while it runs: corruption, a data file deleted or replaced under
it, I/O errors, a full file system. The tier is a cache, so none of these may stop the
daemon: the tier detects them, counts them, says why in `stats()`, and is disabled (reads
miss, writes and flushes fail with a typed error) while the pool goes on serving.

A tier disabled for corruption leaves a `CORRUPT` marker file in its directory, so the next
start moves it aside (disk_check.py) without having to find the damage again.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import lmdb

from kvstore.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

MARKER = "CORRUPT"  # in the tier's directory: the next start moves the tier aside
# lmdb errors that mean the file's structure is damaged (not a full map, not an I/O error).
CORRUPTION = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.BadDbiError,
    lmdb.BadTxnError,
    lmdb.BadValsizeError,
    lmdb.InvalidError,
    lmdb.VersionMismatchError,
    lmdb.PanicError,
    lmdb.IncompatibleError,
    lmdb.PageFullError,
    lmdb.CursorFullError,
)


class DiskUnavailable(Unavailable):
    """The disk tier is disabled (corrupt, its file deleted, failing I/O): the reason says why."""


class DiskWriteError(Unavailable):
    """A flush could not acknowledge everything before it: some batches failed (logged)."""


class DiskFull(ResourceExhausted):
    """The disk tier's file system is full: writes since the last flush were dropped."""


def is_io_error(e: BaseException) -> bool:
    """An lmdb (or OS) error from the device or the file system, not from LMDB's structure.
    LMDB reports a short write (ENOSPC underneath) as EIO."""
    if isinstance(e, OSError):
        return True
    if isinstance(e, lmdb.Error) and not isinstance(e, (lmdb.MapFullError, *CORRUPTION)):
        text = str(e).lower()
        return any(s in text for s in ("input/output", "no space", "disk quota", "read-only file"))
    return False


def fs_free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskHealth:
    """Shared by the tier (reads), its writer thread and stats; `fail` is idempotent."""

    def __init__(self, path: Path, moved_aside: str = "") -> None:
        self.path = path
        self.reason = ""  # why the tier is disabled; "" while it works
        self.moved_aside = moved_aside  # where the start check moved a corrupt tier, if it did
        self.counters = dict.fromkeys(
            ("io_errors", "fs_full_errors", "file_lost", "corruption_errors", "read_errors"), 0
        )
        self._lock = threading.Lock()
        data = path / "data.mdb"
        # Our own descriptor of the data file: st_nlink drops to 0 when it is deleted, and
        # the path's inode differs when it was replaced, even while LMDB's map keeps working.
        self._fd = os.open(data, os.O_RDONLY | os.O_CLOEXEC)
        self._ino = os.fstat(self._fd).st_ino

    @property
    def ok(self) -> bool:
        return not self.reason

    def check(self) -> None:
        """Raise DiskUnavailable if the tier is disabled, or if its data file is no longer
        the one at its path (deleted, the directory removed, replaced): then disable it."""
        if self.reason:
            raise DiskUnavailable(self.reason)
        lost = self.file_lost()
        if lost:
            self.count("file_lost")
            self.fail(lost)
            raise DiskUnavailable(self.reason)

    def file_lost(self) -> str:
        try:
            if os.fstat(self._fd).st_nlink == 0:
                return f"disk tier {self.path}: its data file was deleted while open"
            if os.stat(self.path / "data.mdb").st_ino != self._ino:
                return f"disk tier {self.path}: its data file was replaced while open"
        except FileNotFoundError:
            return f"disk tier {self.path}: its directory or data file is gone"
        except OSError as e:
            return f"disk tier {self.path}: cannot stat its data file: {e}"
        return ""

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def corrupt(self, e: BaseException) -> None:
        """LMDB found its own structure damaged: disable the tier and mark it for the next
        start to move aside."""
        self.count("corruption_errors")
        first = self.fail(f"disk tier {self.path} is corrupt ({type(e).__name__}: {e})")
        if first:
            try:
                (self.path / MARKER).write_text(self.reason + "\n")
            except OSError as err:
                log.error("disk tier %s: cannot write the %s marker: %s", self.path, MARKER, err)

    def fail(self, reason: str) -> bool:
        """Disable the tier (reads miss, writes fail); True if this call did it."""
        with self._lock:
            if self.reason:
                return False
            self.reason = reason
        log.error("%s; disk tier disabled, serving from the pool only until a restart", reason)
        return True

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        out["disabled"] = self.reason
        out["moved_aside"] = self.moved_aside
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
