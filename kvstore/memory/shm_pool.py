"""The CPU pool backend: one POSIX shared-memory segment per namespace.

Created with mode 0600 under /dev/shm and backed at start (posix_fallocate), so a full
/dev/shm fails at start with a clear message instead of SIGBUS on first touch later.
Clients map the same file and read/write pages in place. We use os.open + mmap directly:
multiprocessing.shared_memory registers the segment with a resource tracker that unlinks
it when an attaching process exits (before Python 3.13).

Identity and liveness (docs/architecture.md, "Pool identity"):
- The segment name carries the pool's random epoch, so a name is never reused: a client
  that maps a name maps that pool or nothing, whatever daemon restarts happened (same pid
  in a container, a fresh IPC namespace), and a restarted daemon never meets its own old
  name (no EEXIST crash loop).
- The daemon holds an flock on every segment it owns for the segment's whole life. The
  kernel drops it when the daemon dies, even by kill -9, so "nobody holds the lock" is
  exactly "its daemon is gone": a starting daemon removes those segments and never a live
  daemon's (a pid check would see a just-killed daemon's zombie as alive, or a new
  process that got the old pid).

Backing: posix_fallocate allocates every page of the segment and releases the GIL while it
does. The daemon's own mapping is not prefaulted: MAP_POPULATE runs inside mmap(), which
CPython calls with the GIL held, and froze the whole daemon (every RPC, every lease) for
seconds per GiB. The pages are already allocated; the daemon's first touch of each costs a
minor fault.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from pathlib import Path

from kvstore.memory.backend import HandleType, PoolHandle, new_epoch

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")


def segment_name(prefix: str, pid: int, epoch: int, namespace: str) -> str:
    """`<prefix><pid>.<epoch>.<namespace>`: the pid is for operators only (liveness is the
    lock's job); the epoch makes the name unique to this pool."""
    return f"{prefix}{pid}.{epoch:016x}.{namespace}"


class ShmPool:
    """A page-aligned shared-memory segment: the first `PoolBackend`. Build it with
    `ShmPool.create`."""

    def __init__(self, handle: PoolHandle, fd: int, mapping: mmap.mmap) -> None:
        self.handle = handle
        self._fd = fd  # open, and flock()ed, for the pool's life
        self.mapping = mapping  # the daemon's own view (used by tiers and tests)

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def nbytes(self) -> int:
        return self.handle.nbytes

    @property
    def epoch(self) -> int:
        return self.handle.epoch

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @classmethod
    def create_for(cls, prefix: str, namespace: str, nbytes: int) -> ShmPool:
        """The pool of `namespace`, with a new epoch."""
        epoch = new_epoch()
        return cls.create(segment_name(prefix, os.getpid(), epoch, namespace), nbytes, epoch)

    @classmethod
    def create(cls, name: str, nbytes: int, epoch: int = 0) -> ShmPool:
        path = SHM_DIR / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            # Locked before it is backed or announced. Another daemon's sweep may lock and
            # unlink it in the instant between O_CREAT and here: then the name is gone and
            # we say so rather than serve a pool clients cannot open.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(errno.ENOENT, "removed by another daemon's start; retry", str(path))
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
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            os.close(fd)
            raise
        log.info("created pool segment /dev/shm/%s (%d bytes)", name, nbytes)
        handle = PoolHandle(HandleType.CPU_SHM, "cpu", epoch or new_epoch(), nbytes, 0, name)
        return cls(handle, fd, mapping)

    def host_view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.mapping)[offset : offset + nbytes]

    # Host memory: the tiers copy in place, and a client's store is visible at once.
    copy_out = copy_in = host_view

    def landed(self, offset: int) -> None:
        pass

    def dropped(self, offset: int) -> None:
        pass

    def unsynced(self, offsets: list[int]) -> list[int]:
        return []

    def still_mapped(self) -> bool | None:
        return None

    def close(self) -> None:
        """Unmap and unlink. Clients that still map it keep their memory until they unmap."""
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):
            self.mapping.close()  # fails while a view is alive; the unlink below still frees the name
        # Unlink while the lock is held, so no sweep can take this name for a dead one's.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)
        os.close(self._fd)
        self._fd = -1
        log.info("unlinked pool segment /dev/shm/%s", self.name)


def remove_stale_segments(prefix: str) -> list[str]:
    """Unlink the segments under `prefix` whose daemon is gone: those named as this version
    names them that no live daemon holds locked (kill -9 included), and those of the older
    `<prefix><pid>.<namespace>` naming (never locked) whose pid is dead or is our own (a
    restart that got its old pid back). Other names under the prefix are left alone."""
    removed = []
    for path in SHM_DIR.glob(f"{prefix}*"):
        pid, _, rest = path.name[len(prefix) :].partition(".")
        epoch, _, namespace = rest.partition(".")
        if not pid.isdigit() or not rest:
            continue
        if len(epoch) == 16 and namespace and all(c in "0123456789abcdef" for c in epoch):
            why = _unlink_if_unlocked(path)
        elif int(pid) == os.getpid() or not _pid_alive(int(pid)):
            why = _unlink(path, f"its daemon pid {pid} is gone")
        else:
            continue
        if why:
            removed.append(path.name)
            log.warning("removed stale pool segment /dev/shm/%s (%s)", path.name, why)
    return removed


def _unlink_if_unlocked(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return ""  # gone meanwhile, or not ours to open
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return ""  # a live daemon's
        # Still the file we locked? (its owner may have just unlinked it, and a new one
        # taken the name: that one is not ours to judge).
        with contextlib.suppress(FileNotFoundError):
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return _unlink(path, "no live daemon holds it")
        return ""
    finally:
        os.close(fd)


def _unlink(path: Path, why: str) -> str:
    try:
        path.unlink()
    except FileNotFoundError:
        return ""
    return why


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
