"""Host staging for device pools: the tiers below the pool only ever see host bytes.

A device pool's memory is not host-addressable, so `copy_out` copies a page to a host
buffer and `copy_in` hands out a host buffer that `landed` pushes to the device once the
tier's copy into it is complete (before the page is sealed or handed to a sequence). The
shared-memory backend needs none of this: its `copy_out`/`copy_in` are views in place.

Simple before fast: one synchronous copy per page, on the caller's thread (the loop for a
demotion or a landing). Batched async copies on a daemon stream, with completion reported
to the loop, are what docs/gpu.md lists as next, measured on a GPU first.
"""

from __future__ import annotations


class StagedPool:
    """The staging half of a device `PoolBackend`; a subclass moves the bytes."""

    def __init__(self) -> None:
        self._staged: dict[int, bytearray] = {}  # offset -> bytes on their way to the device

    def _to_host(self, offset: int, out: bytearray) -> None:
        raise NotImplementedError

    def _to_device(self, offset: int, data: bytearray) -> None:
        raise NotImplementedError

    def copy_out(self, offset: int, nbytes: int) -> memoryview:
        staged = self._staged.get(offset)
        if staged is not None:  # still on its way up: the staged bytes are the page's
            return memoryview(staged)[:nbytes]
        out = bytearray(nbytes)
        self._to_host(offset, out)
        return memoryview(out)

    def copy_in(self, offset: int, nbytes: int) -> memoryview:
        buf = self._staged.get(offset)
        if buf is None or len(buf) != nbytes:
            buf = self._staged[offset] = bytearray(nbytes)
        return memoryview(buf)

    def landed(self, offset: int) -> None:
        buf = self._staged.pop(offset, None)
        if buf is not None:  # (a page a client wrote has nothing staged)
            self._to_device(offset, buf)

    def dropped(self, offset: int) -> None:
        self._staged.pop(offset, None)

    @property
    def staged(self) -> int:
        return len(self._staged)
