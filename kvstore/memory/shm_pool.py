"""The CPU pool: one POSIX shared-memory segment per namespace.

Created with mode 0600 under /dev/shm and backed at start (posix_fallocate),
so a full /dev/shm fails at start with a clear message instead of SIGBUS on
first touch later. Clients map the same file and read/write pages in place.
We use os.open + mmap directly: multiprocessing.shared_memory registers the
segment with a resource tracker that unlinks it when an attaching process
exits (before Python 3.13).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def segment_name(prefix: str, pid: int, namespace: str) -> str:
    """`<prefix><pid>.<namespace>`: the pid lets a later daemon find segments of dead ones."""
    return f"{prefix}{pid}.{namespace}"


class ShmPool:
    """A page-aligned shared-memory segment. Build it with `ShmPool.create`."""

    def __init__(self, name: str, nbytes: int, fd: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.nbytes = nbytes
        self._fd = fd
        self.mapping = mapping  # the daemon's own view (used by tiers and tests)

    @classmethod
    def create(cls, name: str, nbytes: int) -> ShmPool:
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the umask cannot widen it, but be explicit
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    free = os.statvfs(SHM_DIR)
                    raise OSError(
                        errno.ENOSPC,
                        f"/dev/shm has {free.f_bavail * free.f_frsize} bytes free but pool {name!r} "
                        f"needs {nbytes}; lower num_pages or enlarge /dev/shm (docker: --shm-size)",
                    ) from e
                raise
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | _populate_flag())
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        log.info("created pool segment /dev/shm/%s (%d bytes)", name, nbytes)
        return cls(name, nbytes, fd, mapping)

    def close(self) -> None:
        """Unmap and unlink. Clients that still map it keep their memory until they unmap."""
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):
            self.mapping.close()  # fails while a view is alive; the unlink below still frees the name
        os.close(self._fd)
        self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)
        log.info("unlinked pool segment /dev/shm/%s", self.name)


def _populate_flag() -> int:
    return getattr(mmap, "MAP_POPULATE", 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(prefix: str) -> list[str]:
    """Unlink segments named `<prefix><pid>.*` whose daemon pid is dead (left by kill -9)."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        pid_part = path.name[len(prefix) :].split(".", 1)[0]
        if not pid_part.isdigit() or _pid_alive(int(pid_part)):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path.name)
            log.warning("removed stale pool segment /dev/shm/%s (daemon pid %s is gone)", path.name, pid_part)
    return removed
