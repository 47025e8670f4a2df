"""The seam between the store and a pool's memory: what a client needs to map a pool
(`PoolHandle`), and what the daemon does with the memory itself (`PoolBackend`).

The shared-memory pool (kvstore/memory/shm_pool.py) is the first backend; a GPU pool
(CUDA IPC, design/GPU.md) is meant to be the next one. The store never sees more than
this: it addresses pages by byte offset, copies page bytes in and out for the tiers, and
hands the handle to clients.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Protocol


class HandleType(enum.IntEnum):
    """How a client maps the pool (the wire's PoolDescriptor.handle_type)."""

    CPU_SHM = 1  # a file under /dev/shm, named by `PoolHandle.name`
    CUDA_IPC = 2  # a cudaIpcMemHandle_t in `PoolHandle.ipc_handle`, opened once per process


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
    name: str = ""  # CPU_SHM: file name under /dev/shm
    ipc_handle: bytes = b""  # CUDA_IPC: the handle's bytes


class PoolBackend(Protocol):
    """One pool's memory, owned by the daemon. Loop-owned like the page table, except that
    the tiers' copies through `host_view`, which may run on a tier's worker thread for a
    page the store has handed to that copy."""

    handle: PoolHandle

    def host_view(self, offset: int, nbytes: int) -> memoryview:
        """Host-addressable bytes of the pool: the tiers copy pages out of it (demotion,
        swap-out) and into it (promotion, swap-in) through this view, in place. A device
        backend will add explicit copies (staging buffers, streams) here: this is the one
        place the tiers touch pool memory."""
        ...

    def close(self) -> None:
        """Give the memory back. Clients that still map it keep their mapping; they can
        never reach this pool's successor through it (a new pool has a new epoch)."""
        ...


def new_epoch() -> int:
    """A pool epoch: 64 random bits, never 0 (0 on the wire means "no epoch")."""
    return secrets.randbits(64) or 1
