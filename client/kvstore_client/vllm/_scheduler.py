"""The connector's scheduler side: how much of a request kvstore holds (a pinned Lookup), which
pages the worker loads into which blocks, and which new full pages it saves.

It keeps no state the worker needs besides the metadata it builds each step (`ConnectorMeta`),
so the two sides may live in different processes (vLLM's default) or in one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

from .. import _wire
from ..errors import KVStoreClientError
from ..fastpath import lookup_request
from ._setup import Link, Settings, geometry_of

log = logging.getLogger(__name__)


@dataclass
class LoadSpec:
    """Copy pool pages `slots` (of pool `epoch`) into vLLM blocks `block_ids`, then check the
    pin still held them: the copy must end before `deadline_ns` (CLOCK_MONOTONIC)."""

    req_id: str
    slots: list[int]
    epoch: int
    block_ids: list[int]
    deadline_ns: int


@dataclass
class SaveSpec:
    """Store the KV of `token_ids` (whole pages), page i from vLLM block `block_ids[i]`; the
    first `stored_pages` are in kvstore already (not copied unless found evicted)."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    stored_pages: int


@dataclass
class ConnectorMeta:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Request:
    request: Any  # vllm Request (live: its token ids grow as it decodes)
    stored_pages: int = 0  # pages [0, stored_pages) of its tokens are in kvstore (or being saved)
    hit_pages: int = 0  # pages its last lookup found
    lookup: pb.LookupResponse | None = None  # the last lookup's reply, its pin maybe live
    deadline_ns: int = 0
    load: tuple[int, int] | None = None  # pages [first, end) to load at its next schedule


class SchedulerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: Settings) -> None:
        self.settings = settings
        self.geometry = geometry_of(kv_cache_config)
        self.page_tokens = self.geometry.block_size
        vocab = vllm_config.model_config.get_vocab_size()
        self.link = Link(settings, "scheduler", self.geometry, kv_cache_config.num_blocks, vocab)
        self.requests: dict[str, _Request] = {}
        self.kv_cache_manager: Any = None
        self._pins_done: list[int] = []  # pins to release with the next lookup

    # ------------------------------------------------------------ vLLM's calls

    def num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens kvstore holds beyond vLLM's own `num_computed_tokens`: whole pages of the
        request's tokens, never its last token (vLLM computes at least one). Pins the hit."""
        state = self.requests.get(request.request_id)
        if state is None:
            state = self.requests[request.request_id] = _Request(request)
        self._drop_pin(state)
        pt = self.page_tokens
        n = (request.num_tokens - 1) // pt * pt
        state.load = None
        if n <= num_computed_tokens:
            return 0
        if not self.link.usable():
            self._pins_done = []  # (they ended with the lost session)
            return 0
        try:
            reply, sent_ns = self._lookup(request.all_token_ids[:n])
        except KVStoreClientError as err:  # a daemon gone or refusing is a miss, never an error
            log.warning("kvstore: lookup for request %s failed, computing it: %s", request.request_id, err)
            return 0
        state.lookup = reply
        state.deadline_ns = min(reply.pin_deadline_ns, sent_ns + reply.pin_ttl_ms * 1_000_000)
        state.hit_pages = reply.hit_tokens // pt
        state.stored_pages = max(state.stored_pages, state.hit_pages)
        if reply.hit_tokens <= num_computed_tokens:
            self._drop_pin(state)
            return 0
        state.load = (num_computed_tokens // pt, reply.hit_tokens // pt)
        return reply.hit_tokens - num_computed_tokens

    def after_alloc(self, request: Any, num_external_tokens: int) -> None:
        state = self.requests.get(request.request_id)
        if state is not None and num_external_tokens == 0:
            state.load = None  # vLLM took none of the hit (e.g. its own cache had it)
            self._drop_pin(state)

    def build_meta(self, out: Any) -> ConnectorMeta:
        meta = ConnectorMeta()
        for new in out.scheduled_new_reqs:
            self._add(meta, out, new.req_id, new.num_computed_tokens)
        cached = out.scheduled_cached_reqs
        for req_id, computed in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            self._add(meta, out, req_id, computed)
        return meta

    def finished(self, request: Any) -> None:
        """The request is done (finished, aborted, or preempted for good): its pin, if still
        live, and any pin dropped meanwhile are released now. (They would end by themselves by
        their deadline; released, the daemon may evict those pages at once.)"""
        state = self.requests.pop(request.request_id, None)
        if state is not None:
            self._drop_pin(state)
        pins, self._pins_done = self._pins_done, []
        for pin in pins if self.link.client.alive else ():
            try:
                self.link.client.release_pin(pin)
            except KVStoreClientError as err:  # (it ended by itself, or the daemon is gone)
                log.debug("kvstore: releasing pin %d: %s", pin, err)

    def close(self) -> None:
        self.link.close()

    # ------------------------------------------------------------ helpers

    def _add(self, meta: ConnectorMeta, out: Any, req_id: str, computed: int) -> None:
        state = self.requests.get(req_id)
        if state is None:
            return
        blocks = self.kv_cache_manager.get_block_ids(req_id)[0]
        pt = self.page_tokens
        if state.load is not None and state.lookup is not None:
            first, end = state.load
            reply = state.lookup
            meta.loads.append(
                LoadSpec(
                    req_id,
                    list(reply.slots[first:end]),
                    reply.pool_epoch,
                    blocks[first:end],
                    state.deadline_ns,
                )
            )
            state.load = None
        # Pages whose every token has its KV in vLLM's blocks once this step ran (speculative
        # tokens may be rejected: not counted).
        if computed < state.stored_pages * pt:
            # vLLM computes again what it had (a failed load, a preemption): the worker skipped
            # saves over a failed load, so pages past the lookup's hit are saved again (pages
            # sealed already come back CACHED from the daemon, not copied).
            state.stored_pages = min(state.stored_pages, max(state.hit_pages, computed // pt))
        spec = len(out.scheduled_spec_decode_tokens.get(req_id, ()))
        tokens = state.request.all_token_ids
        end = min(computed + out.num_scheduled_tokens[req_id] - spec, len(tokens))
        full = min(end // pt, len(blocks))
        if full > state.stored_pages:
            meta.saves.append(SaveSpec(req_id, list(tokens[: full * pt]), blocks[:full], state.stored_pages))
            state.stored_pages = full

    def _lookup(self, tokens: list[int]) -> tuple[pb.LookupResponse, int]:
        client, ns = self.link.client, self.link.ns
        req = lookup_request(
            client.session_id, ns, tokens, b"", self.settings.pin_ttl_s, self.settings.model_fingerprint
        )
        req.release_pin_ids.extend(self._pins_done)
        self._pins_done = []
        sent = time.monotonic_ns()
        reply = client._run(_wire.Call("kv", "Lookup", req, lambda r: r, pool=ns))
        return reply, sent

    def _drop_pin(self, state: _Request) -> None:
        """Forget the request's pin (it ends by itself); released with the next lookup."""
        if state.lookup is not None and state.lookup.pin_id:
            self._pins_done.append(state.lookup.pin_id)
        state.lookup = None
