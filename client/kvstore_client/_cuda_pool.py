"""A CUDA IPC pool, mapped once per process (the daemon's side: kvstore/memory/cuda_pool.py).

`ipcOpenMemHandle` (once per process: mappings of one handle share it) on the device whose UUID the descriptor names (never an ordinal: this
process's CUDA_VISIBLE_DEVICES may number it differently), wrapped without a copy:
`cupy.cuda.UnownedMemory` -> `cupy.ndarray` -> `torch.from_dlpack`. The mapping owns the
base tensor every page view is cut from; `close` synchronizes, drops it and closes the
handle (a view kept past `close` is the caller's bug: its memory is gone). CuPy is imported
here only, when a CUDA pool is opened. Not verified without a GPU: tools/gpu_check.py.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from .errors import PoolError
from .pool import PoolMapping, _check_geometry, torch_dtype

log = logging.getLogger(__name__)


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise PoolError(
            "this pool is in GPU memory (CUDA IPC) and CuPy is not installed: pip install "
            "'kvstore[cuda]' (or cupy-cuda13x on CUDA 13)"
        ) from e
    return cupy


def visible_uuids(cupy: Any) -> list[str]:
    """The devices this process sees, by its ordinals, named as the daemon names them
    (kvstore/memory/cuda_pool.py `device_id`: `GPU-<uuid>`, else `PCI-<bus id>`)."""
    out = []
    for i in range(cupy.cuda.runtime.getDeviceCount()):
        raw = cupy.cuda.runtime.getDeviceProperties(i).get("uuid")
        if isinstance(raw, bytes | bytearray) and len(raw) == 16:
            h = bytes(raw).hex()
            out.append(f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}")
        else:
            out.append("PCI-" + cupy.cuda.runtime.deviceGetPCIBusId(i))
    return out


# A handle is opened once per process (CUDA refuses a second cudaIpcOpenMemHandle of it in
# the same context): every mapping of it here shares that pointer, the last one closes it.
_opened: dict[tuple[str, bytes], list[int]] = {}  # (device, handle) -> [pointer, mappings]
_opened_lock = threading.Lock()


def open_handle(cupy: Any, ordinal: int, key: tuple[str, bytes]) -> int:
    with _opened_lock:
        got = _opened.get(key)
        if got is None:
            with cupy.cuda.Device(ordinal):
                got = _opened[key] = [cupy.cuda.runtime.ipcOpenMemHandle(key[1]), 0]
        got[1] += 1
        return got[0]


def close_handle(cupy: Any, ordinal: int, key: tuple[str, bytes]) -> None:
    with _opened_lock:
        got = _opened[key]
        got[1] -= 1
        if got[1] == 0:
            del _opened[key]
            with cupy.cuda.Device(ordinal):
                cupy.cuda.runtime.ipcCloseMemHandle(got[0])


class CudaMapping(PoolMapping):
    """Page views (torch CUDA tensors) of a pool in another process's device allocation."""

    def __init__(self, d: pb.PoolDescriptor, cupy: Any, ordinal: int, ptr: int, base: Any) -> None:
        # (PoolMapping's constructor maps a file; everything else of it works on `_bytes`)
        self.descriptor = d
        self.dtype = torch_dtype(d.dtype)
        self.page_shape = tuple(int(x) for x in d.page_shape)
        self.num_pages, self.offset = int(d.num_pages), int(d.offset)
        self.page_bytes, self.page_stride = int(d.page_bytes), int(d.page_stride)
        _check_geometry(d, self.dtype, int(d.alloc_nbytes))
        self._mm = None
        self._cupy, self._ordinal, self._ptr = cupy, ordinal, ptr
        self._key = (d.device, bytes(d.ipc_handle))
        self._bytes = base
        self._rows = None  # (PoolMapping.rows, built on first use)
        self.torch_device = base.device

    @classmethod
    def open(cls, d: pb.PoolDescriptor, **_: Any) -> CudaMapping:  # type: ignore[override]
        import torch

        cupy = _cupy()
        uuid = d.device.removeprefix("cuda:")
        uuids = visible_uuids(cupy)
        if uuid not in uuids:
            raise PoolError(
                f"pool on {d.device!r}: this process sees no such GPU (visible: {uuids}); IPC works "
                "only on the same device (and not across MIG instances)"
            )
        ordinal = uuids.index(uuid)
        key = (d.device, bytes(d.ipc_handle))
        try:
            ptr = open_handle(cupy, ordinal, key)
        except Exception as e:  # loud: never a silent fallback to a slow path
            raise PoolError(
                f"pool on {d.device!r}: cudaIpcOpenMemHandle failed ({e}); the daemon and this "
                "process need the same GPU and a shared PID namespace (docs/gpu.md)"
            ) from e
        with cupy.cuda.Device(ordinal):
            n = int(d.alloc_nbytes)
            mem = cupy.cuda.UnownedMemory(ptr, n, d, ordinal)
            arr = cupy.ndarray((n,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            base = torch.from_dlpack(arr)
        try:
            return cls(d, cupy, ordinal, ptr, base)
        except BaseException:
            del base, arr
            close_handle(cupy, ordinal, key)
            raise

    def record(self) -> Any:
        """An event after the work queued so far on the stream of `device.stream(...)`, else
        on this thread's current stream."""
        import torch

        from ._stream import current_stream

        event = torch.cuda.Event()
        event.record(current_stream() or torch.cuda.current_stream(self.torch_device))
        return event

    def synchronize(self) -> None:
        self.record().synchronize()

    def close(self) -> None:
        if self._bytes is None:
            return
        self.synchronize()
        self._bytes = self._rows = None
        self._ptr = 0
        close_handle(self._cupy, self._ordinal, self._key)
        log.info("closed CUDA IPC mapping of %s", self.descriptor.device)

    def __repr__(self) -> str:
        return f"CudaMapping({self.descriptor.device!r}, {'closed' if self.closed else 'open'})"
