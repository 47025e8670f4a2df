"""The disk tier's re-index: rebuild the in-memory index from the `meta` database after a
start (docs/tiers.md, "Re-index"). Payloads are not read; garbage records are skipped,
counted and deleted."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from .disk_writer import DiskWriter
from .record import CorruptPage, PageKey, PageMeta, decode_meta

log = logging.getLogger(__name__)


def scan(
    writer: DiskWriter,
    progress: Callable[[int, int, float], None] | None,
    chunk: int,
    progress_every_s: float,
) -> Iterator[PageMeta]:
    """Yield the metadata of every record on disk (payloads are not read) and rebuild the
    tier's index and eviction order (oldest created first). Garbage records are skipped,
    counted (`stats()['corrupt']`) and deleted. `progress(done, total, pages_per_s)` is
    called every `progress_every_s` and at the end. Read transactions are short (one per
    `chunk` records), so the writer is never held up: run it on a thread while serving."""
    t0 = last = time.monotonic()
    with writer.env.begin() as txn:
        total = txn.stat(writer.dbs.meta)["entries"]
    done = 0
    order: list[tuple[int, PageKey]] = []
    bad: list[bytes] = []
    after: bytes | None = None
    ok = True
    index = writer.index
    while ok:
        metas: list[PageMeta] = []
        # The lock spans the read transaction and the index update: a delete committed
        # after our snapshot unindexes after us, so a deleted key is never re-added.
        with index.lock, writer.open_reads.txn(writer.env) as txn:
            cur = txn.cursor(writer.dbs.meta)
            ok = cur.set_range(after) if after is not None else cur.first()
            if ok and after is not None and bytes(cur.key()) == after:
                ok = cur.next()
            n = 0
            while ok and n < chunk:
                raw_key = after = bytes(cur.key())
                n += 1
                try:
                    key = PageKey.decode(raw_key)
                    meta, _ = decode_meta(key, cur.value())
                except (CorruptPage, ValueError, UnicodeDecodeError):
                    bad.append(raw_key)
                    with contextlib.suppress(ValueError, UnicodeDecodeError):
                        index.dropped.add(PageKey.decode(raw_key))
                else:
                    if key not in index.dropped:
                        metas.append(meta)
                        order.append((meta.created_ns, key))
                        cost = writer.cost(len(cur.value()), meta.page_bytes)
                        index.found(key, cost, meta.parent_hash, meta.represented_bytes)
                ok = cur.next()
        done += n
        yield from metas
        now = time.monotonic()
        if progress is not None and (now - last >= progress_every_s or not ok):
            progress(done, total, done / max(now - t0, 1e-9))
            last = now
    order.sort()
    index.oldest_first([k for _, k in order])  # then whatever was put meanwhile
    if bad:
        index.count("corrupt", len(bad))
        log.warning("disk tier %s: %d unreadable records skipped and deleted", writer.name, len(bad))
        writer.submit("remove", bad)  # by raw bytes: a garbage key need not decode
