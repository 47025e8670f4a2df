"""The client's side of CI's fake device (the daemon's: kvstore/memory/fake_device.py).

It behaves as device memory does where the store's correctness depends on it:
- it opens only in a process that has the same fake device (`KVSTORE_FAKE_DEVICES`, a
  comma list of ids; a GPU process sees only its own GPUs' UUIDs);
- a page view is this process's private buffer ("device work in flight"): writes into it
  reach the pool only when an event recorded after them is synchronized, and every page
  touched since counts as unsynchronized in the pool's state, so a Commit sent before the
  sync is refused by the daemon (seal after sync);
- the mapping counts itself in the pool's header until it is closed (memory stays while
  mapped: the daemon logs an error if it frees a pool a client still maps).
A view is good until the sync after it: take views again after a Commit or a Release.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from typing import TYPE_CHECKING

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from .errors import PoolError, UnsupportedDevice
from .pool import _check_geometry, torch_dtype
from .pool_fd import PoolFd

if TYPE_CHECKING:
    import torch

MAGIC = b"KVFAKEDV"
HEADER = 4096
DEVICES_ENV = "KVSTORE_FAKE_DEVICES"


class _Touched:
    """An event recorded after the work on some pages: synchronizing it lands them."""

    def __init__(self, mapping: FakeDeviceMapping, pages: dict[int, tuple[bytearray, bytes]]) -> None:
        self.mapping = mapping
        self.pages = pages

    def synchronize(self) -> None:
        self.mapping._land(self.pages)


class FakeDeviceMapping:
    def __init__(self, d: pb.PoolDescriptor, fd: int, mm: mmap.mmap) -> None:
        self.descriptor = d
        self.dtype = torch_dtype(d.dtype)
        self.page_shape = tuple(int(x) for x in d.page_shape)
        self.num_pages, self.offset = int(d.num_pages), int(d.offset)
        self.page_bytes, self.page_stride = int(d.page_bytes), int(d.page_stride)
        _check_geometry(d, self.dtype, int(d.nbytes))
        self._fd = fd  # for fcntl record locks on the shared state (the daemon's flock is apart)
        self._mm: mmap.mmap | None = mm
        self._state = int(d.nbytes)
        self._lock = threading.Lock()
        self._touched: dict[int, tuple[bytearray, bytes]] = {}  # slot -> (our buffer, bytes seen)
        self._add(self._state + 8, +1)  # one more mapper

    @classmethod
    def open(cls, d: pb.PoolDescriptor, fetched: PoolFd | None) -> FakeDeviceMapping:
        ours = [x for x in os.environ.get(DEVICES_ENV, "").split(",") if x]
        fake_id = d.device.removeprefix("fake:")
        if fake_id not in ours:
            raise PoolError(
                f"pool on {d.device!r}: this process has no such device ({DEVICES_ENV}={ours}); "
                "a device handle opens only on its own device"
            )
        name = d.ipc_handle.decode(errors="replace")
        if d.alloc_nbytes < d.nbytes + HEADER:
            raise PoolError(f"pool on {d.device!r}: not a fake device handle ({d.ipc_handle!r})")
        if fetched is None or not fetched.writable:
            raise PoolError(f"pool on {d.device!r}: no read-write descriptor of it was fetched")
        fd = os.dup(fetched.fd)  # ours until close(); its record locks live on the shared file
        try:
            mm = mmap.mmap(fd, int(d.alloc_nbytes), flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        if mm[d.nbytes : d.nbytes + len(MAGIC)] != MAGIC:
            mm.close()
            os.close(fd)
            raise PoolError(f"pool on {d.device!r}: {name} is not a fake device pool")
        return cls(d, fd, mm)

    def _add(self, at: int, delta: int) -> None:
        """Add to a shared counter (u32), under a record lock: other processes add too."""
        mm = self._live()
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 8, at)
        try:
            (n,) = struct.unpack_from("<I", mm, at)
            struct.pack_into("<I", mm, at, max(0, n + delta))
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 8, at)

    def _live(self) -> mmap.mmap:
        if self._mm is None:
            raise PoolError(f"pool on {self.descriptor.device!r} is closed")
        return self._mm

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def nbytes(self) -> int:
        return int(self.descriptor.nbytes)

    def raw_page(self, slot: int) -> torch.Tensor:
        import torch

        if not 0 <= slot < self.num_pages:
            raise PoolError(f"slot={slot} is outside the pool (num_pages={self.num_pages})")
        with self._lock:
            got = self._touched.get(slot)
            if got is None:
                start = self.offset + slot * self.page_stride
                seen = bytes(self._live()[start : start + self.page_bytes])
                got = self._touched[slot] = (bytearray(seen), seen)
                self._add(self._state + HEADER + 4 * slot, +1)
        return torch.frombuffer(got[0], dtype=torch.uint8)

    def page(self, slot: int) -> torch.Tensor:
        return self.raw_page(slot).view(self.dtype).view(self.page_shape)

    def pages(self, slots: list[int]) -> list[torch.Tensor]:
        return [self.page(int(s)) for s in slots]

    def view(self) -> torch.Tensor:
        raise UnsupportedDevice("the fake device hands out page views only (page(), pages())")

    def rows(self) -> torch.Tensor:
        raise UnsupportedDevice(
            "the fake device hands out page views only: the fast path's put/get copies (rows()) "
            "are not supported on it; use allocate/append/commit and lookup"
        )

    @property
    def syncs(self) -> int:
        """Syncs of this pool by every process so far (the fake device records them)."""
        return struct.unpack_from("<Q", self._live(), self._state + 16)[0]

    @property
    def pending(self) -> int:
        """Pages this process touched since its last sync."""
        return len(self._touched)

    def record(self) -> _Touched | None:
        with self._lock:
            pages, self._touched = self._touched, {}
        return _Touched(self, pages) if pages else None

    def synchronize(self) -> None:
        event = self.record()
        if event is not None:
            event.synchronize()

    def _land(self, pages: dict[int, tuple[bytearray, bytes]]) -> None:
        mm = self._live()
        for slot, (buf, seen) in pages.items():
            if buf != seen:  # only what we wrote: a read must not put back stale bytes
                start = self.offset + slot * self.page_stride
                mm[start : start + self.page_bytes] = buf
            self._add(self._state + HEADER + 4 * slot, -1)
        with self._lock:
            at = self._state + 16
            struct.pack_into("<Q", mm, at, struct.unpack_from("<Q", mm, at)[0] + 1)

    def close(self) -> None:
        """Wait for our work on the pool (land it), then unmap."""
        if self._mm is None:
            return
        self.synchronize()
        self._add(self._state + 8, -1)
        mm, self._mm = self._mm, None
        mm.close()
        os.close(self._fd)

    def __repr__(self) -> str:
        return f"FakeDeviceMapping({self.descriptor.device!r}, {'closed' if self.closed else 'open'})"
