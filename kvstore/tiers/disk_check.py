"""Before the daemon maps an existing disk tier: is its file sound, and does its size fit?

LMDB trusts its file. Random bytes in its B-tree pages make it follow page numbers past the
end of the file, and the access kills the process with SIGBUS, which no `except` catches:
the daemon died at every start. So a child process opens the environment read-only and walks
every tree (each record's key, value and overflow-page header, as a read would) first; if the
child dies or LMDB reports an error, the tier is moved aside into `<dir>/corrupt-<UTC time>/`
(logged, shown in stats) and the daemon starts with an empty one. It is a cache: losing it
costs recomputation, never correctness. A tier the daemon disabled for corruption while
running left a `CORRUPT` marker (disk_health.py) and is moved aside without a check.

The size: `disk_tier_bytes` is LMDB's map size, and the file grows to it as pages are
written. If the file system cannot hold that much (free space plus the file's current size),
the map is clamped to what fits, with a warning; a full file system later is handled by the
writer (disk_writer.py: it evicts to fit).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from .disk_health import MARKER, fs_free_bytes

log = logging.getLogger(__name__)

# A walk that takes longer (a huge tier on a slow device) is stopped and the tier opened
# unchecked, with a warning: a slow check is no sign of damage, and moving a sound tier
# aside would throw away the whole cache.
CHECK_TIMEOUT_S = 120.0
# The child: open read-only, walk the main tree and each named database to the last record.
_WALK = """
import sys, lmdb
env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=3)
n = 0
with env.begin(buffers=True) as txn:
    names = [bytes(k) for k, _ in txn.cursor()]
    for name in (b"meta", b"data", b"state"):
        if name not in names:
            continue
        db = env.open_db(name, txn=txn, create=False)
        txn.stat(db)
        for k, v in txn.cursor(db):
            n += len(k) + len(v)
env.close()
"""


def check_file(path: Path, timeout: float = CHECK_TIMEOUT_S) -> str:
    """Walk the environment in `path` in a child process; "" if sound, else why not."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", _WALK, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("disk tier %s: checking its file took over %.0fs; opened unchecked", path, timeout)
        return ""
    if child.returncode == 0:
        return ""
    if child.returncode < 0:
        return f"reading it killed a process with {signal.Signals(-child.returncode).name}"
    last = (child.stderr.strip().splitlines() or [f"exit status {child.returncode}"])[-1]
    return f"LMDB refused it: {last[:300]}"


def move_aside(path: Path, reason: str) -> Path:
    """Move the tier's files into `path/corrupt-<UTC time>/`; earlier ones are deleted, so a
    tier that keeps breaking cannot fill the disk with copies."""
    for old in path.glob("corrupt-*"):
        shutil.rmtree(old, ignore_errors=True)
        log.info("disk tier %s: deleted %s, moved aside at an earlier start", path, old.name)
    dest = path / time.strftime("corrupt-%Y%m%dT%H%M%SZ", time.gmtime())
    dest.mkdir(mode=0o700)
    for name in ("data.mdb", "lock.mdb", MARKER):
        if (path / name).exists():
            os.rename(path / name, dest / name)
    log.error(
        "disk tier %s is corrupt (%s): moved it aside to %s and starting with an empty one",
        path,
        reason,
        dest,
    )
    return dest


def check_at_start(path: Path) -> str:
    """Move a corrupt tier aside; returns where to ("" if there was nothing to move)."""
    data = path / "data.mdb"
    if not data.exists():
        return ""
    marker = path / MARKER
    if marker.exists():
        reason = marker.read_text(errors="replace").strip() or "marked corrupt by an earlier run"
    else:
        reason = check_file(path)
    if not reason:
        return ""
    return str(move_aside(path, reason))


def fit_capacity(path: Path, capacity_bytes: int) -> int:
    """The map size to use: `capacity_bytes`, or less if the file system cannot hold it."""
    data = path / "data.mdb"
    have = data.stat().st_blocks * 512 if data.exists() else 0
    room = fs_free_bytes(path) + have
    if capacity_bytes <= room:
        return capacity_bytes
    fitted = max(room * 15 // 16, have) // (1 << 20) * (1 << 20)
    log.warning(
        "disk tier %s: disk_tier_bytes=%d does not fit in its file system (%d bytes free, the "
        "file has %d): using %d",
        path,
        capacity_bytes,
        room - have,
        have,
        fitted,
    )
    return fitted
