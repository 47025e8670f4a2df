"""Creating and deleting namespaces at run time (Admin.CreateNamespace/DeleteNamespace).

Creating backs a whole pool (seconds per GiB): it runs on a worker thread, and a call
cancelled meanwhile (client deadline) must leave nothing behind, so the pool it was making
is closed when the thread is done with it. Deleting first lets the promotions into the pool
settle (a promotion in flight is keyed by namespace name: a namespace created again under
that name must never join one), then checks, releases and unlinks in one step on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kvstore.errors import FailedPrecondition, InvalidArgument
from kvstore.memory.backend import PoolBackend
from kvstore.store.store import Store
from kvstore.store.tiering.purge import purge
from kvstore.store.types import NamespaceInfo, NamespaceSpec

log = logging.getLogger(__name__)


async def create(store: Store, spec: NamespaceSpec) -> NamespaceInfo:
    store.check_new_namespace(spec)
    made = asyncio.get_running_loop().run_in_executor(None, store.create_pool, spec)
    try:
        # shield: a cancellation must not abandon the future, whose pool we still close.
        pool = await asyncio.shield(made)
    except asyncio.CancelledError:
        made.add_done_callback(_close_made)
        log.info("namespace %s: creation cancelled; its pool is removed once backed", spec.name)
        raise
    # add_namespace re-checks the name (another call may have taken it meanwhile), and
    # closes the pool if it is refused.
    return store.add_namespace(spec, pool)


def _close_made(made: asyncio.Future[PoolBackend]) -> None:
    if not made.cancelled() and made.exception() is None:
        made.result().close()


@dataclass(frozen=True)
class Deleted:
    sequences_released: int
    pins_released: int


async def delete(store: Store, name: str, force: bool, pool_epoch: int) -> Deleted:
    ns = store.namespace(name)
    if not pool_epoch:
        raise InvalidArgument(
            "pool_epoch=0: give the pool_epoch of the namespace to delete (GetNamespace's PoolDescriptor)"
        )
    if pool_epoch != ns.pool.handle.epoch:
        raise FailedPrecondition(
            f"namespace {name!r} has pool_epoch {ns.pool.handle.epoch:016x}, not {pool_epoch:016x}: "
            "it is not the namespace you looked at (created again since?); nothing deleted"
        )
    while store.tiers is not None:
        settling = [
            p.future() for k, p in store.tiers.promoting.items() if k.namespace == name and p.ok is None
        ]
        settling += ns.private_reads  # (asyncio.wait: a cancelled delete cancels none of them)
        if not settling:
            break
        await asyncio.wait(settling)
        ns = store.namespace(name)  # deleted meanwhile by another call: NOT_FOUND
    # From here on no await: nothing can start using the namespace before it is gone.
    seqs = [(s, q) for s in store.sessions.values() for q in s.sequences.values() if q.ns is ns]
    pins = [(s, p) for s in store.sessions.values() for p in s.pins.values() if p.ns is ns]
    swapping = sum(1 for _, q in seqs if q.swap_in is not None)
    if swapping:  # its SwapIn handler is between awaits: let it finish first, force or not
        raise FailedPrecondition(
            f"namespace {name!r}: {swapping} sequence(s) are being swapped in; retry when SwapIn answered"
        )
    live = [(s, q) for s, q in seqs if not q.credit]  # a put's credit holds no one's data: released
    if (live or pins) and not force:
        raise FailedPrecondition(
            f"namespace {name!r} has {len(live)} live sequence(s) and {len(pins)} pin(s) in "
            f"{len({s.id for s, _ in live + pins})} session(s); release them, or delete with force"
        )
    for session, seq in seqs:
        store.release_held_sequence(session, seq)
    for session, pin in pins:
        store.release_held_pin(session, pin)
    del store.namespaces[name]
    ns.pool.close()
    host, disk = purge(store.tiers, name) if store.tiers is not None else (0, 0)
    log.info(
        "namespace %s deleted (%d sequences and %d pins released; %d host and %d disk tier pages dropped)%s",
        name,
        len(seqs),
        len(pins),
        host,
        disk,
        " with force" if force else "",
    )
    return Deleted(len(seqs), len(pins))


# The epoch of the pool a reply's slots index (0: unknown; the store call before it would
# have failed). Read without renewing any lease.


def namespace_epoch(store: Store, name: str) -> int:
    ns = store.namespaces.get(name)
    return ns.pool.handle.epoch if ns is not None else 0


def sequence_epoch(store: Store, sid: int, seq_id: int) -> int:
    session = store.sessions.get(sid)
    seq = session.sequences.get(seq_id) if session is not None else None
    return seq.ns.pool.handle.epoch if seq is not None else 0


def pin_epoch(store: Store, sid: int, pin_id: int) -> int:
    session = store.sessions.get(sid)
    pin = session.pins.get(pin_id) if session is not None else None
    return pin.ns.pool.handle.epoch if pin is not None else 0
