"""A call's sampled blocks recorded in C (kvstore/_mrcrecord.c): `record_known` when all were
sampled before (a lookup's common case), `record_new` for the rest (an append's new pages):
the same sample as the Python they replaced (`py_record_known`, `py_record_new`), on twin
samplers fed random lookups, rate halvings and log trims included; and each C function
against its Python reference."""

from __future__ import annotations

import random

import pytest

from kvstore.mrc import MODULUS
from kvstore.store import live_mrc
from kvstore.store.live_mrc import LiveMrc, py_record_known, py_record_new, record_known, record_new


def state(m: LiveMrc) -> tuple:
    s = m.sampler
    return (
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
            cut = m._sampler.threshold.to_bytes(4, "big")[1:]
            sampled = [h for h in found if h[:3] < cut]
            all_known = all(h in m.sampler._keys for h in sampled)
            known_runs += bool(sampled) and all_known and m is ours
            new_runs += bool(sampled) and not all_known and m is ours
            m.add(len(found), found)
        assert state(ours) == state(theirs), step
    # (both paths, and halvings: the C loop stopped at max_keys and went on after it)
    assert known_runs > 100 and new_runs > 30 and ours.sampler.threshold < MODULUS


def test_record_known_matches_its_reference() -> None:
    # Blocks by their leading 3 bytes: a, b and c under a threshold of 0x800000, x and y over it.
    a, b, c, x = b"\x00\x00\x01a", b"\x10\x00\x00b", b"\x7f\xff\xffc", b"\x80\x00\x00x"
    y = b"\xff\xff\xffy"
    keys = {a: 1, b: 2, c: 3}
    for threshold in (1 << 24, 1 << 23, 1 << 20, 0):
        for blocks in ([a, b, a], [c], [], [a, x], [x], [x, a, y, b], [a, b"\x00\x00\x02?"]):
            got = ([9], [4]), ([9], [4])
            n = record_known(keys, blocks, *got[0], 7, threshold)
            assert n == py_record_known(keys, blocks, *got[1], 7, threshold), (blocks, threshold)
            assert got[0] == got[1], (blocks, threshold)
    log, gaps = [], []
    assert record_known(keys, [b, c], log, gaps, 5, 1 << 24) == 2 and (log, gaps) == ([2, 3], [5, 0])
    # Under the threshold and not known: nothing changes. Over it: skipped, not counted.
    assert record_known(keys, [b, x], log, gaps, 5, 1 << 24) == -1 and (log, gaps) == ([2, 3], [5, 0])
    assert record_known(keys, [x, b, y, a], log, gaps, 6, 1 << 23) == 2
    assert (log, gaps) == ([2, 3, 2, 1], [5, 0, 6, 0])
    assert record_known(keys, [x, y], log, gaps, 6, 1 << 23) == 0 and (log, gaps) == (
        [2, 3, 2, 1],
        [5, 0, 6, 0],
    )
    with pytest.raises(TypeError, match="block hash"):
        record_known(keys, [b"\x00\x01"], [], [], 0, 1 << 24)


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
