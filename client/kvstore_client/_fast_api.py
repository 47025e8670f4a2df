"""The fast path's methods on `Client` and `AsyncClient` (the operations themselves are in
fastpath.py, written once for both)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import _wire
from ._put import Credits, put
from .errors import KVStoreClientError
from .fastpath import (
    DEFAULT_PIN_TTL_S,
    GetResult,
    PinsDone,
    PutData,
    PutResult,
    drive,
    drive_async,
    get,
    get_many,
    put_many,
)
from .namespace import Namespace
from .results import SequenceOptions


class FastPath:
    """put / get / put_many / get_many for the blocking `Client`."""

    _run: Callable[[_wire.Call[Any]], Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pins_done = PinsDone()
        self._credits = Credits()

    def put(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        data: PutData,
        *,
        extra_keys: bytes = b"",
        max_tokens: int = 0,
        options: SequenceOptions | None = None,
        model_fingerprint: str = "",
        cached_tokens: int = 0,
    ) -> PutResult:
        """Store the KV of `tokens` from `data`: page i at bytes [i*page_bytes, (i+1)*page_bytes)
        of a buffer, array or CPU tensor, or a function `data(pages, views)` that writes the
        pages it is given. One RPC (Put) when the session holds a credit of reserved pages big
        enough (every page is copied into it; the copies of pages sealed already are dropped),
        else two (Reserve, then the pages nobody had sealed written, then Seal), whose reply
        grants a credit the size of this put. With a function, `max_tokens` or `options` it
        is always two. `cached_tokens` (e.g. a get's `hit_tokens`): the full pages among them
        are known cached and not copied into the credit (if they were evicted meanwhile, the
        put falls back to Reserve + Seal). When it returns, every full page is visible to
        every process."""
        kw = dict(
            extra_keys=extra_keys, max_tokens=max_tokens, options=options, fingerprint=model_fingerprint
        )
        return drive(self._run, put(self, namespace, tokens, data, cached_tokens, **kw))

    def get(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        out: Any = None,
        *,
        extra_keys: bytes = b"",
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        model_fingerprint: str = "",
        after_copy: Callable[[], None] | None = None,
    ) -> GetResult:
        """Copy the KV of the longest cached prefix of `tokens` into `out` (a writable buffer,
        array or CPU tensor; None: a new uint8 tensor) in one RPC. Its pages stay pinned for
        `pin_ttl_s` (capped by the daemon); a copy that ends after that raises `PinExpired`
        and the bytes are not returned. `after_copy` runs between the copy and that check."""
        kw = dict(extra_keys=extra_keys, pin_ttl_s=pin_ttl_s, fingerprint=model_fingerprint)
        return drive(self._run, get(self, namespace, tokens, out, after_copy, **kw))

    def put_many(
        self,
        namespace: str | Namespace,
        prompts: Iterable[_wire.Tokens],
        datas: Iterable[PutData],
        *,
        extra_keys: bytes = b"",
        model_fingerprint: str = "",
    ) -> list[PutResult | KVStoreClientError]:
        """`put` for several prompts in two RPCs (BatchReserve, BatchSeal). Each item is its
        result or its error (returned, not raised): one bad prompt does not fail the others."""
        kw = dict(extra_keys=extra_keys, max_tokens=0, options=None, fingerprint=model_fingerprint)
        return drive(self._run, put_many(self, namespace, prompts, datas, **kw))

    def get_many(
        self,
        namespace: str | Namespace,
        prompts: Iterable[_wire.Tokens],
        outs: Iterable[Any] | None = None,
        *,
        extra_keys: bytes = b"",
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        model_fingerprint: str = "",
    ) -> list[GetResult | KVStoreClientError]:
        """`get` for several prompts in one RPC (BatchLookup); each item its result or error."""
        kw = dict(extra_keys=extra_keys, pin_ttl_s=pin_ttl_s, fingerprint=model_fingerprint)
        return drive(self._run, get_many(self, namespace, prompts, outs, **kw))


class AsyncFastPath:
    """The same for `AsyncClient` (see `FastPath` for each method)."""

    _run: Callable[[_wire.Call[Any]], Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pins_done = PinsDone()
        self._credits = Credits()

    async def put(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        data: PutData,
        *,
        extra_keys: bytes = b"",
        max_tokens: int = 0,
        options: SequenceOptions | None = None,
        model_fingerprint: str = "",
        cached_tokens: int = 0,
    ) -> PutResult:
        kw = dict(
            extra_keys=extra_keys, max_tokens=max_tokens, options=options, fingerprint=model_fingerprint
        )
        return await drive_async(self._run, put(self, namespace, tokens, data, cached_tokens, **kw))

    async def get(
        self,
        namespace: str | Namespace,
        tokens: _wire.Tokens,
        out: Any = None,
        *,
        extra_keys: bytes = b"",
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        model_fingerprint: str = "",
        after_copy: Callable[[], None] | None = None,
    ) -> GetResult:
        kw = dict(extra_keys=extra_keys, pin_ttl_s=pin_ttl_s, fingerprint=model_fingerprint)
        return await drive_async(self._run, get(self, namespace, tokens, out, after_copy, **kw))

    async def put_many(
        self,
        namespace: str | Namespace,
        prompts: Iterable[_wire.Tokens],
        datas: Iterable[PutData],
        *,
        extra_keys: bytes = b"",
        model_fingerprint: str = "",
    ) -> list[PutResult | KVStoreClientError]:
        kw = dict(extra_keys=extra_keys, max_tokens=0, options=None, fingerprint=model_fingerprint)
        return await drive_async(self._run, put_many(self, namespace, prompts, datas, **kw))

    async def get_many(
        self,
        namespace: str | Namespace,
        prompts: Iterable[_wire.Tokens],
        outs: Iterable[Any] | None = None,
        *,
        extra_keys: bytes = b"",
        pin_ttl_s: float = DEFAULT_PIN_TTL_S,
        model_fingerprint: str = "",
    ) -> list[GetResult | KVStoreClientError]:
        kw = dict(extra_keys=extra_keys, pin_ttl_s=pin_ttl_s, fingerprint=model_fingerprint)
        return await drive_async(self._run, get_many(self, namespace, prompts, outs, **kw))
