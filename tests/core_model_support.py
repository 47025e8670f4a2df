"""The model of tests/test_core_model.py (its geometry, what a session and a sequence hold)
and its invariants, checked against the real store, pool, host tier and disk tier
(white-box: they read the structures that must agree with each other).

`content(block_hash)` is what the model wrote into every page of that hash; a sealed page
anywhere (pool, host tier, disk tier) must hold exactly those bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

import grpc
from hypothesis import strategies as st
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.hashing import block_hashes, namespace_salt, token_bytes
from kvstore.memory.pages import PageState
from kvstore.store.namespace import Namespace
from kvstore.store.quarantine import QUARANTINE_OWNER
from kvstore.store.sessions import PrivateEntry, PrivateRead
from kvstore.store.store import Store
from kvstore.store.tiering.promotion import PROMOTING_OWNER, Promotion
from kvstore.store.tiering.tiers import SWAP_SUFFIX
from kvstore.store.types import NamespaceSpec, StoreLimits
from kvstore.tiers import DiskTier, HostTier
from tests.test_store_stateful import common_prefix

T = 2
PAGES = 8
VOCAB = 4
TTL = 10.0
LIMITS = StoreLimits(max_request_tokens=32, lease_ttl_default_s=TTL, lease_ttl_max_s=20.0, max_sessions=3)
# 4 KiB pages: whole OS pages in LMDB's data file, so dropping the page cache sends disk
# promotions to the reader threads (in flight) instead of copying them on the loop.
SPEC = NamespaceSpec(
    name="ns", num_layers=1, num_kv_heads=1, head_dim=512, dtype="float16", page_tokens=T, num_pages=PAGES
)
PB = SPEC.page_bytes
SALT = namespace_salt(SPEC.name, SPEC.salt)
HOST_BYTES = 3 * PB
READERS = 2  # the disk tier's reader threads
DISK_BYTES = 8 << 20  # ~1500 pages: far more than an example writes, so the disk never evicts
WAIT_S = 30.0  # nothing the model awaits takes this long: past it, the store hung

tokens_st = st.lists(st.integers(0, VOCAB - 1), max_size=8)
picks = st.integers(0, 15)  # which session, sequence or pin a rule takes (modulo how many)
shares = st.tuples(st.booleans(), picks, st.integers(0, 14))  # (reuse a prompt?, which, how much)


def pick(items: list, i: int):
    return items[i % len(items)]


def hashes_of(tokens: list[int]) -> list[bytes]:
    return block_hashes(SALT, tokens, T, b"")


def common_pages(a: list[int], b: list[int]) -> int:
    return common_prefix(a, b) // T


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code


class Context:
    """What a servicer method uses of grpc's context: abort (raises, as grpc's does)."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


@dataclass
class SeqModel:
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    committed: int = 0
    swapped: bool = False
    written: dict[int, bytes] = field(default_factory=dict)  # page index -> bytes last written


@dataclass
class SessionModel:
    seqs: dict[int, SeqModel] = field(default_factory=dict)
    pins: dict[int, list[int]] = field(default_factory=dict)  # pin id -> the tokens of its hit


def content(block_hash: bytes, nbytes: int) -> bytes:
    """The bytes every page sealed under `block_hash` holds."""
    return hashlib.shake_128(b"sealed" + block_hash).digest(nbytes)


def private_content(seq_id: int, index: int, tokens: bytes, nbytes: int) -> bytes:
    """The bytes of a page that is nobody's prefix (partial, or private to a budget)."""
    return hashlib.shake_128(b"private%d/%d/" % (seq_id, index) + tokens).digest(nbytes)


def write_page(ns: Namespace, slot: int, data: bytes) -> None:
    """Put a page's bytes in the pool as a client's completed write would: in place in shm;
    through the staging path on a device pool (the model drives the store, not a client)."""
    ns.pool.copy_in(ns.offset(slot), len(data))[:] = data
    ns.pool.landed(ns.offset(slot))


def check_pool(ns: Namespace) -> None:
    """free + reserved + sealed = total, the counters agree with the page table, and every
    sealed page holds its hash's bytes."""
    pages = ns.pages.pages
    on_device = ns.pool.handle.on_device
    by = Counter(p.state for p in pages)
    assert by[PageState.FREE] + by[PageState.RESERVED] + by[PageState.SEALED] == len(pages)
    assert by[PageState.FREE] == len(ns.pages.free)
    assert ns.pages.dirty_free == sum(p.dirty for p in pages if p.state is PageState.FREE)
    assert by[PageState.RESERVED] == ns.pages_reserved
    assert by[PageState.SEALED] == len(ns.index)
    assert ns.pages_pinned == sum(p.refcount > 0 for p in pages if p.state is PageState.SEALED)
    for p in pages:
        if p.state is PageState.SEALED:
            assert ns.index.get(p.block_hash) is p
            assert bytes(ns.page_out(p.slot)) == content(p.block_hash, ns.spec.page_bytes), (
                f"sealed {p} does not hold its hash's bytes"
            )
            # (page_out reads staged bytes as the page's: a sealed page's must have landed)
            assert not (on_device and ns.pool.is_staged(ns.offset(p.slot))), f"sealed {p} never landed"  # type: ignore[attr-defined]
        else:
            assert p.refcount == 0 and not p.children


def holders(store: Store, ns: Namespace) -> tuple[Counter[int], dict[int, object], list[int]]:
    """(references each sealed slot should have, who holds each RESERVED slot, RESERVED slots
    of aborted swap-ins that a reader thread still writes into: freed once it is done)."""
    refs: Counter[int] = Counter()
    owner: dict[int, object] = {}
    reading: list[int] = []

    def reserve(page, who: object, want_owner: int) -> None:
        assert page.state is PageState.RESERVED and page.owner == want_owner, f"{page} held by {who}"
        assert page.slot not in owner, f"slot {page.slot} owned twice: {owner[page.slot]} and {who}"
        owner[page.slot] = who

    def hold(page, who: object) -> None:
        if page.state is PageState.RESERVED:
            reserve(page, who, page.owner)
        else:
            assert page.state is PageState.SEALED, f"{who} holds a free page {page}"
            refs[page.slot] += 1

    live_pins = set()
    swapped = 0
    for session in store.sessions.values():
        for seq in session.sequences.values():
            assert store.table._owner[seq.id] is session
            for page in seq.pages:
                if page is not None:
                    if page.state is PageState.RESERVED:
                        reserve(page, f"sequence {seq.id}", seq.id)
                    else:
                        hold(page, f"sequence {seq.id}")
            for page in seq.spare:
                reserve(page, f"sequence {seq.id} (spare)", seq.id)
            if seq.swapped is not None:
                assert not seq.pages and not seq.spare and seq.held == 0
                swapped += sum(e is not None for e in seq.swapped.entries)
                reading += [
                    p.slot for p in ns.pages.pages if p.state is PageState.RESERVED and p.owner == seq.id
                ]
            ticket = seq.swap_in
            if ticket is not None:
                assert seq.swapped is not None, "a swap-in under way of a sequence not swapped out"
                live_pins.add(id(ticket.holder))
                for item in ticket.pages:
                    if isinstance(item, PrivateRead):
                        reserve(item.page, f"swap-in of {seq.id} (reading)", seq.id)
                    elif item is not None and not isinstance(item, Promotion):
                        hold(item, f"swap-in of {seq.id}")
                for page in ticket.holder.pages + ticket.spare:
                    hold(page, f"swap-in of {seq.id} (settled, spare)")
        for pin in session.pins.values():
            assert store.table._owner[pin.id] is session
            live_pins.add(id(pin))
            for page in pin.pages:
                assert page.state is PageState.SEALED
                refs[page.slot] += 1
    quarantined = [page for held in store.quarantine.held for page in held.pages.get(ns, [])]
    for page in quarantined:  # a dead client's reserved device pages (store/quarantine.py)
        reserve(page, "quarantine", QUARANTINE_OWNER)
    assert ns.pages_quarantined == len(quarantined)
    live_ids = {i for s in store.sessions.values() for i in (*s.sequences, *s.pins)}
    assert set(store.table._owner) == live_ids, "ids of ended sessions' sequences or pins are left"
    tiers = ns.tiers
    if tiers is not None:
        assert tiers.swapped_pages == swapped
        for prom in tiers.promoting.values():
            assert prom.ok is None, "a settled promotion is still filed as in flight"
            reserve(prom.page, f"promotion of {prom.key}", PROMOTING_OWNER)
            if prom.parent_page is not None:
                hold(prom.parent_page, f"promotion of {prom.key} (parent)")
            if prom.parent is not None and prom.parent.ok:
                hold(prom.parent.sealed, f"promotion of {prom.key} (sealed parent)")
            for pin in prom.pins:
                assert id(pin) in live_pins, "a promotion would give its page to a dead pin"
    return refs, owner, [slot for slot in reading if slot not in owner]


def check_holders(store: Store, ns: Namespace, reads_in_flight: bool = False) -> None:
    """Every page is owned once; every sealed page's refcount equals its holders: sequences,
    pins, swap-ins under way and promotions in flight. Nothing is held for a dead session.
    `reads_in_flight`: an aborted swap-in's page may still be read into (freed once read)."""
    refs, owner, reading = holders(store, ns)
    assert reads_in_flight or not reading, f"slots {reading} reserved for a swapped sequence by nobody"
    for p in ns.pages.pages:
        if p.state is PageState.SEALED:
            assert p.refcount == refs[p.slot], f"{p} has refcount {p.refcount} but {refs[p.slot]} holders"
        elif p.state is PageState.RESERVED:
            assert p.slot in owner or p.slot in reading, f"{p} is reserved by nobody (leaked)"
        else:
            assert p.slot not in owner and not refs[p.slot]


def swap_keys(store: Store) -> set:
    """The keys of the swapped sequences' private records below the pool."""
    return {
        e.key
        for s in store.sessions.values()
        for q in s.sequences.values()
        if q.swapped is not None
        for e in q.swapped.entries
        if isinstance(e, PrivateEntry)
    }


def check_host(host: HostTier, ns_name: str, page_bytes: int, swap_keys: set) -> None:
    """free + used slots = total in each size class, no slot held twice, bytes within the
    capacity, every page holds its hash's bytes, and swap records only of live sequences."""
    st = host.stats()
    assert st["pages"] == len(host.keys())
    assert st["slab_bytes"] <= host.capacity_bytes
    assert st["bytes_used"] == sum(e.meta.page_bytes for e in host._entries.values())
    used: set[tuple[int, int]] = set()
    for key, e in host._entries.items():
        assert (id(e.slab), e.slot) not in used and e.slot not in e.slab.free, f"host slot of {key} twice"
        used.add((id(e.slab), e.slot))
        if key.namespace == ns_name:
            assert bytes(e.slab.slot(e.slot)) == content(key.block_hash, page_bytes), f"host {key} bytes"
        else:
            assert key.namespace == ns_name + SWAP_SUFFIX and key in swap_keys, f"stray host record {key}"
    for cls in host._classes.values():
        total = sum(s.nbytes // s.slot_bytes for s in cls.slabs)
        assert sum(len(s.free) for s in cls.slabs) + cls.pages == total


def check_disk(disk: DiskTier) -> None:
    """What the disk tier holds fits in it (one snapshot: its writer thread runs meanwhile)."""
    st = disk.stats()
    assert 0 <= st["bytes_used"] <= disk.soft_limit_bytes
    assert st["pages"] * 4096 <= st["bytes_used"] or not st["pages"]


class ModelSteps:
    """The machine's helpers: drive the loop, write and check pages as the engine would. (The
    machine has `loop`, `dir`, `store`, `ns`, `tiers`, `sessions` and `prompts`.)"""

    def run(self, coro):
        return self.loop.run_until_complete(asyncio.wait_for(coro, WAIT_S))

    async def _call(self, method, request):
        try:
            reply = await method(request, Context())
        except Aborted as e:
            return e
        # Lookup answers with its reply's encoded bytes (kvstore/server/edge.py ENCODED_REPLIES):
        # parsed here as a client's stub would.
        return pb.LookupResponse.FromString(reply) if isinstance(reply, bytes) else reply

    def call(self, method, request):
        return self.run(self._call(method, request))

    def settle(self) -> None:
        """Run the loop until every promotion in flight has settled."""

        async def wait() -> None:
            while self.tiers.promoting or holders(self.store, self.ns)[2]:
                if self.tiers.promoting:
                    await asyncio.wait([p.future() for p in self.tiers.promoting.values()])
                else:  # an aborted swap-in's page, freed once its read is done
                    await asyncio.sleep(0.001)

        self.run(wait())

    def seqs(self, swapped: bool | None = None) -> list[tuple[int, int]]:
        return [
            (sid, q)
            for sid, s in self.sessions.items()
            for q, m in s.seqs.items()
            if swapped is None or m.swapped == swapped
        ]

    def prompt(self, share: tuple[bool, int, int], tokens: list[int]) -> list[int]:
        """Often a prefix of an earlier prompt plus `tokens`, so pages are shared."""
        if self.prompts and share[0]:
            old = pick(self.prompts[-8:], share[1])
            tokens = old[: share[2] % (len(old) + 1)] + tokens
        return tokens[:14]

    def open_session(self) -> None:
        sid = self.store.open_session("model", 0.0).session_id
        self.sessions[sid] = SessionModel()

    def check_served(self, tokens: list[int], slots, hashes: bytes, ready: int) -> int:
        """A hit: the hashes of the prompt's first pages, each ready slot holding their bytes."""
        want = hashes_of(tokens)
        k = len(slots)
        assert hashes == b"".join(want[:k])
        for i, slot in enumerate(list(slots)[:ready]):
            assert bytes(self.ns.page_out(slot)) == content(want[i], PB), f"page {i} served wrong bytes"
        return k

    def write_pages(self, sid: int, seq: int, refs) -> None:
        """What the engine does after Append: write the KV of every page it must write."""
        m = self.sessions[sid].seqs[seq]
        for p in refs:
            if p.cached:
                assert bytes(self.ns.page_out(p.slot)) == content(p.block_hash, PB)
                continue
            if p.block_hash and not p.private:
                data = content(p.block_hash, PB)
            else:
                data = private_content(
                    seq, p.index, token_bytes(m.tokens[p.index * T : (p.index + 1) * T]), PB
                )
            write_page(self.ns, p.slot, data)
            m.written[p.index] = data

    def check_view(self, sid: int, seq: int) -> None:
        """A sequence's pages hold what was written there (sealed: its hash's bytes)."""
        m = self.sessions[sid].seqs[seq]
        view = self.store.sequence_view(sid, seq)
        assert view.num_tokens == len(m.tokens) and view.committed_tokens == m.committed
        for p in view.pages:
            got = bytes(self.ns.page_out(p.slot))
            assert got == (content(p.block_hash, PB) if p.cached else m.written[p.index]), f"page {p.index}"

    def pin_settled(self, sid: int, pin_id: int, tokens: list[int]) -> None:
        """A pin once its promotions settled: a promotion that failed ends its hit early."""
        pin = self.store.sessions[sid].pins[pin_id]
        assert not pin.pending
        self.check_served(tokens, [p.slot for p in pin.pages], b"".join(p.block_hash for p in pin.pages), 99)
        self.sessions[sid].pins[pin_id] = tokens[: len(pin.pages) * T]

    def held_floor(self, tokens: list[int]) -> int:
        """Pages a lookup of `tokens` must hit: what live sequences sealed and pins hold."""
        floor = 0
        for sid, s in self.sessions.items():
            for seq, m in s.seqs.items():
                sealed = 0
                for page in self.store.sessions[sid].sequences[seq].pages:
                    if page is None or page.state is not PageState.SEALED:
                        break
                    sealed += 1
                floor = max(floor, min(common_pages(m.tokens, tokens), sealed))
            for held in s.pins.values():
                floor = max(floor, common_pages(held, tokens))
        return floor

    def flushable(self) -> set[bytes]:
        """What a flush started now acknowledges: every sealed page in the pool and host tier."""
        out = {p.block_hash for p in self.ns.sealed_pages()}
        return out | {k.block_hash for k in self.tiers.host.keys() if k.namespace == "ns"}  # noqa: SIM118

    def drop_page_cache(self):
        fd = os.open(self.dir / "disk" / "data.mdb", os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
