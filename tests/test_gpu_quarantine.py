"""A client that goes away without closing, on a device pool (the fake device): its
reserved pages are quarantined until its process is gone, or for a fixed grace when its
pid cannot be watched; never handed to another writer while its GPU work may still run.

Real daemon, real sockets, a real client process; the daemon's page counts are the effect.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import kvstore_client
from daemon import SMALL_NAMESPACE
from e2e_helpers import Raw, prompt, wait_until
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

NS = "test"
TOTAL = SMALL_NAMESPACE["num_pages"]

# Reserves 3 pages, touches them as a kernel would, then loses its connection while the
# process lives on (as when a socket breaks before a dying process's GPU work ends).
HOLDER = textwrap.dedent(
    """
    import sys, kvstore_client
    c = kvstore_client.connect(sys.argv[1], client_name="holder")
    seq = c.allocate("test")
    res = seq.append(list(range(1, 13)))
    for p in res.writable_pages:
        c.namespace("test").page(p.slot).fill_(1)
    c._channel.close()
    print("ready", flush=True)
    sys.stdin.read()
    """
)


def counts(raw: Raw) -> dict[str, int]:
    ns, sessions = raw.stats(NS)
    return {
        "free": ns.pages_free,
        "reserved": ns.pages_reserved,
        "quarantined": ns.pages_quarantined,
        "sessions": sessions,
    }


def test_reserved_pages_wait_for_the_process_or_the_grace(daemon_factory, monkeypatch) -> None:
    monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "dev0")
    d = daemon_factory(
        server={"quarantine_grace_s": 3.0}, namespaces=[SMALL_NAMESPACE | {"device": "fake:dev0"}]
    ).start()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, d.target],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with Raw(d.target) as raw:
            # The holder's session ends (its stream broke); its process is alive: quarantined.
            got = wait_until(
                lambda: counts(raw), lambda c: c["sessions"] == 0, timeout=30, what="session end"
            )
            assert got == {"free": TOTAL - 3, "reserved": 3, "quarantined": 3, "sessions": 0}

            # A session whose pid the daemon was not told: its pages wait for the grace.
            sid = raw.kv.OpenSession(pb.OpenSessionRequest(client_name="no pid"), timeout=10).session_id
            seq = raw.kv.Allocate(pb.AllocateRequest(session_id=sid, namespace=NS), timeout=10).sequence_id
            append = pb.AppendRequest(session_id=sid, sequence_id=seq, token_ids=prompt(8, seed=1))
            raw.kv.Append(append, timeout=10)
            stream = raw.kv.KeepAlive(pb.KeepAliveRequest(session_id=sid))
            next(stream)
            stream.cancel()
            got = wait_until(
                lambda: counts(raw), lambda c: c["sessions"] == 0, timeout=30, what="session end"
            )
            assert got["quarantined"] == 5 and got["free"] == TOTAL - 5, got

            # The grace ends: the unwatched session's pages are free, the live process's are not.
            got = wait_until(
                lambda: counts(raw), lambda c: c["quarantined"] == 3, timeout=30, what="the grace"
            )
            assert got == {"free": TOTAL - 3, "reserved": 3, "quarantined": 3, "sessions": 0}

            holder.kill()
            holder.wait(timeout=30)
            got = wait_until(
                lambda: counts(raw), lambda c: c["quarantined"] == 0, timeout=30, what="its exit"
            )
            assert got == {"free": TOTAL, "reserved": 0, "quarantined": 0, "sessions": 0}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_session_closed_by_its_client_frees_at_once(daemon_factory, monkeypatch) -> None:
    monkeypatch.setenv("KVSTORE_FAKE_DEVICES", "dev0")
    d = daemon_factory(namespaces=[SMALL_NAMESPACE | {"device": "fake:dev0"}]).start()
    with Raw(d.target) as raw:
        with kvstore_client.connect(d.target) as c:
            seq = c.allocate(NS)
            for p in seq.append(prompt(12, seed=2)).writable_pages:
                c.namespace(NS).page(p.slot).fill_(1)
        # close() synchronized, then CloseSession: nothing can still write those pages.
        assert counts(raw) == {"free": TOTAL, "reserved": 0, "quarantined": 0, "sessions": 0}


def test_a_pid_is_watched_only_when_it_means_this_process_here() -> None:
    from kvstore.store.quarantine import exited, watch_pid

    ours = os.stat("/proc/self/ns/pid").st_ino
    # Not told, out of range, or from another pid namespace: no pidfd (the grace applies).
    assert watch_pid(0, ours) == watch_pid(-5, ours) == watch_pid(2**63 - 1, ours) == -1
    assert watch_pid(os.getpid(), ours + 1) == watch_pid(os.getpid(), 0) == -1
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    fd = watch_pid(child.pid, ours)
    try:
        assert fd >= 0 and not exited(fd)
        child.kill()
        child.wait()
        assert exited(fd)
    finally:
        os.close(fd)
