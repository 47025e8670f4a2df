"""A namespace as the client sees it: the daemon's NamespaceInfo plus the one
mapping of its pool this client shares between all its sequences and lookups."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvstore_proto.kvstore.v1 import kvstore_pb2

from .device import open_device_pool
from .errors import PoolError
from .pool import PoolMapping, torch_dtype
from .pool_fd import Fetched, PoolFd

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class Namespace:
    """`info` is the daemon's NamespaceInfo (protobuf). The pool is mapped on the
    first use of `pool`/`page()` (mapping prefaults the whole pool, so it takes a
    moment for a big one) and stays mapped until the client closes. Its descriptor
    (`fetched`) was traded for the reply's ticket as the reply came.

    Slots index one pool, named by its epoch (`info.pool.pool_epoch`). When a reply hands
    out slots of another epoch (the daemon restarted, or the namespace was deleted and
    created again) the client maps the new pool before it uses them (`rebind`): views
    taken before then still show the old pool's memory, never the new one's."""

    def __init__(self, info: kvstore_pb2.NamespaceInfo, fetched: Fetched = None) -> None:
        self.info = info
        self._fetched = fetched  # owned: closed with the namespace or when rebound
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
        """The pool mapping (raises `PoolError` if it cannot be mapped, e.g. over TCP or
        without a scope on the namespace; read-only with the read scope alone)."""
        if self._pool is None:
            with self._lock:
                if self._closed:
                    raise PoolError(f"namespace {self.name!r}: its client is closed")
                if self._pool is None:
                    d, fetched = self.info.pool, self._fetched
                    if isinstance(fetched, PoolError):
                        raise PoolError(fetched.details, code=fetched.code)
                    if d.sync_mode == kvstore_pb2.SYNC_BEFORE_COMMIT:
                        self._pool = open_device_pool(d, fetched)
                    elif fetched is None:
                        raise PoolError(f"namespace {self.name!r}: no descriptor of its pool was fetched")
                    else:
                        self._pool = PoolMapping.open(d, fetched)
        return self._pool

    def pool_descriptor(self) -> PoolFd:
        """A duplicate of the pool's descriptor (yours to close): for a mapping of your own,
        e.g. without torch. Read-only unless the token has the write scope (`.writable`)."""
        with self._lock:
            fetched = self._fetched
            if isinstance(fetched, PoolError):
                raise PoolError(fetched.details, code=fetched.code)
            if fetched is None or fetched.fd < 0:
                raise PoolError(
                    f"namespace {self.name!r}: no descriptor of its pool (a device pool, or closed)"
                )
            return PoolFd(os.dup(fetched.fd), fetched.writable, fetched.epoch, fetched.nbytes)

    @property
    def epoch(self) -> int:
        return self.info.pool.pool_epoch

    def is_current(self, epoch: int) -> bool:
        """Whether slots of pool `epoch` index the pool this namespace maps (0: a daemon
        that does not say; trusted, as before epochs)."""
        return epoch == 0 or epoch == self.epoch

    def rebind(self, info: kvstore_pb2.NamespaceInfo, epoch: int, fetched: Fetched) -> None:
        """Take the daemon's current `info` for this namespace (and the descriptor fetched
        with it), whose pool must be of `epoch`, and drop the old mapping (the new pool is
        mapped on next use)."""
        if info.name != self.name or info.pool.pool_epoch != epoch:
            _close(fetched)
            raise PoolError(
                f"namespace {self.name!r}: a reply handed out slots of pool epoch {epoch:016x} but "
                f"the daemon now serves epoch {info.pool.pool_epoch:016x} (the namespace was "
                "deleted and created again meanwhile); its slots were not used: retry"
            )
        log.warning(
            "namespace %s: the daemon serves a new pool (epoch %016x, was %016x); mapping it",
            self.name,
            epoch,
            self.epoch,
        )
        with self._lock:
            self.info = info
            old, self._fetched = self._fetched, fetched
        _close(old)
        self.unmap()

    def unmap(self) -> None:
        """Drop the pool mapping (it is mapped again on next use, from `info`)."""
        with self._lock:
            old, self._pool = self._pool, None
        if old is not None:
            old.close()

    def page(self, slot: int) -> torch.Tensor:
        """Page `slot` as a `[*page_shape]` tensor view of the pool (no copy)."""
        return self.pool.page(slot)

    def pages(self, slots: Iterable[int]) -> list[torch.Tensor]:
        return self.pool.pages(slots)

    def pages_of(self, epoch: int, slots: Iterable[int], holder: str = "") -> list[torch.Tensor]:
        """Views of `slots` handed out for pool `epoch`: PoolError if this namespace now maps
        another pool (the daemon restarted, or the namespace was created again)."""
        if epoch != self.epoch:
            raise PoolError(
                f"{holder or 'slots'}: its slots index pool epoch {epoch:016x}, but namespace "
                f"{self.name!r} now maps epoch {self.epoch:016x} (the daemon restarted, or the "
                "namespace was created again): they index nothing there"
            )
        return self.pages(slots)

    def record(self) -> Any:
        """An event after this process's device work on the pool (None: not mapped, or host
        memory); the library waits for it before Commit and Release (docs/gpu.md)."""
        pool = self._pool
        return pool.record() if pool is not None and not pool.closed else None

    @property
    def closed(self) -> bool:
        """Closed: by the client's close, or because its daemon went away (device pools)."""
        return self._closed

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
            fetched, self._fetched = self._fetched, None
        _close(fetched)
        if pool is not None:
            pool.close()

    def __repr__(self) -> str:
        g = self.info.geometry
        return (
            f"Namespace({self.name!r}, layers={g.num_layers}, kv_heads={g.num_kv_heads}, head_dim={g.head_dim}, "
            f"page_tokens={g.page_tokens}, num_pages={self.info.pool.num_pages})"
        )


def remember(
    namespaces: dict[str, Namespace], info: kvstore_pb2.NamespaceInfo, fetched: Fetched
) -> Namespace:
    """The client's namespace for a fresh reply. Two threads may fetch the same name: keep the
    first, so there is one mapping (and close the other's descriptor)."""
    ns = namespaces.setdefault(info.name, Namespace(info, fetched))
    if ns.info is not info:
        _close(fetched)
    return ns


def _close(fetched: Fetched) -> None:
    if isinstance(fetched, PoolFd):
        fetched.close()


def pool_moved(ns: Namespace | None, reply: Any) -> Namespace | None:
    """The namespace to map again (`Namespace.rebind`) before the slots of `reply`, a reply
    about `ns` (None: a reply without slots), are used."""
    return ns if ns is not None and not ns.is_current(reply.pool_epoch) else None
