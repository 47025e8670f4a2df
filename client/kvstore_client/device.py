"""Device pools on the client: which mapping a descriptor needs, and the sync events.

A CPU pool (a memfd, `pool.PoolMapping`) needs no sync: a store through the mapping is
visible at once. A device pool (`sync_mode == SYNC_BEFORE_COMMIT`) is written and read by
kernels on streams, so the library waits for an event recorded after this process's work
before it sends Commit (seal after sync) and before it releases pages (release after
sync): `record()` on the caller's thread, `synchronize()` off the event loop (aio). The
mappings: `_cuda_pool.CudaMapping` (CUDA IPC, CuPy imported only then) and
`_fake_device.FakeDeviceMapping` (CI's fake device). docs/gpu.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Protocol

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from ._stream import current_stream, stream  # noqa: F401  (the public name: device.stream)
from .errors import PoolError

log = logging.getLogger(__name__)


class Event(Protocol):
    def synchronize(self) -> None: ...


class Events:
    """Several recorded events, waited for together."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events

    @classmethod
    def of(cls, events: Iterable[Event | None]) -> Events | None:
        got = [e for e in events if e is not None]
        return cls(got) if got else None

    def synchronize(self) -> None:
        for e in self.events:
            e.synchronize()


class AllPools:
    """A Call's `sync_first` for every pool a client maps (ReleasePin, CloseSession)."""

    def __init__(self, namespaces: dict[str, Any]) -> None:
        self.namespaces = namespaces

    def record(self) -> Events | None:
        return Events.of(ns.record() for ns in list(self.namespaces.values()))


def sync_event(call: Any) -> Event | None:
    """The event to wait for before sending `call` (a `_wire.Call`), recorded now."""
    return call.sync_first.record() if call.sync_first is not None else None


def synchronize(call: Any) -> None:
    event = sync_event(call)
    if event is not None:
        event.synchronize()


def close_device_pools(namespaces: dict[str, Any]) -> None:
    """The daemon is gone (or going): wait for our device work, drop the views and close
    each device mapping, so a dead daemon's memory is not held by us (an exporter's
    allocation lives while any importer maps it). A new client maps the new epoch."""
    for ns in list(namespaces.values()):
        if ns.info.pool.sync_mode == pb.SYNC_BEFORE_COMMIT:
            try:
                ns.close()
            except Exception:  # the stream's end must be reported whatever this does
                log.exception("closing the mapping of %s after the daemon went away", ns.name)


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def check_host(d: pb.PoolDescriptor) -> None:
    """A device handle means something only on the host that made it."""
    if d.host_id and d.host_id != boot_id():
        raise PoolError(
            f"pool on {d.device!r} was made on host {d.host_id!r}, not this one ({boot_id()!r}): "
            "a device handle cannot be opened from another host"
        )


def open_device_pool(d: pb.PoolDescriptor, fetched: Any = None) -> Any:
    """The mapping of a device pool (loud errors, never a silent fallback to a slow path).
    `fetched`: the fake device's descriptor (a kvstore_client.pool_fd.PoolFd)."""
    check_host(d)
    if d.handle_type == pb.CUDA_IPC:
        from ._cuda_pool import CudaMapping

        return CudaMapping.open(d)
    if d.handle_type == pb.FAKE_DEVICE:
        from ._fake_device import FakeDeviceMapping

        return FakeDeviceMapping.open(d, fetched)
    raise PoolError(f"pool on {d.device!r}: handle_type={d.handle_type} is not one this client can open")
