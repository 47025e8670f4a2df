"""The daemon's invariant checks hold under `python -O` (which strips every `assert`): they
raise InvariantBroken (INTERNAL on the wire) instead of letting a refcount underflow or a
page be freed twice."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BREAK_IT = """
import uuid
from kvstore.errors import InvariantBroken
from kvstore.store.store import Store
from kvstore.store.types import NamespaceSpec, StoreLimits

spec = NamespaceSpec("t", num_layers=1, num_kv_heads=1, head_dim=64, dtype="float16", page_tokens=4, num_pages=4)
store = Store(StoreLimits(), f"kvt-{uuid.uuid4().hex[:8]}-")
try:
    store.create_namespace(spec)
    ns = store.namespace("t")
    sid = store.open_session("t", 60).session_id
    seq, _ = store.allocate(sid, "t", 0, b"")
    store.append(sid, seq, [1, 2, 3, 4])
    store.commit(sid, seq, 4)
    page = store.sessions[sid].sequences[seq].pages[0]
    store.release_sequence(sid, seq)
    broken = []
    for what, call in [
        ("unref", lambda: ns.unref(page)),
        ("free_reserved", lambda: ns.free_reserved(page)),
        ("reserve", lambda: [ns.reserve(1) for _ in range(5)]),
    ]:
        try:
            call()
        except InvariantBroken:
            broken.append(what)
    print(",".join(broken), page.refcount)
finally:
    store.close()
"""


def test_invariant_checks_survive_python_O() -> None:
    out = subprocess.run(
        [sys.executable, "-O", "-c", BREAK_IT], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["unref,free_reserved,reserve", "0"], out.stderr


def test_no_assert_guards_the_daemon() -> None:
    """Every invariant check in the daemon package is explicit (the CLI demos are clients)."""
    found = []
    for path in sorted((ROOT / "kvstore").rglob("*.py")):
        if "cli" in path.relative_to(ROOT / "kvstore").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
