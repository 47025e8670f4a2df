"""Admin.Explain through a real daemon: why each page of a prompt hit or missed. Prompts are
evicted on purpose (Evict RPC, pool pressure), never stored, stored under another namespace
or model fingerprint, or demoted to the host tier; bad input gets clear errors."""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import kvstore_client
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import assert_status, page_content, page_content_bytes, page_tokens_of, prompt, wait_until
from kvstore_client.errors import KVStoreClientError
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from kvstore.hashing import block_hashes

T = SMALL_NAMESPACE["page_tokens"]
NS = dict(SMALL_NAMESPACE, num_pages=16, policy="lru")


def write(kv: kvstore_client.Client, namespace: str, tokens: list[int]) -> int:
    """Store `tokens` (all full pages sealed) and release; returns the sequence id."""
    with kv.allocate(namespace) as seq:
        seq.append(tokens)
        seq.commit()
        return seq.sequence_id


def verdicts(r: pb.ExplainResponse) -> list[str]:
    return [pb.ExplainVerdict.Name(p.verdict) for p in r.pages]


@pytest.fixture
def kv(daemon_factory: Any) -> Any:
    d = daemon_factory(namespaces=[NS]).start()
    with kvstore_client.connect(d.target, client_name="explain") as client:
        yield client


def test_evict_rpc_all_is_explained_with_when_and_why(kv: Any) -> None:
    tokens = prompt(8 * T, seed=1)
    write(kv, "test", tokens)
    r = kv.explain("test", tokens)
    assert verdicts(r) == ["HIT_POOL"] * 8 and r.hit_tokens == 8 * T
    assert "every full page is cached (8 pool)" in r.summary

    assert kv.evict("test", all=True).pages_evicted == 8
    r = kv.explain("test", [*tokens, 1, 2])  # a partial last page is not a page
    assert r.num_tokens == 8 * T + 2 and len(r.pages) == 8 and r.hit_tokens == 0
    first = r.pages[0]
    assert first.verdict == pb.EVICTED
    assert first.evicted_for == "Evict RPC (all)" and first.evicted_by == "lru"
    assert abs(first.evicted_unix_ms / 1000 - time.time()) < 60
    assert first.block_hash == block_hashes(b"namespace:test", tokens, T)[0]
    # Later pages: unreachable, and where they are (evicted too: leaves go first).
    assert verdicts(r)[1:] == ["AFTER_MISS"] * 7
    assert all(p.where == pb.EVICTED for p in r.pages[1:])
    assert r.summary.startswith("0 hit tokens of 34: page 0 was evicted ")
    assert "by Evict RPC (all) (policy lru)" in r.summary and "7 later pages unreachable" in r.summary


def test_evict_prefix_leaves_the_head_hitting(kv: Any) -> None:
    tokens = prompt(8 * T, seed=2)
    write(kv, "test", tokens)
    kv.evict("test", prefix=tokens[: 5 * T])  # page 4 and everything after it
    r = kv.explain("test", tokens)
    assert verdicts(r) == ["HIT_POOL"] * 4 + ["EVICTED"] + ["AFTER_MISS"] * 3
    assert r.pages[4].evicted_for == f"Evict RPC (prefix of {5 * T} tokens)"
    assert r.hit_tokens == 4 * T and r.summary.startswith(
        f"{4 * T} hit tokens of {8 * T}: page 4 was evicted"
    )


def test_pool_pressure_names_the_appending_sequence(kv: Any) -> None:
    old = prompt(8 * T, seed=3)
    write(kv, "test", old)
    new = prompt(16 * T, seed=4)  # the whole pool: every page of `old` must go
    seq_id = write(kv, "test", new)
    r = kv.explain("test", old)
    assert r.pages[0].verdict == pb.EVICTED, r
    assert r.pages[0].evicted_by == "lru"
    assert r.pages[0].evicted_for == f"append of {16 * T} tokens to sequence {seq_id}"
    assert f"by lru to make room for append of {16 * T} tokens to sequence {seq_id}" in r.summary


def test_never_stored_and_other_model(daemon_factory: Any) -> None:
    ns = dict(NS, model_fingerprint="sha256:aaaa")
    d = daemon_factory(namespaces=[ns]).start()
    with kvstore_client.connect(d.target) as kv:
        stored = prompt(4 * T, seed=5)
        write(kv, "test", stored)
        r = kv.explain("test", prompt(3 * T, seed=6))
        assert verdicts(r) == ["NEVER_STORED", "AFTER_MISS", "AFTER_MISS"]
        assert [p.where for p in r.pages[1:]] == [pb.NEVER_STORED] * 2
        assert (
            r.summary
            == f"0 hit tokens of {3 * T}: page 0 was never stored in 'test'; 2 later pages unreachable"
        )

        r = kv.explain("test", stored, model_fingerprint="sha256:bbbb")
        assert verdicts(r) == ["OTHER_MODEL"] * 4 and r.hit_tokens == 0
        assert all(p.where == pb.HIT_POOL for p in r.pages)  # stored, but not for this model
        assert "sha256:bbbb" in r.summary and "sha256:aaaa" in r.summary
        assert verdicts(kv.explain("test", stored, model_fingerprint="sha256:aaaa")) == ["HIT_POOL"] * 4


def test_other_namespace_is_found_under_its_own_salt(daemon_factory: Any) -> None:
    d = daemon_factory(namespaces=[dict(NS, name="a"), dict(NS, name="b")]).start()
    with kvstore_client.connect(d.target) as kv:
        tokens = prompt(4 * T, seed=7)
        write(kv, "a", tokens)
        r = kv.explain("b", tokens)
        assert verdicts(r) == ["OTHER_NAMESPACE"] + ["AFTER_MISS"] * 3
        assert r.pages[0].other_namespace == "a" and all(p.where == pb.OTHER_NAMESPACE for p in r.pages[1:])
        assert "not in 'b' but in namespace 'a'" in r.summary
        # Evicted here and present there: evicted, and the detail says where it is.
        write(kv, "b", tokens)
        kv.evict("b", all=True)
        r = kv.explain("b", tokens)
        assert r.pages[0].verdict == pb.EVICTED and "resident in namespace 'a'" in r.pages[0].detail


def test_host_tier_pages_are_hits(daemon_factory: Any) -> None:
    d = daemon_factory(namespaces=[NS], server={"host_tier_bytes": 256 << 10}).start()
    with kvstore_client.connect(d.target) as kv:
        tokens = prompt(6 * T, seed=8)
        write(kv, "test", tokens)
        kv.evict("test", all=True)
        r = kv.explain("test", tokens)
        assert verdicts(r) == ["HIT_HOST"] * 6 and r.hit_tokens == 6 * T
        assert "every full page is cached (6 host)" in r.summary
        assert kv.lookup("test", tokens).hit_tokens == 6 * T  # and a lookup does hit them
        assert verdicts(kv.explain("test", tokens)) == ["HIT_POOL"] * 6


def test_bad_input_is_refused_clearly(kv: Any) -> None:
    with pytest.raises(KVStoreClientError) as e:
        kv.explain("nope", [1, 2, 3, 4])
    assert_status(e.value, grpc.StatusCode.NOT_FOUND, "namespace 'nope' does not exist", "known: test")
    with pytest.raises(KVStoreClientError) as e:
        kv.explain("test", [1, 2, -3, 4])
    assert_status(e.value, grpc.StatusCode.INVALID_ARGUMENT, "token_ids[2]=-3 is out of range")
    with pytest.raises(KVStoreClientError) as e:
        kv.explain("test", [1, 2, 3, 4], extra_keys=b"x" * 2000)
    assert_status(e.value, grpc.StatusCode.INVALID_ARGUMENT, "extra_keys has 2000 bytes")
    r = kv.explain("test", [1, 2])
    assert not r.pages and "fewer than one page" in r.summary


def test_cli_explain_table_json_and_tokens_file(daemon_factory: Any, tmp_path: Any, capsys: Any) -> None:
    from kvstore_client.cli.admin import main

    d = daemon_factory(namespaces=[NS]).start()
    tokens = prompt(4 * T, seed=9)
    with kvstore_client.connect(d.target) as kv:
        write(kv, "test", tokens)
        kv.evict("test", prefix=tokens[: 3 * T])
    ids = ",".join(map(str, tokens))
    assert main(["--target", d.target, "explain", "--namespace", "test", "--tokens", ids]) == 0
    out = capsys.readouterr().out
    assert "PAGE  TOKENS  VERDICT" in out and "hit_pool" in out and "evicted" in out
    assert out.strip().splitlines()[-1].startswith(f"{2 * T} hit tokens of {4 * T}: page 2 was evicted ")
    assert "after_miss (evicted)" in out

    f = tmp_path / "prompt.txt"
    f.write_text(" ".join(map(str, tokens[:8])) + "\n" + ",".join(map(str, tokens[8:])))
    assert (
        main(["--target", d.target, "explain", "--namespace", "test", "--tokens-file", str(f), "--json"]) == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert [p["verdict"] for p in got["pages"]] == ["hit_pool", "hit_pool", "evicted", "after_miss"]
    assert got["pages"][3]["where"] == "evicted" and got["hit_tokens"] == 2 * T
    assert got["pages"][2]["evicted_for"] == f"Evict RPC (prefix of {3 * T} tokens)"

    f.write_text("1 2 x3")
    assert main(["--target", d.target, "explain", "--namespace", "test", "--tokens-file", str(f)]) == 2
    assert "'x' at offset 4 is not part of a token id" in capsys.readouterr().err
    assert main(["--target", d.target, "explain", "--namespace", "nope", "--tokens", "1,2"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_a_corrupt_page_on_disk_is_dropped_corrupt(daemon_factory: Any, tmp_path: Any) -> None:
    server = {"disk_tier_dir": str(tmp_path / "disk"), "disk_tier_bytes": 16 << 20}
    d = daemon_factory(namespaces=[NS], server=server).start()
    tokens = prompt(4 * T, seed=10)
    with kvstore_client.connect(d.target) as kv:
        with kv.allocate("test") as seq:
            for p in seq.append(tokens).writable_pages:
                content = page_content(p.index, page_tokens_of(tokens, p.index, T), seq.namespace.page_shape)
                seq.namespace.page(p.slot).copy_(content)
            seq.commit()
        kv.flush()
    assert d.terminate() == 0
    data = tmp_path / "disk" / "data.mdb"  # flip bytes of page 2 (every copy LMDB left)
    raw = bytearray(data.read_bytes())
    shape = [NS["num_layers"], 2, T, NS["num_kv_heads"], NS["head_dim"]]
    needle, at = page_content_bytes(2, page_tokens_of(tokens, 2, T), shape)[100:164], 0
    while (at := raw.find(needle, at)) >= 0:
        raw[at : at + 8] = bytes(b ^ 0xFF for b in raw[at : at + 8])
    data.write_bytes(bytes(raw))
    d.start()
    with kvstore_client.connect(d.target) as kv:
        wait_until(lambda: kv.stats().tiers, lambda t: not t.reindex_running, timeout=10, what="re-index")
        assert kv.lookup("test", tokens).hit_tokens == 2 * T  # promotes 0 and 1; 2 fails its checksum
        r = kv.explain("test", tokens)
        assert verdicts(r) == ["HIT_POOL", "HIT_POOL", "DROPPED_CORRUPT", "AFTER_MISS"]
        assert r.pages[2].evicted_by == "disk tier" and "corrupt" in r.pages[2].evicted_for
        assert r.pages[3].where == pb.HIT_DISK  # still stored, unreachable
        assert "page 2 was dropped " in r.summary and "(1 of them still stored)" in r.summary


def test_a_page_the_full_disk_tier_evicted_is_evicted_by_the_disk_tier(
    daemon_factory: Any, tmp_path: Any
) -> None:
    # A 2 MiB map keeps 1 MiB of headroom: pages of 4 KiB (head_dim 64) fill the rest after ~250.
    server = {"disk_tier_dir": str(tmp_path / "disk"), "disk_tier_bytes": 2 << 20}
    d = daemon_factory(namespaces=[dict(NS, head_dim=64)], server=server).start()
    with kvstore_client.connect(d.target) as kv:
        oldest = prompt(4 * T, seed=2000)
        for i in range(80):  # 320 pages, each evicted from the pool into the disk tier
            write(kv, "test", prompt(4 * T, seed=2000 + i))
            kv.evict("test", all=True)
        kv.flush()
        r = wait_until(
            lambda: kv.explain("test", oldest),
            lambda r: r.pages[0].verdict == pb.EVICTED,
            timeout=10,
            what="the disk tier's eviction reaching Explain",
        )
        assert r.pages[0].evicted_by == "disk tier (horizon)" and r.pages[0].evicted_for == "disk tier full"
        assert "ago from the disk tier (policy horizon): disk tier full" in r.summary
