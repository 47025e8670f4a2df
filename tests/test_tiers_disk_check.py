"""The disk tier's start check (kvstore/tiers/disk_check.py) on real LMDB files: a file cut
short (LMDB then maps pages past its end: SIGBUS, which no `except` catches) or with its
B-tree pages overwritten is moved aside and the tier opens empty; a sound file is kept; a
tier marked CORRUPT by an earlier run is moved aside unchecked; a map larger than the file
system is clamped. Each open runs in a child process, so a SIGBUS fails the test instead of
killing pytest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_e2e_disk_faults import corrupt_tree_pages

from kvstore.tiers import DiskTier, PageRecord, make_meta

_OPEN = """
import json, sys
from kvstore.tiers import DiskTier
with DiskTier.open(sys.argv[1], int(sys.argv[2])) as tier:
    found = sum(1 for _ in tier.reindex())
    print(json.dumps({"found": found, "moved_aside": tier.stats()["moved_aside"],
                      "capacity": tier.capacity_bytes}))
"""


def make_tier(path: Path, n: int = 64) -> None:
    with DiskTier.open(path, 32 << 20, check=False) as tier:
        records = [
            PageRecord.build(make_meta("ns", os.urandom(16), b"", 16, 16384, "g"), os.urandom(16384))
            for _ in range(n)
        ]
        assert tier.put_async(records).result(30) == []
        tier.flush_sync(30)


def open_in_child(path: Path, capacity: int = 32 << 20) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", _OPEN, str(path), str(capacity)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    return json.loads(child.stdout) | {"log": child.stderr}


def test_a_file_cut_short_is_moved_aside_not_a_sigbus(tmp_path: Path) -> None:
    make_tier(tmp_path / "t")
    os.truncate(tmp_path / "t" / "data.mdb", 64 * os.sysconf("SC_PAGE_SIZE"))
    got = open_in_child(tmp_path / "t")
    assert got["found"] == 0 and "SIGBUS" in got["log"], got
    moved = Path(got["moved_aside"])
    assert moved.parent == tmp_path / "t" and (moved / "data.mdb").stat().st_size == 64 * 4096


def test_overwritten_tree_pages_are_moved_aside(tmp_path: Path) -> None:
    make_tier(tmp_path / "t")
    assert corrupt_tree_pages(tmp_path / "t" / "data.mdb", seed=11) > 0
    got = open_in_child(tmp_path / "t")
    assert got["found"] == 0 and got["moved_aside"], got
    # The next start finds the new, empty tier sound, and deletes nothing of it.
    again = open_in_child(tmp_path / "t")
    assert again["moved_aside"] == "" and Path(got["moved_aside"]).exists()


def test_a_sound_tier_is_kept(tmp_path: Path) -> None:
    make_tier(tmp_path / "t", n=64)
    got = open_in_child(tmp_path / "t")
    assert got["found"] == 64 and got["moved_aside"] == "", got


def test_a_tier_marked_corrupt_is_moved_aside_and_a_second_one_replaces_the_first(tmp_path: Path) -> None:
    make_tier(tmp_path / "t")
    (tmp_path / "t" / "CORRUPT").write_text("disk tier t is corrupt (test)\n")
    first = open_in_child(tmp_path / "t")
    assert first["found"] == 0 and "corrupt (test)" in first["log"], first
    make_tier(tmp_path / "t")
    (tmp_path / "t" / "CORRUPT").write_text("again\n")
    second = open_in_child(tmp_path / "t")
    # Only the latest stays, so a tier that keeps breaking cannot fill the disk.
    assert [p.name for p in (tmp_path / "t").glob("corrupt-*")] == [Path(second["moved_aside"]).name]


def test_a_map_larger_than_the_file_system_is_clamped(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    got = open_in_child(tmp_path / "t", capacity=free * 4)
    assert got["capacity"] <= free and "does not fit in its file system" in got["log"], got
