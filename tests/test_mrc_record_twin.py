"""A call's sampled blocks recorded in C (kvstore/_mrcrecord.c): `record_known` when all were
sampled before (a lookup's common case), `record_new` for the rest (an append's new pages):
the same sample as the Python they replaced (`py_record_known`, `py_record_new`), on twin
samplers fed random lookups, rate halvings and log trims included; and each C function
against its Python reference."""

from __future__ import annotations

import random

import pytest

from kvstore.store import live_mrc
from kvstore.store.live_mrc import LiveMrc, py_record_known, py_record_new, record_known, record_new


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
    assert record_new is not py_record_new


@pytest.mark.parametrize("seed", range(3))
def test_the_sample_is_the_python_ones(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(seed)
    ours, theirs = LiveMrc(64), LiveMrc(64)
    for m in (ours, theirs):  # (small bounds: the rate halves and the log is trimmed)
        m.sampler.max_keys, m.sampler.max_log = 40, 300
    blocks = [rng.randbytes(16) for _ in range(120)]
    known_runs = new_runs = 0
    for step in range(600):
        start = rng.randrange(len(blocks))
        found = blocks[start : start + rng.randint(0, 12)]
        if rng.random() < 0.2:  # an append of pages never seen
            found = found + [rng.randbytes(16) for _ in range(rng.randint(1, 12))]
        for m, known, new in ((ours, record_known, record_new), (theirs, py_record_known, py_record_new)):
            monkeypatch.setattr(live_mrc, "record_known", known)
            monkeypatch.setattr(live_mrc, "record_new", new)
            sampled = [h for h in found if h < m.cut]
            all_known = all(h in m.sampler._keys for h in sampled)
            known_runs += bool(sampled) and all_known and m is ours
            new_runs += bool(sampled) and not all_known and m is ours
            m.add(len(found), sampled)
        assert state(ours) == state(theirs), step
    # (both paths, and halvings: the C loop stopped at max_keys and went on after it)
    assert known_runs > 100 and new_runs > 30 and ours.cut != live_mrc.ALL_SAMPLED


def test_record_known_matches_its_reference() -> None:
    keys = {b"a": 1, b"b": 2, b"c": 3}
    for blocks in ([b"a", b"b", b"a"], [b"c"], [], [b"a", b"x"], [b"x"]):
        got = ([9], [4]), ([9], [4])
        assert record_known(keys, blocks, *got[0], 7) == py_record_known(keys, blocks, *got[1], 7)
        assert got[0] == got[1], blocks
    log, gaps = [], []
    assert record_known(keys, [b"b", b"c"], log, gaps, 5) and (log, gaps) == ([2, 3], [5, 0])
    assert not record_known(keys, [b"b", b"nope"], log, gaps, 5) and (log, gaps) == ([2, 3], [5, 0])


def test_record_new_matches_its_reference() -> None:
    rng = random.Random(7)
    blocks = [rng.randbytes(16) for _ in range(40)]
    for threshold in (1 << 24, 1 << 23, 1 << 20):
        for start in (0, 5):
            for max_keys in (100, 12, 0):
                got = []
                for fn in (record_new, py_record_new):
                    keys, distinct, log, gaps = {blocks[3]: 77}, {77, 5}, [9], [4]
                    out = fn(keys, distinct, blocks, start, log, gaps, 6, threshold, max_keys)
                    got.append((out, keys, distinct, log, gaps))
                assert got[0] == got[1], (threshold, start, max_keys)
                assert got[0][0][0] <= len(blocks)
    # The gap goes to the first block recorded, zeros after; a block over the threshold is skipped.
    hi, lo = b"\xff" * 16, b"\x00\x00\x01" + b"\x00" * 7 + b"\x02" + b"\x00" * 5
    keys, distinct, log, gaps = {}, set(), [], []
    assert record_new(keys, distinct, [hi, lo, lo], 0, log, gaps, 3, 1 << 20, 10) == (3, 2)
    assert log == [1 | 2 << 24, 1 | 2 << 24] and gaps == [3, 0] and keys == {lo: 1 | 2 << 24}
    with pytest.raises(TypeError, match="block hash"):
        record_new({}, set(), [b"short"], 0, [], [], 0, 1 << 24, 10)
