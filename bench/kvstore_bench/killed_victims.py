"""The clients of `kvstore-bench killed-clients` (kvstore_bench.killed): the victims, processes
that get to the middle of a write, tell the parent their session id and wait to be SIGKILLed;
and the reader, a thread of the parent that checks every page anyone may have sealed."""

from __future__ import annotations

import threading
from typing import Any

import grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc

from .proof_common import page_bytes, prompt_tokens, read_page, who_wrote, write_page

NS = "kc"
NAMESPACE = {
    "name": NS,
    "num_layers": 2,
    "num_kv_heads": 2,
    "head_dim": 16,
    "dtype": "float16",
    "page_tokens": 4,  # 1 KiB pages
    "num_pages": 1024,
}
PAGES = 4
SHARED_BASE = 0  # prompts the survivor sealed: 0 .. shared-1
VICTIM_BASE = 10_000  # prompts victims append (VICTIM_UNIVERSE of them, so victims overlap)
VICTIM_UNIVERSE = 64
PUT_BASE = 100_000  # put victims' own prompts (never sealed)
WRONG_BASE = 1_000_000  # the "wrong bytes" a victim leaves in pages it does not commit
KINDS = ("sequence", "put", "raw")


def victim_main(conn: Any, target: str, kind: str, vid: int, ttl: float, shared: int) -> None:
    """Get to the middle of a write, tell the parent (session id), then wait to be killed."""
    if kind == "raw":
        _raw_victim(conn, target, vid, ttl, shared)
        return
    import kvstore_client

    kv = kvstore_client.connect(target, client_name=f"victim-{vid}")
    ns = kv.namespace(NS)
    size = ns.pool.page_bytes
    if kind == "put":

        def write_wrong_then_wait(pages: Any, views: Any) -> None:
            for page in pages:
                write_page(ns, page.slot, page_bytes(WRONG_BASE + vid, page.index, size))
            conn.send({"session_id": kv.session_id, "reserved": len(pages)})
            conn.recv()  # never answered: killed here, between Reserve and Seal

        kv.put(ns, prompt_tokens(PUT_BASE + vid, PAGES, ns.page_tokens), write_wrong_then_wait)
        raise RuntimeError("the put finished: its pages were all sealed already")
    pid = VICTIM_BASE + vid % VICTIM_UNIVERSE
    seq = kv.allocate(ns)
    appended = seq.append(prompt_tokens(pid, PAGES, ns.page_tokens))
    commit = vid // len(KINDS) % 3  # (vid % 3 picks the kind)
    for page in appended.writable_pages:
        right = page.index < commit
        write_page(ns, page.slot, page_bytes(pid if right else WRONG_BASE + vid, page.index, size))
    if commit:
        seq.commit(commit * ns.page_tokens)
    if vid // len(KINDS) % 2:
        kv.lookup(ns, prompt_tokens(SHARED_BASE + vid % shared, PAGES, ns.page_tokens), pin=True)
    conn.send({"session_id": kv.session_id, "reserved": len(appended.writable_pages)})
    conn.recv()


def _raw_victim(conn: Any, target: str, vid: int, ttl: float, shared: int) -> None:
    with grpc.insecure_channel(target) as channel:
        kv = pb_grpc.KVStoreStub(channel)
        sid = kv.OpenSession(
            pb.OpenSessionRequest(client_name=f"raw-victim-{vid}", lease_ttl_ms=int(ttl * 1000)), timeout=10
        ).session_id
        seq = kv.Allocate(pb.AllocateRequest(session_id=sid, namespace=NS), timeout=10).sequence_id
        tokens = prompt_tokens(VICTIM_BASE + vid % VICTIM_UNIVERSE, PAGES, NAMESPACE["page_tokens"])
        kv.Append(pb.AppendRequest(session_id=sid, sequence_id=seq, token_ids=tokens), timeout=10)
        shared_tokens = prompt_tokens(SHARED_BASE + vid % shared, PAGES, NAMESPACE["page_tokens"])
        kv.Lookup(
            pb.LookupRequest(session_id=sid, namespace=NS, token_ids=shared_tokens, pin=True), timeout=10
        )
        conn.send({"session_id": sid})
        while not conn.poll(ttl / 3):  # a client without a stream renews its lease by hand
            try:
                kv.Heartbeat(pb.HeartbeatRequest(session_id=sid), timeout=10)
            except grpc.RpcError:  # starved past its lease on a loaded machine: the lease ended
                break  # its session (the daemon did its part); wait for the kill all the same
        conn.recv()


# ---------------------------------------------------------------- the reader (a thread here)


class Reader(threading.Thread):
    """Looks up every prompt anyone may have sealed, pinned, and compares each hit page."""

    def __init__(self, kv: Any, shared: int) -> None:
        super().__init__(name="reader", daemon=True)
        self.kv = kv
        self.ns = kv.namespace(NS)
        self.prompts = [SHARED_BASE + i for i in range(shared)] + [
            VICTIM_BASE + i for i in range(VICTIM_UNIVERSE)
        ]
        self.lock = threading.Lock()  # held per lookup; the checks take it to see no reader pin
        self.stop = threading.Event()
        self.pages_checked = 0
        self.lookups = 0
        self.mismatched: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.sweep()
                self.stop.wait(0.1)  # a reader, not a load: the victims need the CPUs
        except BaseException as e:
            self.error = e

    def sweep(self) -> None:
        size = self.ns.pool.page_bytes
        for pid in self.prompts:
            with (
                self.lock,
                self.kv.lookup(self.ns, prompt_tokens(pid, PAGES, self.ns.page_tokens), pin=True) as hit,
            ):
                self.lookups += 1
                for i, slot in enumerate(hit.slots):
                    got = read_page(self.ns, slot)
                    self.pages_checked += 1
                    if got != page_bytes(pid, i, size) and len(self.mismatched) < 20:
                        self.mismatched.append(f"prompt {pid} page {i} (slot {slot}): holds {who_wrote(got)}")
            if self.stop.is_set():
                return
