"""A namespace as the client sees it: the daemon's NamespaceInfo plus the one
mapping of its pool this client shares between all its sequences and lookups."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvstore_proto.kvstore.v1 import kvstore_pb2

from .errors import PoolError
from .pool import SHM_DIR, PoolMapping, torch_dtype

if TYPE_CHECKING:
    import torch


class Namespace:
    """`info` is the daemon's NamespaceInfo (protobuf). The pool is mapped on the
    first use of `pool`/`page()` (mapping prefaults the whole pool, so it takes a
    moment for a big one) and stays mapped until the client closes."""

    def __init__(self, info: kvstore_pb2.NamespaceInfo, *, shm_dir: str = SHM_DIR) -> None:
        self.info = info
        self._shm_dir = shm_dir
        self._pool: PoolMapping | None = None  # set once, under _lock
        self._closed = False  # set by close(), under _lock
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def geometry(self) -> kvstore_pb2.Geometry:
        return self.info.geometry

    @property
    def page_tokens(self) -> int:
        return self.info.geometry.page_tokens

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.info.pool.dtype or self.info.geometry.dtype)

    @property
    def page_shape(self) -> tuple[int, ...]:
        return tuple(self.info.pool.page_shape)

    @property
    def pool(self) -> PoolMapping:
        """The pool mapping (raises `UnsupportedDevice` for a CUDA pool, `PoolError` if
        the segment cannot be mapped, e.g. from another host over TCP)."""
        if self._pool is None:
            with self._lock:
                if self._closed:
                    raise PoolError(f"namespace {self.name!r}: its client is closed")
                if self._pool is None:
                    self._pool = PoolMapping.open(self.info.pool, shm_dir=self._shm_dir)
        return self._pool

    def page(self, slot: int) -> torch.Tensor:
        """Page `slot` as a `[*page_shape]` tensor view of the pool (no copy)."""
        return self.pool.page(slot)

    def pages(self, slots: Iterable[int]) -> list[torch.Tensor]:
        return self.pool.pages(slots)

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.close()

    def __repr__(self) -> str:
        g = self.info.geometry
        return (
            f"Namespace({self.name!r}, layers={g.num_layers}, kv_heads={g.num_kv_heads}, head_dim={g.head_dim}, "
            f"page_tokens={g.page_tokens}, num_pages={self.info.pool.num_pages})"
        )
