"""The daemon does not require torch: it never imports it. The `kvstore` core install has no
torch (pyproject: torch comes with the `torch` and `model` extras, for the client's page views,
examples/ and the adapter), so a daemon that imported it, even lazily on one path, would fail
in production where the tests pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import kvstore_client
from daemon import SMALL_NAMESPACE
from e2e_helpers import page_content, page_content_bytes, page_tokens_of, prompt
from test_e2e_tiers import tier_server

T = SMALL_NAMESPACE["page_tokens"]
NS = dict(SMALL_NAMESPACE, num_pages=16)


def test_importing_the_daemon_does_not_import_torch() -> None:
    code = "import sys, kvstore.daemon, kvstore.cli.serve; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False", out.stderr


def test_a_daemon_that_cannot_import_torch_serves_through_its_disk_tier(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """The daemon runs with `import torch` failing (a sitecustomize blocks it) and stores,
    demotes to the disk tier, promotes and serves pages byte for byte."""
    block = tmp_path / "notorch"
    block.mkdir()
    marker = tmp_path / "torch-blocked"
    (block / "sitecustomize.py").write_text(
        f"import sys\nsys.modules['torch'] = None  # `import torch` raises ImportError\nopen({str(marker)!r}, 'w').close()\n"
    )
    paths = [str(block), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    d = daemon_factory(server=tier_server("disk", tmp_path), namespaces=[NS], env=env).start()
    assert marker.exists(), "the daemon did not run the torch block"
    tokens = prompt(4 * T, seed=14)
    with kvstore_client.connect(d.target) as client:
        ns = client.namespace("test")
        seq = client.allocate(ns)
        for page in seq.append(tokens).writable_pages:
            ns.page(page.slot).copy_(
                page_content(page.index, page_tokens_of(tokens, page.index, T), ns.page_shape)
            )
        assert seq.commit().sealed_pages == 4
        seq.release()
        assert client.evict("test", all=True).pages_evicted == 4  # to the disk tier
        with client.lookup("test", tokens, pin=True) as hit:  # promoted back
            assert hit.hit_tokens == 4 * T
            got = [v.contiguous().view(-1).numpy().tobytes() for v in hit.views()]
    want = [page_content_bytes(i, page_tokens_of(tokens, i, T), ns.page_shape) for i in range(4)]
    assert got == want
    assert d.proc is not None and d.proc.poll() is None, d.stderr_text()
    assert "Traceback" not in d.stderr_text()
