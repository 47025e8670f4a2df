"""The daemon's own miss-ratio curve: a SHARDS sample (kvstore/mrc.py) of every namespace's
block accesses, for `Admin.Mrc` (docs/policies.md, "Why was this a miss, and how big").

What is an access. A request looks its prompt up, then appends it (the transformers
adapter, and any engine that reuses a prefix); each full page of the prompt is one access
of its block, in order, under prefix semantics. The daemon sees both calls, so each block
must be counted once:

- `Lookup` records the blocks it touches: its hits and its first miss (the hashes it
  computes anyway; it stops hashing there). It remembers, in its session, how many pages
  it recorded, keyed by the prompt's first block hash (`Session.mrc_lookups`, bounded).
- `Append` records every page it hashes (cached or to be written), except the first pages
  of a sequence that its session's lookup of the same prompt already recorded
  (`Sequence.mrc_skip`): so lookup-then-append counts each block once, an append alone
  counts all of them, and a chunked prefill (several appends) skips the same pages.

Cost on the hot paths: no sampling test per block. A call hands its list of block hashes over as it is
(`LiveMrc.add`); the sampling test (the first 3 bytes of a BLAKE2b digest are uniform, so they
are the spatial hash: a block is sampled iff they are under the threshold) and the sampler's
bookkeeping for the sampled blocks run later, in C, in a batch of calls. The rate
starts so that the pool's capacity is about `SAMPLED_POOL_PAGES` sampled blocks (1.0 for a
pool of up to that many pages) and halves whenever the sample holds more than `MAX_KEYS`
distinct blocks (fixed-size SHARDS); the log keeps the last `MAX_LOG` sampled accesses.
The curve is computed on a copy, off the event loop (kvstore/observe/mrc_curve.py).
"""

from __future__ import annotations

import copy
from asyncio import _get_running_loop
from collections import OrderedDict

from kvstore.mrc import MODULUS, MrcSampler

SAMPLED_POOL_PAGES = 4096  # a pool of N pages is sampled at min(1, this / N)
MAX_KEYS = 1 << 14  # distinct sampled blocks before the rate halves
MAX_LOG = 1 << 17  # sampled accesses kept (the curve is of recent history)
PENDING_ADDS = 32  # calls queued before they are recorded (LiveMrc)
PENDING_MAX = 4 * PENDING_ADDS  # queued calls recorded at once, whether or not a turn of the loop came
LOOKUPS_REMEMBERED = 256  # per session: lookups waiting for the append of their prompt


def py_record_known(
    keys: dict[bytes, int], blocks: list[bytes], log: list[int], gaps: list[int], gap: int, threshold: int
) -> int:
    """The sampled blocks are those whose leading 3 bytes (big-endian) are under `threshold`.
    If every one of them is in `keys`: its spatial hash appended to `log`, and `gap` then zeros
    to `gaps`; returns how many. Else nothing changes; -1. kvstore/_mrcrecord.c does the same in
    C; this is its fallback and its reference."""
    cut = threshold.to_bytes(3, "big") if threshold < MODULUS else None
    sampled = blocks if cut is None else [b for b in blocks if b[:3] < cut]
    try:
        known = list(map(keys.__getitem__, sampled))
    except KeyError:
        return -1
    if known:
        log += known
        gaps.append(gap)
        gaps += [0] * (len(known) - 1)
    return len(known)


def py_record_new(
    keys: dict[bytes, int],
    distinct: set[int],
    blocks: list[bytes],
    start: int,
    log: list[int],
    gaps: list[int],
    gap: int,
    threshold: int,
    max_keys: int,
) -> tuple[int, int]:
    """LiveMrc.add's loop over blocks[start:]: each block's spatial hash (remembered in `keys`,
    or made from its leading bytes: those 3 big-endian are what `cut` compares, skipped at
    `threshold` or more) appended to `log`, `gap` then zeros to `gaps`, and added to
    `distinct`. Returns (the index to go on from, how many were appended): after the block
    that makes `distinct` hold more than `max_keys` (the caller lowers the rate first), else
    at the end. kvstore/_mrcrecord.c does the same in C; this is its fallback and reference."""
    recorded = 0
    for i in range(start, len(blocks)):
        block = blocks[i]
        h = keys.get(block)
        if h is None:
            h = int.from_bytes(block[:3], "big") | (int.from_bytes(block[3:11], "big") << 24)
            if h % MODULUS >= threshold:
                continue
            keys[block] = h
        log.append(h)
        gaps.append(0 if recorded else gap)
        recorded += 1
        if h not in distinct:
            distinct.add(h)
            if len(distinct) > max_keys:
                return i + 1, recorded
    return len(blocks), recorded


try:  # (absent where the extension is not built)
    from kvstore._chainhash import record_known, record_new
except ImportError:
    record_known, record_new = py_record_known, py_record_new


class LiveMrc:
    """One namespace's sample: a block hash is sampled iff its leading 3 bytes (big-endian)
    are under the sampler's threshold.

    `add` queues its call and records the queue every `PENDING_ADDS` calls, in order: the
    sample is what recording each call as it came would make, and `sampler` (and `snapshot`)
    record the queue before they answer. Recorded one call at a time, each Lookup's blocks
    were looked up in the sample's dict while the call's other work had pushed them out of
    the caches; a run of calls records on warm ones (BENCHMARKS.md, rpc). On the event loop
    the queue is recorded in the loop's next turn, not in the call that filled it, so that
    call's reply is not held up by 32 calls' recording (a call at concurrency 1 waited ~0.1-0.2
    ms); a loop that does not turn gets it recorded at `PENDING_MAX`. A call's blocks are
    queued unfiltered and tested against the threshold as they are recorded (in C): the test
    costs the call nothing, and the threshold, which only falls, is the one recording each
    call as it came would have used."""

    __slots__ = ("_pending", "_sampler", "_soon")

    def __init__(self, num_pages: int) -> None:
        self._sampler = MrcSampler(min(1.0, SAMPLED_POOL_PAGES / max(1, num_pages)), MAX_KEYS, MAX_LOG)
        self._pending: list[tuple[int, list[bytes]]] = []
        self._soon = False  # a turn of the loop will record the queue

    @property
    def sampler(self) -> MrcSampler:
        """The sample, every call added so far recorded in it."""
        if self._pending:
            self.record_pending()
        return self._sampler

    def add(self, accesses: int, blocks: list[bytes]) -> None:
        """`accesses` block accesses, `blocks` their hashes in order (the sampled ones are
        picked as they are recorded). The caller hands `blocks` over: it must not change it
        afterwards."""
        pending = self._pending
        pending.append((accesses, blocks))
        if len(pending) < PENDING_ADDS or (self._soon and len(pending) < PENDING_MAX):
            return
        loop = None if self._soon else _get_running_loop()
        if loop is None:
            self.record_pending()
        else:
            self._soon = True
            loop.call_soon(self._record_soon)

    def _record_soon(self) -> None:
        self._soon = False
        if self._pending:
            self.record_pending()

    def record_pending(self) -> None:
        """Record the queued calls, oldest first."""
        pending, self._pending = self._pending, []
        for accesses, blocks in pending:
            self._record(accesses, blocks)

    def _record(self, accesses: int, blocks: list[bytes]) -> None:
        """MrcSampler.record_sampled for each of `blocks` under the threshold, in C
        (record_known, record_new)."""
        s = self._sampler
        base = s.accesses
        if blocks:
            keys, log, gaps, distinct = s._keys, s._log, s._gaps, s._distinct
            # Every sampled block sampled before (the common case), so each in `distinct`
            # already: what the loop below does for them, in one step each (a gap: kvstore/mrc.py
            # says why).
            recorded = record_known(keys, blocks, log, gaps, base - s._last_seen, s.threshold)
            if recorded > 0:
                s._last_seen = base
            if recorded >= 0:
                blocks = []  # (else some are new, nothing was recorded: the loop below)
            i = 0
            while i < len(blocks):  # (an append's new pages; more than one turn: the rate fell)
                i, recorded = record_new(
                    keys, distinct, blocks, i, log, gaps, base - s._last_seen, s.threshold, s.max_keys
                )
                if recorded:
                    s._last_seen = base
                if len(distinct) > s.max_keys:
                    s._lower_rate()  # rebinds the lists and filters `keys`
                    keys, log, gaps, distinct = s._keys, s._log, s._gaps, s._distinct
            if len(log) > s.max_log:
                s._forget_head()
        s.accesses = base + accesses

    def snapshot(self) -> MrcSampler:
        """A copy whose `curve()` may run on another thread while this one records."""
        sampler = self.sampler
        snap = copy.copy(sampler)
        snap._log = list(sampler._log)
        snap._gaps = []
        snap._keys = {}
        snap._distinct = set()
        return snap


def remember_lookup(lookups: OrderedDict[bytes, int], first_hash: bytes, pages: int) -> None:
    """A session's lookup recorded `pages` pages of the prompt starting with `first_hash`."""
    lookups[first_hash] = pages
    lookups.move_to_end(first_hash)
    if len(lookups) > LOOKUPS_REMEMBERED:
        lookups.popitem(last=False)
