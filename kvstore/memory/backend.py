"""The seam between the store and a pool's memory: what a client needs to map a pool
(`PoolHandle`), and what the daemon does with the memory itself (`PoolBackend`).

Backends: anonymous shared memory (a memfd: kvstore/memory/shm_pool.py, the default), CUDA IPC
(kvstore/memory/cuda_pool.py, docs/gpu.md) and a fake device for CI that enforces the
device rules (kvstore/memory/fake_device.py). The store never sees more than this: it
addresses pages by byte offset, copies page bytes in and out for the tiers (`copy_out`,
`copy_in`: in place for shm, through host staging buffers for a device), asks a device
pool whether a client synchronized before it seals (`unsynced`), and hands the handle to
clients.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol


class HandleType(enum.IntEnum):
    """How a client maps the pool (the wire's PoolDescriptor.handle_type)."""

    CPU_MEMFD = 1  # a memfd: its descriptor comes over the pool socket (kvstore/server/pool_socket.py)
    CUDA_IPC = 2  # a cudaIpcMemHandle_t in `PoolHandle.ipc_handle`, opened once per process
    FAKE_DEVICE = 15  # CI only: a memfd behind the device rules (fake_device.py), fetched the same way


class SyncMode(enum.IntEnum):
    """What a client must do before Commit and Release (the wire's PoolDescriptor.sync_mode)."""

    NONE = 1  # host memory: a store through the mapping is visible at once
    BEFORE_COMMIT = 2  # device memory: wait for an event after the writes (reads) first


_BEFORE_COMMIT = SyncMode.BEFORE_COMMIT


@dataclass(frozen=True)
class PoolHandle:
    """Everything about a pool's memory a client needs, besides the page geometry.

    `epoch` identifies this pool: random per daemon start and namespace, never 0. Every
    reply that hands out slots carries it, and a client refuses slots of another epoch (a
    restarted daemon, a namespace deleted and created again) until it has mapped that pool.
    """

    handle_type: HandleType
    device: str  # "cpu", or "cuda:GPU-<uuid>" (never an ordinal: CUDA_VISIBLE_DEVICES renumbers)
    epoch: int
    nbytes: int  # size of the whole mapping
    offset: int = 0  # byte offset of page 0 inside the mapping
    name: str = ""  # CPU_MEMFD, FAKE_DEVICE: the memfd's name (for operators: /proc/<pid>/maps)
    ipc_handle: bytes = b""  # CUDA_IPC: the handle's bytes
    alloc_nbytes: int = 0  # device pools: bytes of the allocation behind the handle
    host_id: str = ""  # device pools: the host's boot id; a handle means nothing elsewhere
    sync_mode: SyncMode = SyncMode.NONE

    @property
    def on_device(self) -> bool:
        return self.sync_mode is _BEFORE_COMMIT  # (a plain name: see kvstore/memory/pages.py's)


class PoolBackend(Protocol):
    """One pool's memory, owned by the daemon. Loop-owned like the page table, except the
    tiers' copies into a buffer from `copy_in`, which may run on a tier's worker thread for
    a page the store has handed to that copy."""

    handle: PoolHandle

    def copy_out(self, offset: int, nbytes: int) -> memoryview:
        """The bytes of a page, for a copy below the pool (demotion, swap-out): in place
        for host memory, a host copy for a device (valid until the next call)."""
        ...

    def copy_out_many(self, offsets: Iterable[int], nbytes: int) -> Iterator[memoryview]:
        """`copy_out` of each page, in order, as one batch (a device copies a chunk at a time
        and waits once a chunk). A view is valid until the next one is drawn, the iterator
        until the next copy out."""
        ...

    def copy_in(self, offset: int, nbytes: int) -> memoryview:
        """Where a copy from below writes a page (promotion, swap-in): in place for host
        memory; for a device a host staging buffer, pushed to the device by `landed`."""
        ...

    def landed(self, offset: int) -> None:
        """The copy into `copy_in(offset)` is complete and the page is about to become
        visible (sealed, or handed to a sequence): a device pushes the staged bytes now. A
        seal calls it only for a pool whose handle is `on_device` (host pools stage nothing)."""
        ...

    def landed_many(self, offsets: Iterable[int]) -> None:
        """`landed` of each page, as one batch (a device waits once)."""
        ...

    def dropped(self, offset: int) -> None:
        """The page at `offset` was freed: forget a staged copy of it, if any."""
        ...

    def unsynced(self, offsets: list[int]) -> list[int]:
        """The offsets among these whose writes a client has not yet synchronized: a seal
        of them must be refused. Only a backend that can see it (the fake device) answers
        anything but []."""
        ...

    def still_mapped(self) -> bool | None:
        """Whether a client still maps the pool (None: the backend cannot tell)."""
        ...

    def close(self) -> None:
        """Give the memory back. Clients that still map it keep their mapping; they can
        never reach this pool's successor through it (a new pool has a new epoch)."""
        ...


def boot_id() -> str:
    """This host's boot id: a device handle is refused on any other host."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def new_epoch() -> int:
    """A pool epoch: 64 random bits, never 0 (0 on the wire means "no epoch")."""
    return secrets.randbits(64) or 1
