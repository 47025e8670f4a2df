"""The live MRC records its calls in batches (LiveMrc.add queues, `sampler` and every
PENDING_ADDS-th call record the queue) and narrows its distinct blocks to the log's only when
the rate would fall (MrcSampler._forget_head, _lower_rate). Neither may change the sample:
twins fed the same random lookups and appends, one recording each call as it comes and
narrowing at every trim (the sampler as it was), must hold the same log, gaps, counts and
rate, with rate halvings, trims and calls queued before a halving on the way."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest

from kvstore.mrc import MODULUS, MrcSampler
from kvstore.store import live_mrc
from kvstore.store.live_mrc import LiveMrc


class NarrowingAtEveryTrim(MrcSampler):
    """The sampler as it was: `_distinct` and `_keys` narrowed to the log at every trim."""

    def _forget_head(self) -> None:
        super()._forget_head()
        self._narrow_to_log()


def sample_of(m: LiveMrc) -> tuple:
    s = m.sampler  # (records what is queued)
    return (s.accesses, s._last_seen, s._base, s.threshold, list(s._log), list(s._gaps))


def random_calls(rng: random.Random, n: int) -> Iterator[list[bytes]]:
    """`n` calls' block hashes: runs of 70 blocks, now and then an append of pages never seen."""
    blocks = [rng.randbytes(16) for _ in range(70)]
    for _ in range(n):
        start = rng.randrange(len(blocks))
        found = blocks[start : start + rng.randint(0, 12)]
        if rng.random() < 0.03:  # an append of pages never seen
            found = found + [rng.randbytes(16) for _ in range(rng.randint(1, 12))]
        yield found


@pytest.mark.parametrize("seed", range(4))
def test_batched_recording_keeps_the_sample(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    batched, each = LiveMrc(64), LiveMrc(64)
    narrowing = NarrowingAtEveryTrim(1.0, 40, 300)
    each._sampler = narrowing
    for m in (batched, each):  # (small bounds: the rate halves and the log is trimmed)
        m._sampler.max_keys, m._sampler.max_log = 40, 300
    queued_past_a_cut = 0
    for step, found in enumerate(random_calls(rng, 3000)):
        # The batched one's threshold moves only when it records: a call queued before it fell
        # is tested against the lower one.
        queued_past_a_cut += batched._sampler.threshold != each._sampler.threshold
        batched.add(len(found), found)
        each.add(len(found), found)
        each.record_pending()
        if step % 97 == 0:  # a reader between batches (Admin.Mrc's snapshot)
            assert sample_of(batched) == sample_of(each), step
    assert sample_of(batched) == sample_of(each)
    s = batched.sampler
    assert s._distinct >= set(s._log) and s._distinct == set(s._keys.values())
    # (what the test is for happened: halvings, trims, and calls queued under an old cut)
    assert s.threshold < MODULUS and s._base > 0 and queued_past_a_cut > 0


def record_call_by_hand(s: MrcSampler, blocks: list[bytes], max_log: int) -> None:
    """One call's blocks, a block at a time through MrcSampler.record_sampled: sampled iff the
    leading 3 bytes (big-endian) are under the threshold as it is then, every block of the call
    counted as seen at the call's start, the log trimmed after the call."""
    base = s.accesses
    s.max_log = 1 << 60
    for block in blocks:
        lead = int.from_bytes(block[:3], "big")
        if lead < s.threshold:
            s.accesses = base + 1  # (record_sampled takes accesses - 1 as the access's place)
            s.record_sampled(lead | int.from_bytes(block[3:11], "big") << 24)
    s.accesses, s.max_log = base + len(blocks), max_log
    if len(s._log) > max_log:
        s._forget_head()


@pytest.mark.parametrize("seed", range(3))
def test_the_sample_is_the_one_recorded_a_block_at_a_time(seed: int) -> None:
    """The filter by the threshold (in record_known and record_new) and the call's gap, against
    the sampler's own Python: unfiltered calls queued and recorded in batches must give what
    the threshold test and record_sampled give a block at a time."""
    rng = random.Random(seed)
    m, by_hand = LiveMrc(64), MrcSampler(1.0, 40, 300)
    m._sampler.max_keys, m._sampler.max_log = 40, 300
    skipped_calls = 0
    for step, found in enumerate(random_calls(rng, 3000)):
        skipped_calls += bool(found) and all(int.from_bytes(h[:3], "big") >= by_hand.threshold for h in found)
        m.add(len(found), found)
        record_call_by_hand(by_hand, found, 300)
        if step % 89 == 0:
            s = by_hand
            assert sample_of(m) == (s.accesses, s._last_seen, s._base, s.threshold, s._log, s._gaps), step
    assert by_hand.threshold < MODULUS and by_hand._base > 0 and skipped_calls > 100


def test_add_queues_until_the_batch_or_a_reader() -> None:
    m = LiveMrc(64)
    blocks = [bytes([i]) * 16 for i in range(4)]
    for _ in range(live_mrc.PENDING_ADDS - 1):
        m.add(4, list(blocks))
    assert len(m._pending) == live_mrc.PENDING_ADDS - 1 and m._sampler.accesses == 0
    m.add(4, list(blocks))  # the batch's last: all recorded
    assert not m._pending and m._sampler.accesses == 4 * live_mrc.PENDING_ADDS
    m.add(2, blocks[:2])
    assert m.snapshot().accesses == 4 * live_mrc.PENDING_ADDS + 2  # a reader records the queue
    assert not m._pending


def test_a_trim_leaves_distinct_until_the_rate_would_fall() -> None:
    s = MrcSampler(1.0, max_keys=50, max_log=100)
    for i in range(120):  # 40 blocks, then 80 accesses of 10 of them: a trim drops most of the 40
        s.record((i if i < 40 else i % 10).to_bytes(8, "little"))
    assert s._distinct_stale and len(s._distinct) == 40 > len(set(s._log))
    for i in range(40, 60):  # 20 new blocks: 60 in `_distinct`, past max_keys, but not in the log
        s.record(i.to_bytes(8, "little"))
    assert s.rate == 1.0 and not s._distinct_stale  # narrowed instead of halving
    assert s._distinct == set(s._log) and len(s._keys) == len(s._distinct) <= 50


def test_on_a_loop_the_queue_is_recorded_after_the_call_that_fills_it() -> None:
    # The call that fills the queue returns first (a Lookup's reply is not held up by the
    # recording); the next turn of the loop records it. A loop that does not turn gets the
    # queue recorded in the call that brings it to PENDING_MAX. Either way the sample is the
    # one recording each call makes.
    blocks = [bytes([i]) * 16 for i in range(8)]

    def add(m: LiveMrc, each: LiveMrc, i: int) -> None:
        found = blocks[i % 7 : i % 7 + 2]
        m.add(len(found), list(found))
        each.add(len(found), list(found))
        each.record_pending()

    async def main() -> None:
        m, each = LiveMrc(64), LiveMrc(64)
        for i in range(live_mrc.PENDING_ADDS):
            add(m, each, i)
        assert len(m._pending) == live_mrc.PENDING_ADDS
        await asyncio.sleep(0)
        assert m._pending == []
        assert sample_of(m) == sample_of(each)
        for i in range(live_mrc.PENDING_MAX - 1):
            add(m, each, i)
        assert len(m._pending) == live_mrc.PENDING_MAX - 1  # (no turn of the loop came)
        add(m, each, 3)
        assert m._pending == []  # recorded in the call
        await asyncio.sleep(0)  # (the turn that was asked for finds nothing left)
        assert sample_of(m) == sample_of(each) and m._sampler.accesses == each._sampler.accesses > 0

    asyncio.run(main())


def test_off_a_loop_the_call_that_fills_the_queue_records_it() -> None:
    m = LiveMrc(64)
    for i in range(live_mrc.PENDING_ADDS):
        m.add(1, [bytes([i]) * 16])
    assert m._pending == [] and m._sampler.accesses == live_mrc.PENDING_ADDS
