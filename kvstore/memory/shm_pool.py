"""The CPU pool backend: one anonymous shared-memory file (memfd) per namespace.

No name in /dev/shm: the pool is reachable only through a descriptor the daemon hands out,
after authentication, over its pool socket (kvstore/server/pool_socket.py, docs/security.md),
read-only to a reader and read-write to a writer. When the daemon dies the file goes with it
(clients that still map it keep their memory until they unmap), so nothing is ever left to
sweep at the next start, and nothing of one pool can be met by another (the epoch names the
pool on the wire, docs/architecture.md "Pool identity").

Backed at start (posix_fallocate), so too little memory fails at start with a clear message
instead of SIGBUS on first touch later; then sealed against shrinking and growing, so a
writer's descriptor cannot truncate the file under the daemon's (and every reader's) mapping.

posix_fallocate allocates every page and releases the GIL while it does. The daemon's own
mapping is not prefaulted: MAP_POPULATE runs inside mmap(), which CPython calls with the GIL
held, and froze the whole daemon (every RPC, every lease) for seconds per GiB. The pages are
already allocated; the daemon's first touch of each costs a minor fault.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
from collections.abc import Iterable, Iterator

from kvstore.memory.backend import HandleType, PoolHandle, new_epoch

log = logging.getLogger(__name__)

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def pool_name(prefix: str, epoch: int, namespace: str) -> str:
    """The memfd's name, for operators only (`/memfd:<name>` in the daemon's /proc maps)."""
    return f"{prefix}{epoch:016x}.{namespace}"


class ShmPool:
    """A page-aligned anonymous shared-memory file: the first `PoolBackend`. Build it with
    `ShmPool.create`."""

    def __init__(self, handle: PoolHandle, fd: int, mapping: mmap.mmap) -> None:
        self.handle = handle
        self._fd = fd  # the memfd, open for the pool's life
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
        return cls.create(pool_name(prefix, epoch, namespace), nbytes, epoch)

    @classmethod
    def create(cls, name: str, nbytes: int, epoch: int = 0) -> ShmPool:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(
                        e.errno,
                        f"not enough memory for pool {name!r} ({nbytes} bytes); lower num_pages "
                        "(or give the daemon's container more memory)",
                    ) from e
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        log.info("created pool memfd %s (%d bytes)", name, nbytes)
        handle = PoolHandle(HandleType.CPU_MEMFD, "cpu", epoch or new_epoch(), nbytes, 0, name)
        return cls(handle, fd, mapping)

    def open_fd(self, writable: bool) -> int:
        """A new descriptor of the pool for a client (close it once sent). Read-only is a
        separate open file description opened O_RDONLY: its holder can neither map it
        writable nor mprotect a mapping of it writable, nor truncate or fallocate it."""
        if self._fd < 0:
            raise OSError(errno.EBADF, f"pool {self.name!r} is closed")
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        return os.open(f"/proc/self/fd/{self._fd}", flags)

    def host_view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self.mapping)[offset : offset + nbytes]

    # Host memory: the tiers copy in place, and a client's store is visible at once.
    copy_out = copy_in = host_view

    def copy_out_many(self, offsets: Iterable[int], nbytes: int) -> Iterator[memoryview]:
        return (self.host_view(o, nbytes) for o in offsets)

    def landed(self, offset: int) -> None:
        pass

    def landed_many(self, offsets: Iterable[int]) -> None:
        pass

    def dropped(self, offset: int) -> None:
        pass

    def unsynced(self, offsets: list[int]) -> list[int]:
        return []

    def still_mapped(self) -> bool | None:
        return None

    def close(self) -> None:
        """Unmap and close. Clients that still map it keep their memory until they unmap;
        the memory is freed when the last mapping and descriptor are gone."""
        if self._fd < 0:
            return
        with contextlib.suppress(BufferError):
            self.mapping.close()  # fails while a view is alive; freed with the last view then
        os.close(self._fd)
        self._fd = -1
        log.info("closed pool memfd %s", self.name)
