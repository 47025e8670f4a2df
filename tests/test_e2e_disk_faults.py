"""Disk faults through a real daemon (issue 14, defects 5-7): a disk tier whose LMDB tree
pages were overwritten (at start and while running), its directory deleted while running, a
full file system, and the bound on what is queued for disk. The disk tier is a cache: each
fault is detected, counted, shown in stats and answered with a typed error, while the daemon
keeps serving from the pool and never serves wrong bytes."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import Worker, prompt, wait_until
from kvstore_client.errors import ResourceExhausted, Unavailable
from test_e2e_tiers import check_bytes, tier_server, tiers
from test_metrics import _free_port, _scrape

T = SMALL_NAMESPACE["page_tokens"]
NS = dict(SMALL_NAMESPACE, num_pages=16)
PSIZE = os.sysconf("SC_PAGE_SIZE")  # LMDB's page size


def corrupt_tree_pages(data_mdb: Path, seed: int) -> int:
    """Overwrite every B-tree page (branch and leaf, LMDB's page header flags 0x01/0x02) of
    the file with random bytes, header included; the two meta pages and the records'
    overflow pages stay. Written through the file, so a process that maps it sees it too."""
    rng = random.Random(seed)
    n = 0
    with open(data_mdb, "r+b") as f:
        raw = f.read()
        for pgno in range(2, len(raw) // PSIZE):
            flags = int.from_bytes(raw[pgno * PSIZE + 10 : pgno * PSIZE + 12], "little")
            if flags & 0x03 and not flags & 0x0C:
                f.seek(pgno * PSIZE)
                f.write(rng.randbytes(PSIZE))
                n += 1
    return n


def write_and_flush(d: Any, client: Any, tokens: list[int], writer: Worker | None = None) -> None:
    """Write `tokens` (in `writer`, or a worker of its own), evict them to disk, flush."""
    if writer is None:
        with Worker("writer") as a:
            a.call("connect", target=d.target)
            a.call("write_prompt", namespace="test", tokens=tokens, release=True)
    else:
        writer.call("write_prompt", namespace="test", tokens=tokens, release=True)
    client.evict("test", all=True)
    client.flush()


def test_a_tier_with_corrupt_tree_pages_is_moved_aside_at_start(daemon_factory: Any, tmp_path: Path) -> None:
    """Before: the daemon died at every start (SIGBUS, or LMDB's error at open)."""
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS]).start()
    old = prompt(4 * T, seed=1)
    with kvstore_client.connect(d.target) as client:
        write_and_flush(d, client, old)
        assert tiers(client).disk_pages == 4
    assert d.terminate() == 0
    assert corrupt_tree_pages(tmp_path / "disk" / "data.mdb", seed=5) > 0
    d.start()  # it starts...
    with kvstore_client.connect(d.target) as client:
        t = tiers(client)
        moved = Path(t.disk_moved_aside)
        assert moved.parent == tmp_path / "disk" and moved.name.startswith("corrupt-"), t
        assert (moved / "data.mdb").exists()  # ...the old tier is kept aside for a look
        assert str(moved) in d.stderr_text() and not t.disk_disabled
        assert client.lookup("test", old).hit_tokens == 0  # a miss, never its bytes
        new = prompt(4 * T, seed=2)  # ...and a fresh tier works
        write_and_flush(d, client, new)
        with Worker("reader") as b:
            b.call("connect", target=d.target)
            check_bytes(b, new, 4)
        assert client.health() == "SERVING"


def test_corruption_found_while_running_disables_the_tier_and_misses(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Before: the Lookup that touched the damaged tree failed with UNKNOWN (BadDbiError)."""
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS]).start()
    tokens = prompt(4 * T, seed=3)
    with kvstore_client.connect(d.target) as client:
        write_and_flush(d, client, tokens)
        assert corrupt_tree_pages(tmp_path / "disk" / "data.mdb", seed=7) > 0
        assert client.lookup("test", tokens).hit_tokens == 0  # a miss, not an error
        t = tiers(client)
        assert "corrupt" in t.disk_disabled, t
        assert "disabled" in d.stderr_text()
        with pytest.raises(Unavailable, match="corrupt"):
            client.flush()
        # The pool serves on: a new prompt is written and found, byte-identical.
        fresh = prompt(4 * T, seed=4)
        with Worker("writer") as a, Worker("reader") as b:
            a.call("connect", target=d.target)
            b.call("connect", target=d.target)
            a.call("write_prompt", namespace="test", tokens=fresh, release=True)
            check_bytes(b, fresh, 4)
        assert client.health() == "SERVING"
    # The next start moves the marked tier aside without having to find the damage again.
    assert d.terminate() == 0
    d.start()
    with kvstore_client.connect(d.target) as client:
        t = tiers(client)
        assert t.disk_moved_aside and not t.disk_disabled, t
        assert client.lookup("test", tokens).hit_tokens == 0


def test_a_deleted_tier_directory_fails_flush_and_is_surfaced(daemon_factory: Any, tmp_path: Path) -> None:
    """Before: flush went on acknowledging writes into a deleted file."""
    port = _free_port()
    server = tier_server("disk", tmp_path, metrics=f"127.0.0.1:{port}")
    d = daemon_factory(server=server, namespaces=[NS]).start()
    with kvstore_client.connect(d.target) as client:
        write_and_flush(d, client, prompt(4 * T, seed=5))
        shutil.rmtree(tmp_path / "disk")
        later = prompt(4 * T, seed=6)
        with Worker("writer") as a, Worker("reader") as b:
            a.call("connect", target=d.target)
            b.call("connect", target=d.target)
            a.call("write_prompt", namespace="test", tokens=later, release=True)
            with pytest.raises(Unavailable, match=r"gone|deleted"):
                client.flush()
            t = tiers(client)
            assert "gone" in t.disk_disabled or "deleted" in t.disk_disabled, t
            check_bytes(b, later, 4)  # still in the pool: served from there
        assert client.health() == "SERVING"
    # (The loop refreshes the metrics once a second.)
    wait_until(
        lambda: _scrape(port), lambda m: m[("kvstore_disk_disabled", ())] == 1, timeout=10, what="metric"
    )


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """A 16 MiB tmpfs: a real file system that fills up (mounting needs root, as here)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], check=True)
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_file_system_is_counted_and_the_tier_fits_itself(daemon_factory: Any, small_fs: Path) -> None:
    """Before: writes failed as EIO, disk_full_events stayed 0, nothing freed room, and
    disk_tier_bytes was never checked against the free space."""
    server = {"disk_tier_dir": str(small_fs / "disk"), "disk_tier_bytes": 64 << 20}
    d = daemon_factory(server=server, namespaces=[dict(NS, head_dim=64)]).start()  # 4 KiB pages
    with kvstore_client.connect(d.target) as client, Worker("writer") as a:
        a.call("connect", target=d.target)
        t = tiers(client)
        assert t.disk_capacity_bytes <= 16 << 20  # clamped to the file system, with a warning
        assert "does not fit in its file system" in d.stderr_text()
        for i in range(20):
            write_and_flush(d, client, prompt(4 * T, seed=100 + i), a)
        # Something else takes the rest of the file system.
        ballast = small_fs / "ballast"
        with open(ballast, "wb", buffering=0) as f, contextlib.suppress(OSError):
            while f.write(b"\1" * (64 << 10)):
                pass
        for i in range(40):
            a.call("write_prompt", namespace="test", tokens=prompt(4 * T, seed=200 + i), release=True)
            client.evict("test", all=True)
            try:
                client.flush()
            except ResourceExhausted as e:  # typed, and says why
                assert "file system is full" in str(e)
        t = tiers(client)
        assert t.disk_full_events > 0 and t.disk_fs_full_errors > 0, t
        assert not t.disk_disabled and client.health() == "SERVING"
        ballast.unlink()
        last = prompt(4 * T, seed=300)
        write_and_flush(d, client, last, a)  # a flush acknowledges again...
        assert client.lookup("test", last).hit_tokens == 4 * T  # ...and the tier serves it


def test_demotions_past_the_queue_bound_are_dropped_and_counted(daemon_factory: Any, tmp_path: Path) -> None:
    """Before: every demotion queued a copy, unbounded. With a 1 MiB bound, one Evict of
    8 MiB demotes faster than the writer drains: the rest is dropped (counted), a miss."""
    server = tier_server("disk", tmp_path, disk_queue_bytes=1 << 20, disk_tier_bytes=64 << 20)
    ns = dict(NS, head_dim=2048, num_pages=128)  # 64 KiB pages
    d = daemon_factory(server=server, namespaces=[ns]).start()
    tokens = prompt(128 * T, seed=8)
    with kvstore_client.connect(d.target) as client, Worker("writer") as a, Worker("reader") as b:
        a.call("connect", target=d.target)
        b.call("connect", target=d.target)
        a.call("write_prompt", namespace="test", tokens=tokens, release=True)
        assert client.evict("test", all=True).pages_evicted == 128
        client.flush()
        t = tiers(client)
        assert 0 < t.disk_queue_dropped < 128 and t.disk_pages == 128 - t.disk_queue_dropped, t
        found = b.call("lookup", namespace="test", tokens=tokens, pin=True)  # what is there is right
        assert found["hit_tokens"] < 128 * T
        checked = b.call("verify", namespace="test", tokens=tokens, slots=found["slots"])
        assert checked["mismatched"] == []
        if found["pin_id"]:  # (no pin when the first page was one of those dropped)
            b.call("release_pin", pin_id=found["pin_id"])


def test_flush_streams_within_the_queue_bound_while_other_rpcs_are_answered(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """Before: Flush copied every sealed page onto the queue at once, on the loop."""
    server = tier_server("disk", tmp_path, disk_queue_bytes=1 << 20, disk_tier_bytes=256 << 20)
    ns = dict(NS, head_dim=2048, num_pages=512)  # 32 MiB of 64 KiB pages
    d = daemon_factory(server=server, namespaces=[ns]).start()
    with kvstore_client.connect(d.target) as client, Worker("writer") as a:
        a.call("connect", target=d.target)
        for i in range(8):
            a.call("write_prompt", namespace="test", tokens=prompt(64 * T, seed=50 + i), release=True)
        result: list[Any] = []
        flush = threading.Thread(target=lambda: result.append(client.flush()))
        flush.start()
        during = []  # Stats answered while that Flush was running
        while flush.is_alive():
            t = tiers(client)
            if t.flushes_running:
                during.append(t)
        flush.join()
        assert result[0].pages_written == 512
        assert during, "no Stats was answered while the flush ran"
        assert all(t.disk_queued_bytes <= (1 << 20) + (64 << 10) for t in during), during
        t = wait_until(lambda: tiers(client), lambda t: t.disk_pages == 512, timeout=10, what="pages")
        assert t.flushes_running == 0
