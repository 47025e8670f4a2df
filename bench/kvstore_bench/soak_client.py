"""One client process of `kvstore-bench soak` (kvstore_bench.soak): a paced loop of random
operations through the client library, checking every byte it reads back.

Operations, drawn by weight: allocate (+ append + write), append, commit, lookup (pinned,
held or released), release (a sequence or a pin), swap (preempt a sequence to the tiers below
the pool, or swap one back in and check all its pages), put, get, a cancellation (one of
lookup / allocate+append / put / get with a deadline too short to make it), and a session
close (then a new session). Prompts come from a universe every client shares, so clients hit,
deduplicate and race on each other's pages; every page's bytes say which prompt and page they
are (proof_common.page_bytes), so any page read back with other bytes is a wrong byte served.

Errors are sorted into expected and not: RESOURCE_EXHAUSTED anywhere (64 clients holding
sequences and pins in a small pool: pool pressure is the point), DEADLINE_EXCEEDED or
CANCELLED in a cancellation (that is its purpose), PinExpired in a get (its copy outlived
its pin on an overloaded machine: the bytes are withheld, by design). Anything else is
unexpected and counted, with examples.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

from .proof_common import page_bytes, prompt_tokens, read_page, who_wrote, write_page

MAX_PAGES = 4
MAX_SEQUENCES = 3
MAX_PINS = 2
WEIGHTS = {
    "allocate": 10,
    "append": 12,
    "commit": 10,
    "lookup": 15,
    "release": 10,
    "swap": 8,
    "put": 10,
    "get": 15,
    "cancel": 5,
    "close": 2,
}
CANCEL_DEADLINE_S = 0.0005


class Entry:
    """A sequence this client holds: prompt `pid`, `pages` appended (and written), of which
    `committed` sealed; `swapped` while preempted."""

    def __init__(self, seq: Any, pid: int) -> None:
        self.seq, self.pid, self.pages, self.committed, self.swapped = seq, pid, 0, 0, False


class SoakClient:
    def __init__(self, target: str, cid: int, seed: int, universe: int, namespace: str) -> None:
        self.target, self.cid, self.universe, self.ns_name = target, cid, universe, namespace
        self.rng = random.Random(seed)
        self.kv: Any = None
        self.ns: Any = None
        self.entries: list[Entry] = []
        self.pins: list[Any] = []
        self.ops: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.examples: list[str] = []
        self.wrong: list[str] = []
        self.pages_verified = 0
        self.sessions = 0

    # ---- the loop

    def run(self, stop_at: float, rate: float, report: Any, every_s: float) -> None:
        from kvstore_client.errors import KVStoreClientError, PinExpired

        self.open()
        names, weights = list(WEIGHTS), list(WEIGHTS.values())
        next_op = next_report = time.monotonic()
        while time.time() < stop_at:
            op = self.rng.choices(names, weights)[0]
            self.ops[op] += 1
            try:
                getattr(self, f"op_{op}")()
            except PinExpired:
                self.expected[f"{op}:PinExpired"] += 1
            except KVStoreClientError as e:
                code = e.code.name if e.code is not None else type(e).__name__
                self.classify(op, code, e.details)
            except Exception as e:  # a bug of ours or of the library: counted, then a new session
                self.classify(op, type(e).__name__, repr(e))
                self.reopen()
            next_op += 1.0 / rate
            time.sleep(max(0.0, next_op - time.monotonic()))
            if time.monotonic() >= next_report:
                next_report += every_s
                report.put((self.cid, self.snapshot(), False))
        self.close()
        report.put((self.cid, self.snapshot(), True))

    def classify(self, op: str, code: str, details: str) -> None:
        expected = code == "RESOURCE_EXHAUSTED" or (
            op == "cancel" and code in ("DEADLINE_EXCEEDED", "CANCELLED")
        )
        (self.expected if expected else self.unexpected)[f"{op}:{code}"] += 1
        if not expected and len(self.examples) < 5:
            self.examples.append(f"client {self.cid} {op}: {code}: {details}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "ops": dict(self.ops),
            "expected": dict(self.expected),
            "unexpected": dict(self.unexpected),
            "examples": self.examples,
            "wrong": self.wrong,
            "pages_verified": self.pages_verified,
            "sessions": self.sessions,
        }

    # ---- sessions

    def open(self) -> None:
        import kvstore_client

        self.kv = kvstore_client.connect(self.target, client_name=f"soak-{self.cid}")
        self.ns = self.kv.namespace(self.ns_name)
        self.entries, self.pins = [], []
        self.sessions += 1

    def close(self) -> None:
        if self.kv is not None:
            self.kv.close()  # the daemon releases what the session still holds
            self.kv = None

    def reopen(self) -> None:
        self.close()
        self.open()

    def op_close(self) -> None:
        self.reopen()

    # ---- checking bytes

    def check(self, pid: int, index: int, got: bytes, where: str) -> None:
        self.pages_verified += 1
        if got != page_bytes(pid, index, self.ns.pool.page_bytes) and len(self.wrong) < 10:
            self.wrong.append(f"client {self.cid} {where}: prompt {pid} page {index} holds {who_wrote(got)}")

    def tokens(self, pid: int) -> list[int]:
        return prompt_tokens(pid, MAX_PAGES, self.ns.page_tokens)

    def write(self, pid: int, pages: Any) -> None:
        for page in pages:
            write_page(self.ns, page.slot, page_bytes(pid, page.index, self.ns.pool.page_bytes))

    # ---- sequences

    def op_allocate(self, pages: int | None = None) -> None:
        if len(self.entries) >= MAX_SEQUENCES:
            return self.op_release()
        entry = Entry(self.kv.allocate(self.ns), self.rng.randrange(self.universe))
        self.entries.append(entry)
        self.append(entry, pages or self.rng.randint(1, 2))

    def append(self, entry: Entry, n: int) -> None:
        T = self.ns.page_tokens
        n = min(n, MAX_PAGES - entry.pages)
        res = entry.seq.append(self.tokens(entry.pid)[entry.pages * T : (entry.pages + n) * T])
        self.write(entry.pid, res.writable_pages)
        entry.pages += n

    def op_append(self) -> None:
        growing = [e for e in self.entries if not e.swapped and e.pages < MAX_PAGES]
        if growing:
            self.append(self.rng.choice(growing), 1)
        else:
            self.op_allocate()

    def op_commit(self) -> None:
        ready = [e for e in self.entries if not e.swapped and e.committed < e.pages]
        if ready:
            entry = self.rng.choice(ready)
            entry.seq.commit()
            entry.committed = entry.pages

    def op_release(self) -> None:
        if self.pins and (not self.entries or self.rng.random() < 0.5):
            self.pins.pop(self.rng.randrange(len(self.pins))).release()
        elif self.entries:
            self.entries.pop(self.rng.randrange(len(self.entries))).seq.release()

    def op_swap(self) -> None:
        swapped = [e for e in self.entries if e.swapped]
        if swapped and self.rng.random() < 0.6:
            entry = self.rng.choice(swapped)
            entry.seq.swap_in()
            entry.swapped = False
            for i, slot in enumerate(entry.seq.slots[: entry.pages]):
                self.check(
                    entry.pid, i, read_page(self.ns, slot), f"swap-in of sequence {entry.seq.sequence_id}"
                )
            return
        running = [e for e in self.entries if not e.swapped and e.pages]
        if running:
            entry = self.rng.choice(running)
            entry.seq.swap_out()
            entry.swapped = True

    # ---- lookups, put, get

    def op_lookup(self) -> None:
        pid = self.rng.randrange(self.universe)
        hit = self.kv.lookup(self.ns, self.tokens(pid), pin=True)
        for i, slot in enumerate(hit.slots):
            self.check(pid, i, read_page(self.ns, slot), "pinned lookup")
        if len(self.pins) < MAX_PINS and self.rng.random() < 0.5:
            self.pins.append(hit)
        else:
            hit.release()

    def op_put(self) -> None:
        pid = self.rng.randrange(self.universe)
        n = self.rng.randint(1, MAX_PAGES)
        size = self.ns.pool.page_bytes
        data = b"".join(page_bytes(pid, i, size) for i in range(n))
        self.kv.put(self.ns, self.tokens(pid)[: n * self.ns.page_tokens], data)

    def op_get(self) -> None:
        pid = self.rng.randrange(self.universe)
        got = self.kv.get(self.ns, self.tokens(pid))
        size = self.ns.pool.page_bytes
        data = got.data.numpy().tobytes()
        for i in range(got.pages):
            self.check(pid, i, data[i * size : (i + 1) * size], "get")

    def op_cancel(self) -> None:
        """One call with a deadline it cannot make: whatever the daemon did meanwhile is
        unknown to this client, so a sequence it may have changed is released."""
        what = self.rng.choice(["lookup", "allocate", "put", "get"])
        held = len(self.entries)
        saved, self.kv.timeout_s = self.kv.timeout_s, CANCEL_DEADLINE_S
        try:
            getattr(self, f"op_{what}")()
        finally:
            self.kv.timeout_s = saved
            if what == "allocate" and len(self.entries) > held and self.entries[-1].pages == 0:
                self.release_quietly(self.entries.pop())

    def release_quietly(self, entry: Entry) -> None:
        from kvstore_client.errors import KVStoreClientError

        try:
            entry.seq.release()
        except KVStoreClientError as e:
            self.classify("release-after-cancel", e.code.name if e.code else type(e).__name__, e.details)


def client_main(
    target: str,
    cid: int,
    seed: int,
    universe: int,
    namespace: str,
    stop_at: float,
    rate: float,
    report: Any,
    every_s: float,
) -> None:
    SoakClient(target, cid, seed, universe, namespace).run(stop_at, rate, report, every_s)
