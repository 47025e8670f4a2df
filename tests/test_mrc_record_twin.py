"""A lookup's sampled blocks recorded in C when all were sampled before (kvstore/_mrcrecord.c
`record_known`, LiveMrc.add's common case): the same sample as the Python it replaced
(`py_record_known`), on twin samplers fed random lookups, rate halvings and log trims
included; and the C function against its Python reference."""

from __future__ import annotations

import random

import pytest

from kvstore.store import live_mrc
from kvstore.store.live_mrc import LiveMrc, py_record_known, record_known


def state(m: LiveMrc) -> tuple:
    s = m.sampler
    return (
        m.cut,
        s.accesses,
        s._last_seen,
        s.threshold,
        list(s._log),
        list(s._gaps),
        dict(s._keys),
        set(s._distinct),
    )


def test_the_extension_is_built():
    assert record_known is not py_record_known  # (else the twins compare Python to itself)


@pytest.mark.parametrize("seed", range(3))
def test_the_sample_is_the_python_ones(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    ours, theirs = LiveMrc(64), LiveMrc(64)
    for m in (ours, theirs):  # (small bounds: the rate halves and the log is trimmed)
        m.sampler.max_keys, m.sampler.max_log = 40, 300
    blocks = [rng.randbytes(16) for _ in range(120)]
    known_runs = 0
    for step in range(600):
        start = rng.randrange(len(blocks))
        found = blocks[start : start + rng.randint(0, 12)]
        for m, record in ((ours, record_known), (theirs, py_record_known)):
            monkeypatch.setattr(live_mrc, "record_known", record)
            sampled = [h for h in found if h < m.cut]
            known_runs += bool(sampled) and all(h in m.sampler._keys for h in sampled) and m is ours
            m.add(len(found), sampled)
        assert state(ours) == state(theirs), step
    assert known_runs > 100 and ours.cut != live_mrc.ALL_SAMPLED  # (both paths, and a halving)


def test_record_known_matches_its_reference() -> None:
    keys = {b"a": 1, b"b": 2, b"c": 3}
    for blocks in ([b"a", b"b", b"a"], [b"c"], [], [b"a", b"x"], [b"x"]):
        got = ([9], [4]), ([9], [4])
        assert record_known(keys, blocks, *got[0], 7) == py_record_known(keys, blocks, *got[1], 7)
        assert got[0] == got[1], blocks
    log, gaps = [], []
    assert record_known(keys, [b"b", b"c"], log, gaps, 5) and (log, gaps) == ([2, 3], [5, 0])
    assert not record_known(keys, [b"b", b"nope"], log, gaps, 5) and (log, gaps) == ([2, 3], [5, 0])
