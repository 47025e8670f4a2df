"""Zero-copy views of a namespace's page pool.

The daemon owns the pool; a client maps it once per namespace and reads/writes
pages in place. On CPU the pool is an anonymous shared-memory file (a memfd) whose
descriptor the daemon hands over its pool socket (kvstore_client/pool_fd.py): read-only
for a token with the read scope alone, so such a mapping cannot be written at all (a
write through a view of it is a segfault of the writing process, never a changed page).
"""

from __future__ import annotations

import functools
import logging
import math
import mmap
import sys
import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvstore_proto import dtypes
from kvstore_proto.kvstore.v1 import kvstore_pb2

from .errors import InvalidArgument, PoolError, UnsupportedDevice
from .pool_fd import PoolFd

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Wire DType -> name of the torch dtype (kvstore_proto.dtypes). torch itself is imported only
# when a torch dtype or a view is needed (importing it takes over a second; `kvstore-admin`
# never needs it).
_TORCH_NAMES: dict[int, str] = {d.wire: d.name for d in dtypes.DTYPES}
_WIRE_NAMES: dict[str, int] = {d.wire_name: d.wire for d in dtypes.DTYPES}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}
_DTYPE_ALIASES.update({"float": "float32", "fp8": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn"})


@functools.cache
def _torch_tables() -> tuple[dict[int, torch.dtype], dict[torch.dtype, int]]:
    """Wire DType -> torch dtype, and back (imports torch on first use)."""
    import torch

    to_torch = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()}
    return to_torch, {v: k for k, v in to_torch.items()}


def __getattr__(name: str) -> Any:
    if name == "TORCH_DTYPES":  # the old module constant, built on first access
        return _torch_tables()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dtype_name(dtype: int) -> str:
    """The torch name of a wire `DType` value ("bfloat16"), without importing torch."""
    try:
        return _TORCH_NAMES[dtype]
    except KeyError:
        raise PoolError(f"dtype={dtype} is not a DType this client knows ({sorted(_TORCH_NAMES)})") from None


def torch_dtype(dtype: int) -> torch.dtype:
    """The torch dtype of a wire `DType` value."""
    try:
        return _torch_tables()[0][dtype]
    except KeyError:
        raise PoolError(f"dtype={dtype} is not a DType this client knows ({sorted(_TORCH_NAMES)})") from None


def wire_dtype(dtype: torch.dtype | str | int) -> int:
    """A wire `DType` from a torch dtype, a name ("float16", "bf16", "FLOAT8_E4M3") or the enum value."""
    if isinstance(dtype, int):
        if dtype not in _TORCH_NAMES:
            raise InvalidArgument(f"dtype={dtype} is not a DType value ({sorted(_TORCH_NAMES)})")
        return dtype
    if isinstance(dtype, str):
        if dtype in _WIRE_NAMES:
            return _WIRE_NAMES[dtype]
        name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if name in dtypes.BY_NAME:  # no need for torch
            return dtypes.BY_NAME[name].wire
        import torch  # an unknown name: the message shows what torch makes of it, as before

        dtype = getattr(torch, name, None)
    loaded = sys.modules.get("torch")  # torch never imported: `dtype` cannot be a torch dtype
    if loaded is not None and isinstance(dtype, loaded.dtype) and dtype in _torch_tables()[1]:
        return _torch_tables()[1][dtype]
    names = list(_TORCH_NAMES.values())
    raise InvalidArgument(f"dtype={dtype!r} is not supported; use one of {names}")


class PoolMapping:
    """One mapping of a namespace's pool, with torch views of its pages.

    Views share memory with the pool: writing a view writes the pool, no copy.
    Build it with `PoolMapping.open(descriptor)`; the constructor takes an
    existing mapping and has no side effects.
    """

    def __init__(self, descriptor: kvstore_pb2.PoolDescriptor, mm: mmap.mmap, writable: bool = True) -> None:
        self.descriptor = descriptor
        self.writable = writable  # False: mapped read-only (a token with the read scope alone)
        self.dtype = torch_dtype(descriptor.dtype)
        self.page_shape = tuple(int(d) for d in descriptor.page_shape)
        self.num_pages = int(descriptor.num_pages)
        self.offset = int(descriptor.offset)
        self.page_bytes = int(descriptor.page_bytes)
        self.page_stride = int(descriptor.page_stride)
        _check_geometry(descriptor, self.dtype, len(mm))
        self._mm: mmap.mmap | None = mm
        # Through a memoryview, not the mmap itself: torch.frombuffer keeps a reference to
        # the object but releases its buffer export, so over a bare mmap close() would
        # succeed and unmap pages under live tensors (a segfault on the next access). The
        # memoryview holds the export for as long as any view of the pool lives.
        import torch

        with warnings.catch_warnings():  # a read-only pool: torch warns it cannot protect it
            warnings.simplefilter("ignore", UserWarning)
            self._bytes: torch.Tensor | None = torch.frombuffer(memoryview(mm), dtype=torch.uint8)
        self._rows: torch.Tensor | None = None

    @classmethod
    def open(cls, descriptor: kvstore_pb2.PoolDescriptor, pool: PoolFd) -> PoolMapping:
        """Map the pool from its descriptor (kvstore_client.pool_fd), read-write or read-only
        as it was handed over. MAP_POPULATE prefaults it: first touch is slow."""
        if descriptor.device != "cpu":
            raise UnsupportedDevice(
                f"pool device={descriptor.device!r} is not a CPU pool: a CUDA (or fake device) "
                "pool is opened by kvstore_client.device.open_device_pool"
            )
        if pool.nbytes < descriptor.nbytes:
            raise PoolError(
                f"the pool has {pool.nbytes} bytes but the descriptor says nbytes={descriptor.nbytes}"
            )
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if pool.writable else 0)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        try:
            mm = mmap.mmap(pool.fd, descriptor.nbytes, flags=flags, prot=prot)
        except OSError as e:
            raise PoolError(f"cannot map the pool (epoch {pool.epoch:016x}): {e}") from e
        try:
            return cls(descriptor, mm, pool.writable)
        except BaseException:
            mm.close()
            raise

    @property
    def closed(self) -> bool:
        return self._bytes is None

    @property
    def nbytes(self) -> int:
        return int(self.descriptor.nbytes)

    def record(self) -> None:
        """Host memory needs no sync event (device mappings return one)."""
        return None

    def synchronize(self) -> None:
        pass

    def raw_page(self, slot: int) -> torch.Tensor:
        """The `page_bytes` bytes of page `slot`, as a flat uint8 view."""
        start = self.offset + self._check_slot(slot) * self.page_stride
        return self._base()[start : start + self.page_bytes]

    def rows(self) -> torch.Tensor:
        """The pool as one `[num_pages, page_bytes]` uint8 view (row i = page i's bytes; the
        padding between pages, if any, skipped by the stride). Built once."""
        if self._rows is None:
            self._rows = self._base().as_strided(
                (self.num_pages, self.page_bytes), (self.page_stride, 1), self.offset
            )
        return self._rows

    def page(self, slot: int) -> torch.Tensor:
        """Page `slot` as a view of shape `page_shape` and the pool's dtype (no copy)."""
        return self.raw_page(slot).view(self.dtype).view(self.page_shape)

    def pages(self, slots: Iterable[int]) -> list[torch.Tensor]:
        """Views of several pages, in the order given (no copy)."""
        return [self.page(int(s)) for s in slots]

    def view(self) -> torch.Tensor:
        """The whole pool as one `[num_pages, *page_shape]` view; padding between pages
        (page_stride > page_bytes) is skipped by the stride."""
        itemsize = self.dtype.itemsize
        base = self._base()
        typed = base[: len(base) - len(base) % itemsize].view(self.dtype)
        inner = [1] * len(self.page_shape)
        for i in range(len(self.page_shape) - 2, -1, -1):
            inner[i] = inner[i + 1] * self.page_shape[i + 1]
        return typed.as_strided(
            (self.num_pages, *self.page_shape),
            (self.page_stride // itemsize, *inner),
            self.offset // itemsize,
        )

    def close(self) -> None:
        """Drop this mapping. If views handed out are still alive the memory stays
        mapped until the last one is garbage collected (mmap refuses to close
        under live buffers); pages are never unmapped under a live tensor."""
        self._bytes = self._rows = None
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            log.debug(
                "pool epoch %016x: views still alive, unmapped when they are collected",
                self.descriptor.pool_epoch,
            )

    def __enter__(self) -> PoolMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return (
            f"PoolMapping(epoch={self.descriptor.pool_epoch:016x}, {state}, num_pages={self.num_pages}, "
            f"page_shape={self.page_shape}, dtype={self.dtype})"
        )

    def _base(self) -> torch.Tensor:
        if self._bytes is None:
            raise PoolError(f"pool epoch {self.descriptor.pool_epoch:016x} is closed")
        return self._bytes

    def _check_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_pages:
            raise InvalidArgument(f"slot={slot} is outside the pool (num_pages={self.num_pages})")
        return slot


def _check_geometry(d: kvstore_pb2.PoolDescriptor, dtype: torch.dtype, mapped: int) -> None:
    """Refuse a descriptor whose numbers do not add up, before any view can read past the end."""
    shape: Sequence[int] = d.page_shape
    itemsize = dtype.itemsize
    want = math.prod(shape) * itemsize
    problems = []
    if want != d.page_bytes:
        problems.append(f"page_shape={list(shape)} x {itemsize} bytes = {want} but page_bytes={d.page_bytes}")
    if d.page_stride < d.page_bytes:
        problems.append(f"page_stride={d.page_stride} < page_bytes={d.page_bytes}")
    if d.page_stride % itemsize or d.offset % itemsize:
        problems.append(f"page_stride={d.page_stride} and offset={d.offset} must be multiples of {itemsize}")
    end = d.offset + (d.num_pages - 1) * d.page_stride + d.page_bytes if d.num_pages else d.offset
    if end > mapped:
        problems.append(f"{d.num_pages} pages end at byte {end} but the mapping has {mapped}")
    if problems:
        raise PoolError(f"pool epoch {d.pool_epoch:016x}: inconsistent descriptor: " + "; ".join(problems))
