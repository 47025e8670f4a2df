"""What a client holds: sessions (leases), their sequences and pins. Plain
records; kvstore/store/store.py is the only code that changes them."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.hashing import BlockHash
from kvstore.memory.pages import Page
from kvstore.store.namespace import Namespace


@dataclass(eq=False)
class Sequence:
    id: int
    session_id: int
    ns: Namespace
    extra_keys: bytes
    max_tokens: int  # 0 = unconstrained
    last_hash: BlockHash  # hash of the last full page (the namespace root before the first)
    pages: list[Page] = field(default_factory=list)  # page i of the sequence
    spare: list[Page] = field(default_factory=list)  # preallocated RESERVED pages not yet used
    tail_tokens: bytes = b""  # little-endian int32 ids of the partial last page
    num_tokens: int = 0
    committed_tokens: int = 0


@dataclass(eq=False)
class Pin:
    id: int
    session_id: int
    ns: Namespace
    pages: list[Page]


@dataclass(eq=False)
class Session:
    id: int
    client_name: str
    lease_ttl_s: float
    expires_at: float  # monotonic; ignored while a keep-alive stream is attached
    last_seen: float
    streams: int = 0
    sequences: dict[int, Sequence] = field(default_factory=dict)
    pins: dict[int, Pin] = field(default_factory=dict)
