"""Quantized tiers through the real daemon: a namespace configured `tier_dtype = "int8"` keeps
its evicted pages as int8 records in the host tier and on disk, a lookup promotes them back
within the error bound (read from the daemon's shared memory), Stats and `kvstore-admin stats`
report the compression, and bad precision fields are refused with the field's name while
the daemon serves on. fp namespaces are covered, byte for byte, by test_e2e_tiers.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import kvstore_client
import numpy as np
import pytest
from daemon import SMALL_NAMESPACE
from e2e_helpers import page_content, page_content_bytes, page_tokens_of, prompt, read_page, wait_until
from kvstore_client.errors import InvalidArgument
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from test_cli_admin import admin
from test_e2e_tiers import tier_server
from test_metrics import _free_port, _scrape

T = 16  # (a sequence's first 4 tokens, its sinks, are kept exact; the rest of its first page is int8)
NS = dict(SMALL_NAMESPACE, page_tokens=T, num_pages=16, tier_dtype="int8", tier_error_bound=0.05)
SHAPE = [NS["num_layers"], 2, T, NS["num_kv_heads"], NS["head_dim"]]


def rel_err(got: bytes, want: bytes) -> float:
    g, w = (np.frombuffer(b, np.float16).astype(np.float64) for b in (got, want))
    return float(np.linalg.norm(g - w) / np.linalg.norm(w))


def test_an_int8_namespace_round_trips_through_host_and_disk_within_its_bound(
    daemon_factory: Any, tmp_path: Path
) -> None:
    port = _free_port()
    d = daemon_factory(
        server=tier_server("both", tmp_path, metrics=f"127.0.0.1:{port}"), namespaces=[NS]
    ).start()
    tokens = prompt(4 * T, seed=170)
    want = [page_content_bytes(i, page_tokens_of(tokens, i, T), SHAPE) for i in range(4)]
    with kvstore_client.connect(d.target) as client:
        ns = client.namespace("test")
        assert (ns.info.tier_precision.dtype, ns.info.tier_precision.error_bound) == ("int8", 0.05)
        seq = client.allocate(ns)
        for page in seq.append(tokens).writable_pages:
            ns.page(page.slot).copy_(page_content(page.index, page_tokens_of(tokens, page.index, T), SHAPE))
        assert seq.commit().sealed_pages == 4
        seq.release()
        assert client.evict("test", all=True).pages_evicted == 4
        # (the records are made on the quantizer's threads, and placed when made)
        t = wait_until(lambda: client.stats().tiers, lambda t: t.host_pages == 4, timeout=30, what="records")
        assert t.quantized_pages == 4 and t.quant_layers_int8 == 4 * NS["num_layers"]
        assert t.host_pages == 4 and t.host_bytes_represented == 4 * len(want[0])
        assert t.host_bytes_represented > 1.3 * t.host_bytes_used, t
        assert client.flush().pages_written == 4  # the records, to disk as they are
        t = client.stats().tiers
        assert t.disk_pages == 4 and t.disk_bytes_represented == 4 * len(want[0])

        with client.lookup("test", tokens, pin=True) as hit:
            assert hit.hit_tokens == 4 * T
            got = [read_page(d.target, "test", slot) for slot in hit.slots]  # the daemon's pool
        errors = [rel_err(g, w) for g, w in zip(got, want, strict=True)]
        assert max(errors) <= 0.05 and min(errors) > 0, errors  # lossy, within the bound
        t = client.stats().tiers
        assert t.dequantized_pages == 4 and t.dequantize_failures == 0 and t.corrupt_pages == 0

    deadline = time.monotonic() + 10  # (the daemon refreshes its metrics once a second)
    while (m := _scrape(port)).get(("kvstore_tier_dequantized_pages_total", ())) != 4:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m[("kvstore_tier_quant_layers_total", (("precision", "int8"),))] == 8
    assert m[("kvstore_tier_quantized_pages_total", ())] == 4
    assert m[("kvstore_tier_bytes_represented", (("tier", "host"),))] == 4 * len(want[0])
    assert m[("kvstore_tier_quantize_seconds_total", ())] > 0

    r = admin("stats", target=d.target)
    assert r.returncode == 0, r.stderr
    assert "compression" in r.stdout and "8 int8" in r.stdout, r.stdout  # 4 pages x 2 layers
    r = admin("namespaces", target=d.target)
    assert "test: stored below the pool as int8, error bound 0.05" in r.stdout, r.stdout
    assert "Traceback" not in d.stderr_text()


@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ({"dtype": "int2"}, "tier_dtype='int2' must be one of fp, int8, int4"),
        ({"dtype": "int4", "schedule": "int8:3"}, "names 3 layers; the namespace has 2"),
        ({"dtype": "int8", "error_bound": 1.5}, "tier_error_bound=1.5 must be in [0, 1)"),
    ],
)
def test_bad_tier_precision_is_invalid_argument_naming_the_field(
    daemon_factory: Any, precision: dict[str, Any], message: str
) -> None:
    d = daemon_factory(namespaces=[SMALL_NAMESPACE]).start()
    with kvstore_client.connect(d.target) as client:
        spec = pb.NamespaceSpec(
            name="q2",
            geometry=pb.Geometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype=pb.FLOAT16, page_tokens=4),
            num_pages=8,
            tier_precision=pb.TierPrecision(**precision),
        )
        with pytest.raises(InvalidArgument) as e:
            client.create_namespace(spec)
        assert message in str(e.value)
        made = client.create_namespace(  # the daemon serves on, and takes a good one
            "q3",
            num_layers=2,
            num_kv_heads=2,
            head_dim=16,
            dtype="float16",
            page_tokens=4,
            num_pages=8,
            tier_dtype="int4",
            tier_schedule="int8:1",
            tier_error_bound=0.2,
        )
        assert made.info.tier_precision.schedule == "int8:1"
