"""Host staging for device pools: the tiers below the pool only ever see host bytes.

A device pool's memory is not host-addressable, so `copy_out` copies a page to a host
buffer and `copy_in` hands out a host buffer that `landed` pushes to the device once the
tier's copy into it is complete (before the page is sealed or handed to a sequence). The
shared-memory backend needs none of this: its `copy_out`/`copy_in` are views in place.

The host buffers live in one staging arena the pool allocates at its start (pinned host
memory for CUDA: pinning is slow, and only pinned memory lets the copy engines run
asynchronously at full bandwidth). Its first quarter is the ring copies out go through, in
two halves: while a caller reads one half's pages, the next chunk is copying into the
other. The rest is cut into slots of one page each, one per page staged for a copy in; a
page staged while no slot is free gets a plain buffer (correct, but a slower copy). A
subclass moves the bytes with `_to_host_async` / `_to_device_async`, `_mark` and `_wait` (one
wait a chunk or a batch, never one a page; the next chunk out is queued before the wait, so
the copy engine never idles between chunks). docs/gpu.md, "Tiers under a GPU pool", says why.

Rules that keep every byte right: a copy out of a page still staged is its staged bytes
(the device has the old ones); a slot is reused only after the copy from it has been waited
for (`landed`) or its page was freed (`dropped`); a ring half is overwritten only once the
caller has moved past its pages; any new call first waits for whatever is in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

DEFAULT_STAGING_BYTES = 256 << 20
MIN_STAGING_BYTES = 1 << 16
OUT_SHARE = 4  # 1/OUT_SHARE of the arena is the ring for copies out

Copy = tuple[int, memoryview]  # (offset in the pool, host buffer of the same length)


class StaleIterator(RuntimeError):
    """A `copy_out_many` iterator used after a later copy out reused its buffers."""


class StagedPool:
    """The staging half of a device `PoolBackend`; a subclass moves the bytes."""

    def __init__(self, arena: memoryview) -> None:
        out_bytes = len(arena) // OUT_SHARE
        self._half = out_bytes // 2  # bytes of one half of the ring
        self._ring = arena[: 2 * self._half]
        self._slot_area = arena[2 * self._half :]
        self._slot_bytes = 0  # fixed by the first copy_in (a pool has one page size)
        self._free_slots: list[int] = []  # slot indices, the lowest last (taken first)
        self._slot_of: dict[int, int] = {}  # offset -> its slot, while staged in one
        self._staged: dict[int, memoryview] = {}  # offset -> bytes on their way to the device
        self._out_call = 0  # bumped by every copy out: an older iterator is stale
        self.staged_unpinned = 0  # pages staged outside the arena (no free slot): slower copies

    # ------------------------------------------------------------ the subclass's copies

    def _to_host_async(self, copies: list[Copy]) -> None:
        """Start copying each page at offset into its buffer (done at the next `_wait`)."""
        raise NotImplementedError

    def _to_device_async(self, copies: list[Copy]) -> None:
        """Start copying each buffer to the page at its offset (done at the next `_wait`)."""
        raise NotImplementedError

    def _mark(self) -> object:
        """A point in the stream of copies: `_wait(mark)` waits for those started before it."""
        raise NotImplementedError

    def _wait(self, mark: object = None) -> None:
        """Every copy started before `mark` (None: every copy started so far) is complete."""
        raise NotImplementedError

    # ------------------------------------------------------------ down

    def copy_out(self, offset: int, nbytes: int) -> memoryview:
        return next(self.copy_out_many([offset], nbytes))

    def copy_out_many(self, offsets: Iterable[int], nbytes: int) -> Iterator[memoryview]:
        """The pages' bytes in order, one view each, copied a ring half at a time. A view is
        valid until the next one is drawn, and the iterator until the next copy out."""
        self._out_call += 1
        return self._out(list(offsets), nbytes, self._out_call)

    def _out(self, offsets: list[int], nbytes: int, call: int) -> Iterator[memoryview]:
        self._wait()  # an abandoned iterator may still be copying into the ring
        per_half = self._half // nbytes if nbytes else 0
        if per_half == 0:  # a page larger than half the ring (a tiny arena): one at a time
            for offset in offsets:
                yield self._out_alone(offset, nbytes, call)
            return
        chunks = [offsets[i : i + per_half] for i in range(0, len(offsets), per_half)]
        if not chunks:
            return
        views = self._start_chunk(chunks[0], nbytes, 0)
        mark = self._mark()
        for k in range(len(chunks)):
            self._check(call)
            if k + 1 < len(chunks):  # queued behind this one, into the half the caller is done with
                next_views = self._start_chunk(chunks[k + 1], nbytes, (k + 1) % 2)
                next_mark = self._mark()
            self._wait(mark)
            for view in views:
                self._check(call)
                yield view
            if k + 1 < len(chunks):
                views, mark = next_views, next_mark

    def _check(self, call: int) -> None:
        if self._out_call != call:  # its buffers are a later copy's now: never read them
            raise StaleIterator("copy_out_many: a later copy out reused its buffers")

    def _start_chunk(self, offsets: list[int], nbytes: int, half: int) -> list[memoryview]:
        base = half * self._half
        views, copies = [], []
        for i, offset in enumerate(offsets):
            staged = self._staged.get(offset)
            if staged is not None:  # still on its way up: the staged bytes are the page's
                views.append(staged[:nbytes])
                continue
            view = self._ring[base + i * nbytes : base + (i + 1) * nbytes]
            views.append(view)
            copies.append((offset, view))
        if copies:
            self._to_host_async(copies)
        return views

    def _out_alone(self, offset: int, nbytes: int, call: int) -> memoryview:
        self._check(call)
        staged = self._staged.get(offset)
        if staged is not None:
            return staged[:nbytes]
        view = memoryview(bytearray(nbytes))
        self._to_host_async([(offset, view)])
        self._wait()
        return view

    # ------------------------------------------------------------ up

    def copy_in(self, offset: int, nbytes: int) -> memoryview:
        buf = self._staged.get(offset)
        if buf is not None and len(buf) == nbytes:
            return buf
        self.dropped(offset)
        buf = self._take_slot(offset, nbytes)
        if buf is None:
            buf = memoryview(bytearray(nbytes))
            self.staged_unpinned += 1
        self._staged[offset] = buf
        return buf

    def _take_slot(self, offset: int, nbytes: int) -> memoryview | None:
        if not self._slot_bytes and nbytes:
            self._slot_bytes = nbytes
            self._free_slots = list(range(len(self._slot_area) // nbytes))[::-1]
        if nbytes > self._slot_bytes or not self._free_slots:
            return None
        slot = self._free_slots.pop()
        self._slot_of[offset] = slot
        start = slot * self._slot_bytes
        return self._slot_area[start : start + nbytes]

    def landed(self, offset: int) -> None:
        self.landed_many([offset])

    def landed_many(self, offsets: Iterable[int]) -> None:
        """The pages' staged bytes (those that have any: a page a client wrote has none) to
        the device, waited for once; their slots are free again after."""
        copies = [(o, buf) for o in offsets if (buf := self._staged.pop(o, None)) is not None]
        if not copies:
            return
        self._to_device_async(copies)
        self._wait()
        for offset, _ in reversed(copies):  # (taken again in this order: runs stay mergeable)
            self._free_slot(offset)

    def dropped(self, offset: int) -> None:
        if self._staged.pop(offset, None) is not None:
            self._free_slot(offset)  # (nothing is copying from it: only landed copies)

    def _free_slot(self, offset: int) -> None:
        slot = self._slot_of.pop(offset, None)
        if slot is not None:
            self._free_slots.append(slot)

    def is_staged(self, offset: int) -> bool:
        """Whether the page at `offset` has bytes on their way to the device (not landed)."""
        return offset in self._staged

    @property
    def staged(self) -> int:
        return len(self._staged)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)
