"""A fake device pool for CI: shared memory behind the rules a GPU pool imposes.

CI has no GPU, but the store and client logic a GPU pool needs (seal after sync, the
quarantine of a dead client's pages, epochs, restarts, copies through staging) must run
there. This backend keeps the pages in a memfd (handed over the pool socket like a CPU pool's,
but read-write to every scope: the client keeps shared counters in it) that only the fake
device's own code may touch, and enforces what a CUDA pool cannot check but relies on:

- a handle opens only in a process that "has" the same fake device (the client reads
  `KVSTORE_FAKE_DEVICES`, a comma list of ids): a wrong or missing device is a loud error;
- the daemon never addresses the pages from the host (no `host_view`): the tiers go
  through `copy_out`/`copy_in` staging, as they must for device memory;
- a client's writes reach the pool only when it synchronizes (the client side keeps
  them in private buffers until then), and every page it touched since its last sync
  counts as unsynchronized here: `unsynced` lets the store refuse such a Commit;
- memory stays while mapped: clients count themselves in the header, and closing the
  pool while one still maps it is logged as the error it would be with cudaFree.

Layout of the memfd (the client's side is kvstore_client/_fake_device.py):
`[0, nbytes)` pages | `nbytes`: 4 KiB header (magic, mappers u32 at +8, syncs u64 at
+16) | `nbytes + 4096`: one u32 per page, how many processes touched it since their sync.
"""

from __future__ import annotations

import logging
import mmap
import struct

from kvstore.memory.backend import HandleType, PoolHandle, SyncMode, boot_id
from kvstore.memory.shm_pool import ShmPool
from kvstore.memory.staging import DEFAULT_STAGING_BYTES, Copy, StagedPool

log = logging.getLogger(__name__)

MAGIC = b"KVFAKEDV"
HEADER = 4096
PREFIX = "fake:"


def state_bytes(num_pages: int) -> int:
    return HEADER + -(-4 * num_pages // 4096) * 4096


class FakeDevicePool(StagedPool):
    """The daemon's side of a fake device pool."""

    freed_while_mapped = 0  # (process-wide: tests read it through the daemon's log)

    def __init__(
        self,
        shm: ShmPool,
        device: str,
        nbytes: int,
        page_stride: int,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        # A plain arena (nothing to pin) whose copies complete only at `_wait`, like a
        # device's: staging code that reads a buffer before waiting reads garbage here.
        # Anonymous memory, so its pages are zeroed when first touched (a bytearray wrote all
        # 256 MiB up front: ~120 ms a pool, most of what CI's fake-device tests spent).
        super().__init__(memoryview(mmap.mmap(-1, staging_bytes)))
        self._in_flight: list[tuple[int, bool, Copy]] = []  # (its number, to the device?, copy)
        self._started = 0  # copies started, ever
        self._shm = shm
        self._nbytes = nbytes
        self._stride = page_stride
        self.handle = PoolHandle(
            HandleType.FAKE_DEVICE,
            device,
            shm.epoch,
            nbytes,
            ipc_handle=shm.name.encode(),
            alloc_nbytes=shm.nbytes,
            host_id=boot_id(),
            sync_mode=SyncMode.BEFORE_COMMIT,
        )
        shm.mapping[nbytes : nbytes + len(MAGIC)] = MAGIC

    @classmethod
    def create_for(
        cls,
        prefix: str,
        namespace: str,
        device: str,
        page_stride: int,
        num_pages: int,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> FakeDevicePool:
        nbytes = page_stride * num_pages
        shm = ShmPool.create_for(prefix, namespace, nbytes + state_bytes(num_pages))
        log.info("namespace %s: fake device %s (CI only), %d bytes", namespace, device, nbytes)
        return cls(shm, device, nbytes, page_stride, staging_bytes)

    def open_fd(self, writable: bool) -> int:
        """Read-write whatever the scope: a reader's mapping counts its touches in the state.
        CI only: no security claim is made for the fake device."""
        return self._shm.open_fd(True)

    def _to_host_async(self, copies: list[Copy]) -> None:
        for _, view in copies:
            view[:] = b"\xee" * len(view)  # what a read before the wait would see: not the page
        self._start(False, copies)

    def _to_device_async(self, copies: list[Copy]) -> None:
        self._start(True, copies)

    def _start(self, up: bool, copies: list[Copy]) -> None:
        for c in copies:
            self._in_flight.append((self._started, up, c))
            self._started += 1

    def _mark(self) -> int:
        return self._started

    def _wait(self, mark: object = None) -> None:
        end = self._started if mark is None else mark
        m = self._shm.mapping
        while self._in_flight and self._in_flight[0][0] < end:  # type: ignore[operator]
            _, up, (offset, view) = self._in_flight.pop(0)
            if up:
                m[offset : offset + len(view)] = view
            else:
                view[:] = m[offset : offset + len(view)]

    def _counter_at(self, offset: int) -> int:
        return self._nbytes + HEADER + 4 * (offset // self._stride)

    def unsynced(self, offsets: list[int]) -> list[int]:
        m = self._shm.mapping
        return [o for o in offsets if struct.unpack_from("<I", m, self._counter_at(o))[0]]

    def dropped(self, offset: int) -> None:
        super().dropped(offset)
        # A page is freed only once nobody can write it any more (released after a sync, or
        # its dead writer's quarantine is over): whatever it counted is moot.
        struct.pack_into("<I", self._shm.mapping, self._counter_at(offset), 0)

    @property
    def mappers(self) -> int:
        return struct.unpack_from("<I", self._shm.mapping, self._nbytes + 8)[0]

    @property
    def syncs(self) -> int:
        return struct.unpack_from("<Q", self._shm.mapping, self._nbytes + 16)[0]

    def still_mapped(self) -> bool | None:
        return self.mappers > 0

    def close(self) -> None:
        if self._shm.closed:
            return
        mappers = self.mappers
        if mappers:
            FakeDevicePool.freed_while_mapped += 1
            log.error(
                "fake device %s: pool freed while %d client(s) still map it (with CUDA, cudaFree "
                "under importers is undefined)",
                self.handle.device,
                mappers,
            )
        self._shm.close()
