"""A put whose Seal the daemon carried out but whose reply never came (the caller's deadline
passed, or it cancelled: found by `kvstore-bench soak`'s cancellations): the caller gets that
error, DEADLINE_EXCEEDED, not the NOT_FOUND of the library's cleanup (its Release of a
sequence the Seal had already turned into the next put's credit), and the session leaks
nothing. Driven through the library's own flow with the real daemon; only the reply of the
Seal is dropped, after the daemon has answered it."""

from __future__ import annotations

import kvstore_client
import pytest
from daemon import DaemonProcess
from e2e_helpers import Raw, prompt, wait_until
from kvstore_client._put import put
from kvstore_client.errors import DeadlineExceeded
from kvstore_client.fastpath import drive

NS = "test"  # tests/daemon.py: 4 tokens a page, 1 KiB pages


def test_a_seal_whose_reply_is_lost_raises_its_own_error_and_leaks_nothing(daemon: DaemonProcess) -> None:
    tokens = prompt(8, seed=7)
    with kvstore_client.connect(daemon.target, client_name="put-reply-lost") as kv:
        ns = kv.namespace(NS)
        sent: list[str] = []

        def run(call: object) -> object:
            reply = kv._run(call)  # type: ignore[arg-type]
            sent.append(call.method)  # type: ignore[attr-defined]
            if call.method == "Seal":  # type: ignore[attr-defined]
                raise DeadlineExceeded("the reply came after the caller's deadline")
            return reply

        with pytest.raises(DeadlineExceeded):
            kw = dict(extra_keys=b"", max_tokens=0, options=None, fingerprint="")  # as Client.put
            drive(run, put(kv, ns, tokens, bytes(2 * ns.pool.page_bytes), 0, **kw))
        assert sent[:2] == ["Reserve", "Seal"]
        assert kv.lookup(ns, tokens).hit_tokens == 8  # the Seal did happen
        kv.close()
    with Raw(daemon.target) as raw:
        wait_until(
            lambda: raw.counts(NS), lambda c: c["sessions"] == 0, timeout=10, what="the session to end"
        )
        assert raw.counts(NS)["pages_reserved"] == 0
