"""Every RPC method of every service, and what a call of it needs: the scope, on which
namespace, and which sessions it acts in (docs/security.md has the table in prose).

A request that names no namespace but acts on one (a sequence id, a pin id) is resolved
through its session here, so the check covers the namespace the daemon will actually touch,
not one the caller names. Sessions belong to the token that opened them (kvstore/server/auth.py
checks `sessions`), so a session id is no way into another token's namespaces either.

kvstore/server/auth.py refuses to register a method without an entry (the daemon would not
start), and tests/test_auth_table.py checks the table against the proto.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvstore.store.store import Store
from kvstore.tokens import ADMIN, ALL, READ, WRITE

SOME = ""  # an id that does not resolve: the scope on some namespace (the store then answers NOT_FOUND)
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"})


@dataclass(slots=True)
class Needs:
    grants: list[tuple[str, str]]  # (scope, namespace or ALL or SOME)
    sessions: list[int]  # sessions the call acts in: each must be the caller's


Resolve = Callable[[Any, Store], Needs]


def _sequence_ns(store: Store, sid: int, seq_id: int) -> str:
    session = store.sessions.get(sid)
    seq = session.sequences.get(seq_id) if session is not None else None
    return seq.ns.name if seq is not None else SOME


def _pin_ns(store: Store, sid: int, pin_id: int) -> str:
    session = store.sessions.get(sid)
    pin = session.pins.get(pin_id) if session is not None else None
    return pin.ns.name if pin is not None else SOME


def _sessions(*ids: int) -> list[int]:
    return [sid for sid in ids if sid]


def session_only(r: Any, store: Store) -> Needs:
    return Needs([], _sessions(r.session_id))


def token_only(r: Any, store: Store) -> Needs:
    return Needs([], [])


def named(scope: str) -> Resolve:
    """The namespace the request names (empty: every namespace, ALL)."""

    def resolve(r: Any, store: Store) -> Needs:
        return Needs([(scope, r.namespace or ALL)], _sessions(getattr(r, "session_id", 0)))

    return resolve


def everything(scope: str) -> Resolve:
    return lambda r, store: Needs([(scope, ALL)], [])


def anywhere(scope: str) -> Resolve:
    """A view over namespaces: the scope on some namespace; the answer is filtered to those the
    token has it on (the servicer, through kvstore/caller.py)."""
    return lambda r, store: Needs([(scope, SOME)], [])


def stats(r: Any, store: Store) -> Needs:
    return named(READ)(r, store) if r.namespace else anywhere(READ)(r, store)


def sequence(scope: str) -> Resolve:
    def resolve(r: Any, store: Store) -> Needs:
        return Needs([(scope, _sequence_ns(store, r.session_id, r.sequence_id))], _sessions(r.session_id))

    return resolve


def _with_pins_released(needs: Needs, r: Any, store: Store) -> Needs:
    """Pins a call releases first (release_pin_ids) are read-side, like the lookup that took them."""
    needs.grants += [(READ, _pin_ns(store, r.session_id, p)) for p in r.release_pin_ids]
    return needs


def lookup(r: Any, store: Store) -> Needs:
    return _with_pins_released(named(READ)(r, store), r, store)


def reserve(r: Any, store: Store) -> Needs:
    return _with_pins_released(named(WRITE)(r, store), r, store)


def put(r: Any, store: Store) -> Needs:
    needs = _with_pins_released(named(WRITE)(r, store), r, store)
    if r.credit_sequence_id:
        needs.grants.append((WRITE, _sequence_ns(store, r.session_id, r.credit_sequence_id)))
    return needs


def seal(r: Any, store: Store) -> Needs:
    needs = sequence(WRITE)(r, store)
    if r.credit_sequence_id:
        needs.grants.append((WRITE, _sequence_ns(store, r.session_id, r.credit_sequence_id)))
    return needs


def wait_pages(r: Any, store: Store) -> Needs:
    return Needs([(READ, _pin_ns(store, r.session_id, r.pin_id))], _sessions(r.session_id))


def release(r: Any, store: Store) -> Needs:
    """A sequence is a writer's; a pin a reader's."""
    if r.WhichOneof("target") == "pin_id":
        return wait_pages(r, store)
    return sequence(WRITE)(r, store)


def create_namespace(r: Any, store: Store) -> Needs:
    return Needs([(ADMIN, r.spec.name or ALL)], [])


def batch(item: Resolve) -> Resolve:
    def resolve(r: Any, store: Store) -> Needs:
        needs = Needs([], [])
        for each in r.items:
            one = item(each, store)
            needs.grants += one.grants
            needs.sessions += one.sessions
        return needs

    return resolve


KV = "/kvstore.v1.KVStore/"
AD = "/kvstore.v1.Admin/"

RULES: dict[str, Resolve] = {
    # Sessions: any valid token opens one; only its token may use it.
    KV + "OpenSession": token_only,
    KV + "KeepAlive": session_only,
    KV + "Heartbeat": session_only,
    KV + "CloseSession": session_only,
    # Read: the pool descriptor (to map it), lookups and what they pinned, a namespace's stats.
    KV + "GetNamespace": named(READ),
    KV + "Lookup": lookup,
    KV + "BatchLookup": batch(lookup),
    KV + "WaitPages": wait_pages,
    KV + "GetSequence": sequence(READ),
    KV + "Stats": stats,  # no namespace: those the token reads (read on "*": the daemon's too)
    # Write: sequences, from Allocate to Release.
    KV + "Allocate": named(WRITE),
    KV + "Append": sequence(WRITE),
    KV + "Commit": sequence(WRITE),
    KV + "ReportImportance": sequence(WRITE),
    KV + "Preempt": sequence(WRITE),
    KV + "SwapIn": sequence(WRITE),
    KV + "Release": release,  # a pin: read
    KV + "Reserve": reserve,
    KV + "BatchReserve": batch(reserve),
    KV + "Seal": seal,
    KV + "BatchSeal": batch(seal),
    KV + "Put": put,
    # Admin: what acts on others' data or on the daemon.
    KV + "Evict": named(ADMIN),
    AD + "CreateNamespace": create_namespace,
    AD + "DeleteNamespace": named(ADMIN),
    AD + "ListNamespaces": anywhere(ADMIN),  # those it administers
    AD + "ListSessions": anywhere(ADMIN),  # its token's own; admin on "*": all
    AD + "Flush": everything(ADMIN),
    AD + "Explain": named(ADMIN),
    AD + "Mrc": named(ADMIN),
}


def is_open(method: str) -> bool:
    """Health and reflection: no token (probes and tools that know no secrets)."""
    return method.split("/")[1] in OPEN_SERVICES
