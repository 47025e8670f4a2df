"""The lane client's poll for its reply (client/kvstore_client/lane.py, `_polled`): a call
polls its socket for `$KVSTORE_LANE_SPIN_US` before it sleeps in recv. What must hold: the
reply is read whole and unchanged whichever way it comes (during the poll, after it, in
pieces), a closed connection is still noticed, the poll never runs past a call's deadline,
and the setting is read as documented."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import kvstore_client
import numpy as np
import pytest
from e2e_helpers import prompt, prompt_bytes
from kvstore_client import lane
from kvstore_client.errors import DeadlineExceeded
from kvstore_proto import lane as wire

NS = "test"  # tests/daemon.py: 4 tokens a page
T = 4


# ---------------------------------------------------------------- the setting


def test_the_spin_is_read_from_the_environment_and_off_on_one_cpu(monkeypatch) -> None:
    if len(os.sched_getaffinity(0)) > 1:
        assert lane.spin_ns({}) == lane.DEFAULT_SPIN_US * 1000
        assert lane.spin_ns({lane.SPIN_ENV: " 50 "}) == 50_000
    assert lane.spin_ns({lane.SPIN_ENV: "0"}) == 0
    for bad in ("fast", "1.5", "-3"):
        with pytest.raises(ValueError, match=lane.SPIN_ENV):
            lane.spin_ns({lane.SPIN_ENV: bad})
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert lane.spin_ns({lane.SPIN_ENV: "500"}) == 0  # one CPU: polling would only delay the daemon


# ---------------------------------------------------------------- reading a reply


def reply_frame(payload: bytes, code: int = 0) -> bytes:
    return wire.reply(code, payload)


def later(seconds: float, action) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    t.start()
    return t


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    lane._blocking_in_slices(ours)  # as a lane connection is set up
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_reply_that_comes_during_the_poll_is_read_by_the_poll(pair) -> None:
    ours, theirs = pair
    payload = os.urandom(3000)
    # A session already ended makes the sleeping read give up (_Closed) at the end of its first
    # slice: so the reply, sent 50 ms in, can only have been read by the poll.
    ended = threading.Event()
    ended.set()
    lane._slice(ours, 0.01)
    sender = later(0.05, lambda: theirs.sendall(reply_frame(payload)))
    assert lane._read_reply(ours, None, ended, spin_ns=5_000_000_000) == (0, payload)
    sender.join()
    # ...and without the poll the wait is the sleeping read's, which gives up after one slice.
    with pytest.raises(lane._Closed):
        lane._read_reply(ours, None, ended, spin_ns=0)


def test_a_reply_after_the_poll_or_in_pieces_is_read_whole(pair) -> None:
    ours, theirs = pair
    payload = os.urandom(200_000)  # more than one recv's worth
    frame = reply_frame(payload, code=5)
    sender = later(0.05, lambda: theirs.sendall(frame))  # after a 1 us poll: the sleeping read
    assert lane._read_reply(ours, None, None, spin_ns=1000) == (5, payload)
    sender.join()

    def in_pieces() -> None:
        for cut in (frame[:3], frame[3:10], frame[10:70_000], frame[70_000:]):
            theirs.sendall(cut)
            time.sleep(0.01)

    sender = later(0.0, in_pieces)
    assert lane._read_reply(ours, None, None, spin_ns=1_000_000_000) == (5, payload)
    sender.join()


def test_a_connection_closed_during_the_poll_is_noticed(pair) -> None:
    ours, theirs = pair
    closer = later(0.02, theirs.close)
    with pytest.raises(lane._Closed):
        lane._read_reply(ours, None, None, spin_ns=5_000_000_000)
    closer.join()


def test_the_poll_stops_at_the_calls_deadline(pair) -> None:
    ours, _theirs = pair
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        lane._read_reply(ours, t0 + 0.2, None, spin_ns=30_000_000_000)  # a 30 s poll
    assert time.monotonic() - t0 < 5, "the poll ran past the call's deadline"


# ---------------------------------------------------------------- on a real daemon


def test_calls_with_a_long_poll_keep_their_bytes_and_their_deadline(daemon, monkeypatch) -> None:
    monkeypatch.setenv(lane.SPIN_ENV, str(30_000_000))  # 30 s: every reply comes while polling
    tokens = prompt(3 * T, seed=71)
    with kvstore_client.connect(daemon.target, timeout_s=0.5) as kv:
        assert kv.lane and kv._lane.spin_ns == 30_000_000_000
        want = prompt_bytes(tokens, kv.namespace(NS).page_shape, T)
        kv.put(NS, tokens, want)
        out = np.zeros(len(want), dtype=np.uint8)
        assert kv.get(NS, tokens, out).hit_tokens == 3 * T
        assert out.tobytes() == want

        daemon.signal(signal.SIGSTOP)  # a daemon that does not answer: the deadline ends the poll
        t0 = time.monotonic()
        try:
            with pytest.raises(DeadlineExceeded):
                kv.get(NS, tokens)
        finally:
            daemon.signal(signal.SIGCONT)
        assert time.monotonic() - t0 < 10, "the poll ran past the call's 0.5 s deadline"
        out[:] = 0
        assert kv.get(NS, tokens, out).hit_tokens == 3 * T  # on a new lane connection
        assert out.tobytes() == want
