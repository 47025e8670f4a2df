"""Cache budgets and the model fingerprint through a real daemon, with the client (sync and
asyncio): the client's page table follows the daemon's drops, private pages never reach
other clients' lookups, bad options and foreign models are refused by name."""

from __future__ import annotations

import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import Raw, prompt
from kvstore_client import SequenceOptions, errors

NS = "test"  # tests/daemon.py: 4 tokens a page, 64 pages
T = 4
TOTAL = 64
FP = "smollm2-135m:0123abcd"


@pytest.fixture
def target(daemon_factory) -> str:
    fp_ns = {**SMALL_NAMESPACE, "name": "fp", "model_fingerprint": FP}
    return daemon_factory(namespaces=[SMALL_NAMESPACE, fp_ns]).start().target


def test_sliding_window_through_the_daemon(target) -> None:
    tokens = prompt(40, seed=3)  # 10 pages
    with (
        kvstore_client.connect(target, client_name="a") as a,
        kvstore_client.connect(target, client_name="b") as b,
        Raw(target) as raw,
    ):
        seq = a.allocate(NS, options=SequenceOptions.sliding_window(window_tokens=8, sink_tokens=4))
        first = seq.append(tokens[:12])  # pages 0..2, window [4, 12): nothing dropped
        assert first.dropped == [] and seq.commit().sealed_pages == 3
        r = seq.append(tokens[12:])  # N=40: window [32, 40) = pages 8, 9; sink page 0
        assert r.dropped == [1, 2, 3, 4, 5, 6, 7]
        assert [(p.index, p.private) for p in r.pages] == [(8, True), (9, True)]
        assert seq.dropped == r.dropped and [p.index for p in seq.held_pages] == [0, 8, 9]
        assert len(seq.pages) == 10 and seq.slots == [p.slot for p in seq.held_pages]
        assert seq.commit().sealed_pages == 0  # post-drop pages are private
        counts = raw.counts(NS)
        assert (counts["pages_reserved"], counts["pages_sealed"], counts["pages_pinned"]) == (2, 3, 1)
        assert raw.stats(NS)[0].budget_dropped_pages == 7
        # Pages 1, 2 were sealed before the drop: unpinned but still cached for others.
        assert b.lookup(NS, tokens).hit_tokens == 12
        # The daemon's view matches the client's table.
        table = [(p.index, p.slot) for p in seq.held_pages]
        seq.refresh()
        assert [(p.index, p.slot) for p in seq.held_pages] == table and seq.dropped == r.dropped
        seq.release()
        assert raw.counts(NS)["pages_reserved"] == 0


def test_importance_and_bad_options_through_the_daemon(target) -> None:
    with kvstore_client.connect(target) as kv, Raw(target) as raw:
        seq = kv.allocate(NS, options=SequenceOptions.importance(budget_pages=3, sink_tokens=4))
        seq.append(prompt(12, seed=5))  # pages 0, 1, 2: at budget
        assert seq.report_importance([0.0, 0.9, 0.1]) == 3
        r = seq.append(prompt(4, seed=6))  # page 3: drop page 2 (0.1 < 0.9)
        assert r.dropped == [2] and [p.index for p in seq.held_pages] == [0, 1, 3]
        assert raw.counts(NS)["pages_reserved"] == 3
        with pytest.raises(errors.InvalidArgument, match=r"scores has 1 values but sequence \d+ has 4 pages"):
            seq.report_importance([1.0])
        plain = kv.allocate(NS)
        with pytest.raises(errors.FailedPrecondition, match=r"options\.mode=unconstrained"):
            plain.report_importance([])
        for options, needle in [
            (SequenceOptions.sliding_window(window_tokens=0), r"options\.window_tokens=0 must be > 0"),
            (SequenceOptions.sliding_window(window_tokens=4, sink_tokens=-1), r"options\.sink_tokens=-1"),
            (
                SequenceOptions.importance(budget_pages=1, sink_tokens=4),
                r"options\.budget_pages=1 is smaller",
            ),
        ]:
            with pytest.raises(errors.InvalidArgument, match=needle):
                kv.allocate(NS, options=options)
        assert raw.counts(NS)["sequences"] == 2


def test_model_fingerprint_mismatch_refused_and_nothing_changes(target) -> None:
    msg = (
        f"namespace 'fp' holds KV of model {FP}, this request is for model other:1; "
        "use a namespace made for this model"
    )
    with kvstore_client.connect(target) as kv, Raw(target) as raw:
        before = raw.stats("fp")[0]
        with pytest.raises(errors.FailedPrecondition) as e:
            kv.allocate("fp", max_tokens=8, model_fingerprint="other:1")
        assert e.value.details == msg
        with pytest.raises(errors.FailedPrecondition) as e:
            kv.lookup("fp", prompt(8, seed=1), pin=True, model_fingerprint="other:1")
        assert e.value.details == msg
        assert raw.stats("fp")[0] == before
        with kv.allocate("fp", model_fingerprint=FP) as seq:
            seq.append(prompt(8, seed=1))
        assert kv.lookup("fp", prompt(8, seed=1), model_fingerprint=FP).hit_tokens == 0
        kv.allocate(NS, model_fingerprint="other:1").release()  # no fingerprint: any model


async def test_aio_client_budgets_and_fingerprint(target) -> None:
    async with kvstore_client.aio.connect(target) as kv:
        seq = await kv.allocate(NS, options=SequenceOptions.importance(budget_pages=2))
        r = await seq.append(prompt(12, seed=7))  # 3 pages, budget 2, no sinks: page 0 goes
        assert r.dropped == [0] and [p.index for p in seq.held_pages] == [1, 2]
        assert await seq.report_importance([0.0, 1.0, 2.0]) == 2
        with pytest.raises(errors.FailedPrecondition, match="holds KV of model"):
            await kv.lookup("fp", prompt(4, seed=1), model_fingerprint="other:1")
