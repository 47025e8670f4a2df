"""Which backend a namespace's `device` names: `cpu` (a memfd), `cuda:...` (CUDA IPC), `fake:...` (CI),
`auto` (a GPU when one can be used, else `cpu`: auto_device.py)."""

from __future__ import annotations

import re

from kvstore.memory.backend import PoolBackend
from kvstore.memory.shm_pool import ShmPool
from kvstore.memory.staging import DEFAULT_STAGING_BYTES

DEVICE_RE = re.compile(
    r"cpu|auto|cuda:(\d{1,3}|GPU-[0-9a-fA-F-]{1,64}|PCI-[0-9a-fA-F:.]{1,32})|fake:[A-Za-z0-9_.-]{1,64}"
)


def check_device(device: str) -> str:
    """'' when `device` names a backend, else what is wrong with it."""
    if device and not DEVICE_RE.fullmatch(device):
        return (
            f"device={device!r} is not 'cpu', 'auto', 'cuda:<ordinal>', 'cuda:GPU-<uuid>' (or 'cuda:PCI-<bus id>') or 'fake:<id>' "
            "(the CI fake device)"
        )
    return ""


def make_pool(
    prefix: str,
    namespace: str,
    device: str,
    page_stride: int,
    num_pages: int,
    staging_bytes: int = DEFAULT_STAGING_BYTES,
) -> PoolBackend:
    """A new pool (a new epoch) for `namespace` on `device`. Touches no metadata.
    `staging_bytes`: a device pool's host staging arena (kvstore/memory/staging.py)."""
    if device == "auto":
        from kvstore.memory.auto_device import resolve

        device = resolve(namespace)
    if device.startswith("cuda:"):
        from kvstore.memory.cuda_pool import CudaPool  # imports numpy; CuPy on first use

        return CudaPool.create(device, page_stride * num_pages, staging_bytes)
    if device.startswith("fake:"):
        from kvstore.memory.fake_device import FakeDevicePool

        return FakeDevicePool.create_for(prefix, namespace, device, page_stride, num_pages, staging_bytes)
    return ShmPool.create_for(prefix, namespace, page_stride * num_pages)
