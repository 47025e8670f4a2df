"""Opening the disk tier's LMDB environment: the directory's ownership and mode, the check of
an existing file (disk_check.py), the map size, and the writer that will own it."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import lmdb

from .disk_check import check_at_start, fit_capacity
from .disk_health import DiskHealth
from .disk_index import DiskIndex
from .disk_writer import BatchLimits, Dbs, DiskWriter
from .record import PageKey

log = logging.getLogger(__name__)


def headroom_bytes(capacity_bytes: int) -> int:
    """The part of the map kept free of pages: 1/16 of it, at least 1 MiB, at most 1 GiB."""
    return min(max(capacity_bytes // 16, 1 << 20), 1 << 30)


def secure_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"disk tier directory {path} belongs to uid {st.st_uid}, not us ({os.getuid()})"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        log.warning("disk tier directory %s had mode %o; setting 0700", path, stat.S_IMODE(st.st_mode))
        path.chmod(0o700)


def open_writer(
    path: Path,
    capacity_bytes: int,
    *,
    limits: BatchLimits,
    reader_threads: int,
    writemap: bool,
    readahead: bool,
    sync_commits: bool,
    on_evict: Callable[[list[PageKey]], None] | None,
    policy: str,
    check: bool,
) -> tuple[DiskWriter, int]:
    """The environment in `path`, opened, with its writer (not started yet) and the map size
    used (`capacity_bytes`, or less if the file system has less room: disk_check.py)."""
    path = Path(path)
    if capacity_bytes < 2 * headroom_bytes(capacity_bytes):
        raise ValueError(f"disk tier capacity_bytes={capacity_bytes} is too small; at least 2 MiB")
    try:
        index = DiskIndex(policy)
    except ValueError as e:
        raise ValueError(f"disk tier policy: {e}") from None
    secure_dir(path)
    moved_aside = check_at_start(path) if check else ""
    if check:
        capacity_bytes = fit_capacity(path, capacity_bytes)
        if capacity_bytes < 2 * headroom_bytes(capacity_bytes):
            raise ValueError(f"disk tier {path}: its file system has less than 2 MiB free")
    env = lmdb.open(
        str(path),
        map_size=capacity_bytes,
        max_dbs=3,
        mode=0o600,
        sync=sync_commits,
        metasync=sync_commits,
        writemap=writemap,
        # A page is one run of contiguous overflow pages (64 KiB-1 MiB): readahead and the
        # kernel's fault-around map it in a few faults, not one per 4 KiB (3x faster here).
        readahead=readahead,
        max_readers=max(126, 4 * reader_threads),
    )
    try:
        stale = env.reader_check()
        if stale:
            log.info("disk tier %s: cleared %d stale reader slots (a dead process held them)", path, stale)
        dbs = Dbs(env.open_db(b"meta"), env.open_db(b"data"), env.open_db(b"state"))
        health = DiskHealth(path, moved_aside)
        writer = DiskWriter(
            env,
            dbs,
            index,
            name=str(path),
            soft_limit_bytes=capacity_bytes - headroom_bytes(capacity_bytes),
            limits=limits,
            on_evict=on_evict,
            health=health,
        )
    except BaseException:
        env.close()
        raise
    return writer, capacity_bytes
