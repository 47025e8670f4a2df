"""The CUDA pool backend: one raw device allocation per namespace, shared over CUDA IPC.

docs/gpu.md and ../shared/design/GPU.md say why this shape:
- `cupy.cuda.runtime.malloc` is a plain cudaMalloc. Never CuPy's memory pool nor torch's
  caching allocator: their blocks are sub-allocations, and an IPC handle names a whole
  allocation.
- `ipcGetMemHandle` gives the 64 bytes a client opens once per process
  (`ipcOpenMemHandle`); they travel in the PoolDescriptor with the device's UUID (never an
  ordinal: CUDA_VISIBLE_DEVICES renumbers) and the host's boot id.
- The tiers copy through host staging (staging.py): a pinned arena allocated here once,
  copies on the copy engines (`cudaMemcpyAsync` on a stream of the pool's own, pages next to
  each other in both places merged into one copy), one wait a chunk or a batch. The daemon
  cannot see a client's syncs, so `unsynced` is always [] here and the client library does
  seal after sync.
- `close` frees the allocation. Importers that still map it make that undefined, so the
  daemon's stop waits a grace for clients to unmap first (docs/gpu.md, "Lifecycle").

CuPy is imported only when a CUDA pool is made: the CPU daemon never needs it. Not
verified without a GPU: tools/gpu_check.py runs what a GPU machine can check.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from kvstore.memory.backend import HandleType, PoolHandle, SyncMode, boot_id, new_epoch
from kvstore.memory.staging import DEFAULT_STAGING_BYTES, MIN_STAGING_BYTES, Copy, StagedPool

log = logging.getLogger(__name__)

# The longest merged copy: ~0.15 ms at 55 GB/s, so the copy engine starts on a batch's first
# pages while the rest are still being gathered.
MAX_RUN = 8 << 20


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            "a cuda: pool needs CuPy (pip install 'kvstore[cuda]', or cupy-cuda13x on CUDA 13)"
        ) from e
    return cupy


def device_id(cupy: Any, ordinal: int) -> str:
    """The device's name that no CUDA_VISIBLE_DEVICES renumbers: `GPU-<uuid>` from CUDA's 16
    uuid bytes; `PCI-<bus id>` when CuPy does not give all 16 (its char[16] may come back
    cut at a zero byte: unverified, so never guessed). The client computes it the same way
    (kvstore_client/_cuda_pool.py)."""
    raw = cupy.cuda.runtime.getDeviceProperties(ordinal).get("uuid")
    if isinstance(raw, bytes | bytearray) and len(raw) == 16:
        h = bytes(raw).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
    return "PCI-" + cupy.cuda.runtime.deviceGetPCIBusId(ordinal)


def device_uuids(cupy: Any) -> list[str]:
    """The id of each device this process sees, by ordinal."""
    return [device_id(cupy, i) for i in range(cupy.cuda.runtime.getDeviceCount())]


def resolve(device: str, cupy: Any) -> tuple[int, str]:
    """`cuda:N` or `cuda:GPU-<uuid>` -> (ordinal in this process, UUID)."""
    which = device.removeprefix("cuda:")
    uuids = device_uuids(cupy)
    if which.isdigit():
        if int(which) >= len(uuids):
            raise ValueError(f"device={device!r}: this process sees {len(uuids)} CUDA device(s)")
        return int(which), uuids[int(which)]
    if which not in uuids:
        raise ValueError(f"device={device!r}: no visible CUDA device has that UUID (visible: {uuids})")
    return uuids.index(which), which


class CudaPool(StagedPool):
    """A namespace's pool in device memory."""

    def __init__(
        self,
        cupy: Any,
        ordinal: int,
        uuid: str,
        ptr: int,
        nbytes: int,
        epoch: int,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        staging_bytes = max(MIN_STAGING_BYTES, staging_bytes)
        with cupy.cuda.Device(ordinal):
            ipc = bytes(cupy.cuda.runtime.ipcGetMemHandle(ptr))
            # Our own stream, not blocking on the default one: the engine's work on the
            # default stream neither waits for nor delays the tier copies.
            self._stream = cupy.cuda.Stream(non_blocking=True)
            # Pinned once, here (pinning is slow); numpy's view holds the allocation alive
            # for as long as any staged buffer cut from it.
            # (Not CuPy's pinned pool: it would keep the memory after the pool is closed.)
            self._pinned = cupy.cuda.PinnedMemoryPointer(cupy.cuda.PinnedMemory(staging_bytes), 0)
        arena = np.frombuffer(self._pinned, dtype=np.uint8, count=staging_bytes)
        super().__init__(memoryview(arena))
        self._cupy = cupy
        self._ordinal = ordinal
        self._ptr = ptr
        self.handle = PoolHandle(
            HandleType.CUDA_IPC,
            f"cuda:{uuid}",
            epoch,
            nbytes,
            ipc_handle=ipc,
            alloc_nbytes=nbytes,
            host_id=boot_id(),
            sync_mode=SyncMode.BEFORE_COMMIT,
        )

    @classmethod
    def create(cls, device: str, nbytes: int, staging_bytes: int = DEFAULT_STAGING_BYTES) -> CudaPool:
        cupy = _cupy()
        ordinal, uuid = resolve(device, cupy)
        with cupy.cuda.Device(ordinal):
            ptr = cupy.cuda.runtime.malloc(nbytes)  # raw cudaMalloc: one allocation, one handle
            try:
                cupy.cuda.runtime.memset(ptr, 0, nbytes)
                pool = cls(cupy, ordinal, uuid, ptr, nbytes, new_epoch(), staging_bytes)
            except BaseException:
                cupy.cuda.runtime.free(ptr)
                raise
        log.info("created CUDA pool on %s (ordinal %d here): %d bytes", uuid, ordinal, nbytes)
        return pool

    def _to_host_async(self, copies: list[Copy]) -> None:
        runs = merged_runs((_address(view), self._ptr + offset, len(view)) for offset, view in copies)
        self._issue(runs, self._cupy.cuda.runtime.memcpyDeviceToHost)

    def _to_device_async(self, copies: list[Copy]) -> None:
        runs = merged_runs((self._ptr + offset, _address(view), len(view)) for offset, view in copies)
        self._issue(runs, self._cupy.cuda.runtime.memcpyHostToDevice)

    def _issue(self, runs: Iterator[tuple[int, int, int]], kind: int) -> None:
        runtime, stream = self._cupy.cuda.runtime, self._stream.ptr
        with self._cupy.cuda.Device(self._ordinal):
            for dst, src, n in runs:
                runtime.memcpyAsync(dst, src, n, kind, stream)

    def _mark(self) -> Any:
        with self._cupy.cuda.Device(self._ordinal):  # (an event belongs to the current device)
            event = self._cupy.cuda.Event(block=False, disable_timing=True)
            event.record(self._stream)
        return event

    def _wait(self, mark: Any = None) -> None:
        if mark is None:
            self._stream.synchronize()
        else:
            mark.synchronize()

    def unsynced(self, offsets: list[int]) -> list[int]:
        return []  # invisible from here: the client library seals after sync

    def still_mapped(self) -> bool | None:
        return None  # CUDA does not say who has opened a handle

    def close(self) -> None:
        if not self._ptr:
            return
        ptr, self._ptr = self._ptr, 0
        with self._cupy.cuda.Device(self._ordinal):
            self._stream.synchronize()  # no copy may outlive the memory it reads or writes
            self._cupy.cuda.runtime.free(ptr)
        log.info("freed CUDA pool on %s", self.handle.device)


def _address(view: memoryview) -> int:
    # (ctypes over numpy: a few times cheaper a page; every staged buffer is writable)
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def merged_runs(
    copies: Iterable[tuple[int, int, int]], max_run: int = MAX_RUN
) -> Iterator[tuple[int, int, int]]:
    """(dst, src, n) copies in order, each run of them that continues the one before it in
    both places made one copy of at most `max_run` bytes (more than one page only if they
    fit). Lazy: a run is issued while the next is still being gathered."""
    run: tuple[int, int, int] | None = None
    for dst, src, n in copies:
        if run is not None:
            d, s, m = run
            if d + m == dst and s + m == src and m + n <= max_run:
                run = (d, s, m + n)
                continue
            yield run
        run = (dst, src, n)
    if run is not None:
        yield run
