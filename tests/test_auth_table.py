"""The scope table (kvstore/server/scopes.py) covers every RPC method, resolves the namespace
a request acts on through its session (not the one it names), and the tokens file is checked."""

from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb
from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from store_helpers import SPEC

from kvstore import tokens as tk
from kvstore.server.admin_servicer import AdminServicer
from kvstore.server.auth import Guard
from kvstore.server.edge import Edge
from kvstore.server.kvstore_servicer import KVStoreServicer
from kvstore.server.scopes import RULES
from kvstore.store.store import Store
from kvstore.store.types import StoreLimits

KV = "/kvstore.v1.KVStore/"
KVSTORE_METHODS = {
    f"/{s.full_name}/{m.name}" for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods
}


@pytest.fixture
def store():
    s = Store(StoreLimits(), shm_prefix=f"kvtest-auth-{uuid.uuid4().hex[:12]}-")
    for name in ("a", "b"):
        s.create_namespace(dataclasses.replace(SPEC, name=name))
    try:
        yield s
    finally:
        s.close()


def _token(name: str, grants: dict[str, list[str]]) -> tk.Token:
    return tk.Token(
        name, tk.hashlib.sha256(name.encode()).digest(), {k: frozenset(v) for k, v in grants.items()}
    )


def test_every_method_of_the_proto_has_exactly_one_rule() -> None:
    assert set(RULES) == KVSTORE_METHODS


async def test_the_daemon_registers_no_method_the_guard_does_not_know(store) -> None:
    edge = Edge()
    edge.guard = Guard(tk.Tokens([]), store).wrap
    pb_grpc.add_KVStoreServicer_to_server(KVStoreServicer(store), edge)
    pb_grpc.add_AdminServicer_to_server(AdminServicer(store), edge)
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), edge)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(()), edge)
    assert set(edge._methods) > KVSTORE_METHODS
    # A method added to a service without a rule stops the registration (the daemon's start).

    async def new(request, context):
        return request

    with pytest.raises(TypeError, match=r"/kvstore\.v1\.Admin/Shiny has no entry"):
        edge.add_registered_method_handlers(
            "kvstore.v1.Admin", {"Shiny": grpc.unary_unary_rpc_method_handler(new)}
        )


def test_a_sequence_or_pin_is_checked_in_its_own_namespace(store) -> None:
    """A token with write on "a" only, whose session holds a sequence and a pin in "b" (no
    token can make that happen over RPC; the store is driven directly here): every call that
    acts on them by id needs the scope on "b", whatever namespace the request names."""
    sid = store.open_session("t", 60).session_id
    seq, _ = store.allocate(sid, "b", 0, b"")
    store.append(sid, seq, list(range(2 * SPEC.page_tokens)))
    store.commit(sid, seq, 2 * SPEC.page_tokens)
    pin = store.lookup(sid, "b", list(range(2 * SPEC.page_tokens)), b"", pin=True).pin_id
    guard = Guard(tk.Tokens([]), store)
    writer = _token("w", {"a": ["read", "write"]})
    guard.owners[sid] = "w"
    cases = {
        "Append": pb.AppendRequest(session_id=sid, sequence_id=seq),
        "Commit": pb.CommitRequest(session_id=sid, sequence_id=seq),
        "Seal": pb.SealRequest(session_id=sid, sequence_id=seq),
        "Preempt": pb.PreemptRequest(session_id=sid, sequence_id=seq),
        "Release": pb.ReleaseRequest(session_id=sid, sequence_id=seq),
        "GetSequence": pb.GetSequenceRequest(session_id=sid, sequence_id=seq),
        "WaitPages": pb.WaitPagesRequest(session_id=sid, pin_id=pin),
        # Naming "a" (where it may write) does not cover what the request really touches.
        "Put": pb.PutRequest(session_id=sid, namespace="a", credit_sequence_id=seq),
        "Lookup": pb.LookupRequest(session_id=sid, namespace="a", release_pin_ids=[pin]),
        "BatchSeal": pb.BatchSealRequest(items=[pb.SealRequest(session_id=sid, sequence_id=seq)]),
    }
    for name, request in cases.items():
        denied = guard.denied(name, writer, RULES[KV + name](request, store))
        scope = "read" if name in ("GetSequence", "WaitPages", "Lookup") else "write"
        assert denied == f"{name} needs the {scope} scope on namespace 'b'; token 'w' does not have it", name
    both = _token("w", {"a": ["read", "write"], "b": ["read", "write"]})
    assert all(guard.denied(n, both, RULES[KV + n](r, store)) == "" for n, r in cases.items())
    # The same session under another token's name is refused whatever that token may do.
    admin = _token("root", {"*": ["read", "write", "admin"]})
    assert "opened with another token" in guard.denied(
        "Append", admin, RULES[KV + "Append"](cases["Append"], store)
    )


def test_tokens_are_found_by_their_secret_only(tmp_path) -> None:
    path = tmp_path / "t.toml"
    secret = "s" * 20
    path.write_text(
        '[[token]]\nname = "x"\n'
        f'sha256 = "{tk.digest_hex(secret)}"\n'
        'scopes = { "a" = ["read"], "*" = ["admin"] }\n'
        '[[token]]\nname = "y"\ntoken = "yyyyyyyyyyyyyyyyyyyy"\n'
    )
    path.chmod(0o600)
    tokens = tk.load(str(path))
    x = tokens.find(secret)
    assert x is not None and x.name == "x"
    assert x.allows("read", "a") and not x.allows("read", "b") and not x.allows("write", "a")
    assert x.allows("admin", "b") and x.allows("admin", tk.ALL) and not x.allows("read", tk.ALL)
    assert tokens.find(secret[:-1]) is None and tokens.find("") is None
    assert tokens.find("yyyyyyyyyyyyyyyyyyyy").name == "y"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[[token]]\nname = "x"\ntoken = "short"\n', "at least 16 characters"),
        ('[[token]]\nname = "x"\n', "exactly one of `token`"),
        ('[[token]]\nname = "x"\nsha256 = "abc"\n', "64 hex digits"),
        (
            '[[token]]\nname = "x"\ntoken = "0123456789abcdef"\nscopes = { a = ["sudo"] }\n',
            "scopes.a must be",
        ),
        ('[[token]]\nname = "x"\ntoken = "0123456789abcdef"\nsecret = 1\n', "unknown key(s) secret"),
        ('[[token]]\nname = "x"\ntoken = "0123456789abcdef"\n' * 2, "repeats another's name"),
        ("tokens = 1\n", "one [[token]] table per token"),
        ("[[token\n", "invalid TOML"),
    ],
)
def test_a_bad_tokens_file_is_refused_with_its_reason(tmp_path, text, problem) -> None:
    path = tmp_path / "t.toml"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(tk.TokensFileError) as e:
        tk.load(str(path))
    assert problem in str(e.value)
    assert "0123456789abcdef" not in str(e.value)  # never echoes a secret


def test_a_tokens_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path) -> None:
    path = tmp_path / "t.toml"
    path.write_bytes(b'[[token]]\nname = "x"\ntoken = "0123456789abcdef\xfe"\n')
    path.chmod(0o600)
    with pytest.raises(tk.TokensFileError) as e:
        tk.load(str(path))
    assert str(e.value) == f"the tokens file {path}: not UTF-8 text (byte 0xfe at offset 46)"
