"""Tiers below the shared-memory pool: daemon-owned DRAM (`HostTier`) and LMDB on disk
(`DiskTier`). Both hold `PageRecord`s: metadata + payload + a checksum verified on every
read, so a page that fails is reported (`CorruptPage`), never served. See docs/tiers.md."""

from .disk import NOT_RESIDENT, DiskTier, DiskWriteError
from .host import HostFull, HostTier
from .record import CorruptPage, PageKey, PageMeta, PageRecord, TierName, make_meta

__all__ = [
    "NOT_RESIDENT",
    "CorruptPage",
    "DiskTier",
    "DiskWriteError",
    "HostFull",
    "HostTier",
    "PageKey",
    "PageMeta",
    "PageRecord",
    "TierName",
    "make_meta",
]
