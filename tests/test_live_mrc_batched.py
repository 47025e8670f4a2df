"""The live MRC records its calls in batches (LiveMrc.add queues, `sampler` and every
PENDING_ADDS-th call record the queue) and narrows its distinct blocks to the log's only when
the rate would fall (MrcSampler._forget_head, _lower_rate). Neither may change the sample:
twins fed the same random lookups and appends, one recording each call as it comes and
narrowing at every trim (the sampler as it was), must hold the same log, gaps, counts, rate
and cut, with rate halvings and trims on the way."""

from __future__ import annotations

import asyncio
import random

import pytest

from kvstore.mrc import MrcSampler
from kvstore.store import live_mrc
from kvstore.store.live_mrc import LiveMrc


class NarrowingAtEveryTrim(MrcSampler):
    """The sampler as it was: `_distinct` and `_keys` narrowed to the log at every trim."""

    def _forget_head(self) -> None:
        super()._forget_head()
        self._narrow_to_log()


def sample_of(m: LiveMrc) -> tuple:
    s = m.sampler  # (records what is queued)
    return (m.cut, s.accesses, s._last_seen, s._base, s.threshold, list(s._log), list(s._gaps))


@pytest.mark.parametrize("seed", range(4))
def test_batched_recording_keeps_the_sample(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    batched, each = LiveMrc(64), LiveMrc(64)
    narrowing = NarrowingAtEveryTrim(1.0, 40, 300)
    each._sampler = narrowing
    for m in (batched, each):  # (small bounds: the rate halves and the log is trimmed)
        m._sampler.max_keys, m._sampler.max_log = 40, 300
    blocks = [rng.randbytes(16) for _ in range(70)]
    queued_past_a_cut = 0
    for step in range(3000):
        start = rng.randrange(len(blocks))
        found = blocks[start : start + rng.randint(0, 12)]
        if rng.random() < 0.03:  # an append of pages never seen
            found = found + [rng.randbytes(16) for _ in range(rng.randint(1, 12))]
        # Each filters by the cut it has now: the batched one's moves only when it records.
        batched_sampled = [h for h in found if h < batched.cut]
        each_sampled = [h for h in found if h < each.cut]
        queued_past_a_cut += batched_sampled != each_sampled
        batched.add(len(found), batched_sampled)
        each.add(len(found), each_sampled)
        each.record_pending()
        if step % 97 == 0:  # a reader between batches (Admin.Mrc's snapshot)
            assert sample_of(batched) == sample_of(each), step
    assert sample_of(batched) == sample_of(each)
    s = batched.sampler
    assert s._distinct >= set(s._log) and s._distinct == set(s._keys.values())
    # (what the test is for happened: halvings, trims, and calls queued under an old cut)
    assert batched.cut != live_mrc.ALL_SAMPLED and s._base > 0 and queued_past_a_cut > 0


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
