"""The connector's settings (`kv_connector_extra_config`), the model's KV geometry as vLLM
allocates it, and the namespace: found, or created with that geometry."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from .. import errors
from ..client import Client, connect
from ..namespace import Namespace
from ..pool import torch_dtype
from ._layout import KVGeometry

log = logging.getLogger(__name__)

NAMESPACE_ENV = "KVSTORE_NAMESPACE"
DEFAULT_NAMESPACE = "vllm"


@dataclass(frozen=True)
class Settings:
    target: str | None  # None: the client's default (KVSTORE_SOCKET, KVSTORE_CONFIG, ...)
    namespace: str
    num_pages: int  # pages of a namespace the connector creates; 0: as many as vLLM's blocks
    model_fingerprint: str
    pin_ttl_s: float  # a lookup's pin, from the scheduler's lookup to the worker's copy
    timeout_s: float  # deadline of each call to the daemon
    reconnect_s: float  # after losing the daemon, try again at most this often

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any], model_fingerprint: str) -> Settings:
        known = {
            "target",
            "namespace",
            "num_pages",
            "model_fingerprint",
            "pin_ttl_s",
            "timeout_s",
            "reconnect_s",
        }
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"kv_connector_extra_config has unknown keys {unknown}; KVStoreConnector takes {sorted(known)}"
            )
        return cls(
            target=extra.get("target") or None,
            namespace=str(extra.get("namespace") or os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE),
            num_pages=int(extra.get("num_pages", 0)),
            model_fingerprint=str(extra.get("model_fingerprint", model_fingerprint)),
            pin_ttl_s=float(extra.get("pin_ttl_s", 2.0)),
            timeout_s=float(extra.get("timeout_s", 10.0)),
            reconnect_s=float(extra.get("reconnect_s", 2.0)),
        )


def geometry_of(kv_cache_config: Any) -> KVGeometry:
    """The KV geometry of vLLM's single full-attention KV cache group."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise NotImplementedError(
            f"KVStoreConnector supports models with one KV cache group (full attention); this one has {len(groups)}"
        )
    spec = groups[0].kv_cache_spec
    if (
        type(spec).__name__ != "FullAttentionSpec"
        or getattr(spec, "head_size_v", spec.head_size) != spec.head_size
    ):
        raise NotImplementedError(
            f"KVStoreConnector supports full attention (K and V of one size), not {spec!r}"
        )
    return KVGeometry(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=spec.dtype,
        block_size=spec.block_size,
    )


def open_client(settings: Settings, role: str, connect_timeout_s: float = 10.0) -> Client:
    return connect(
        settings.target,
        client_name=f"vllm-{role}-{os.getpid()}",
        timeout_s=settings.timeout_s,
        connect_timeout_s=connect_timeout_s,
    )


class Link:
    """One connector side's session and namespace. When the session is lost (the daemon died
    or restarted) `usable()` opens a new one, at most every `reconnect_s`, briefly (vLLM's
    step waits on it); until then the connector misses and skips saves."""

    def __init__(
        self, settings: Settings, role: str, g: KVGeometry, num_blocks: int, vocab_size: int
    ) -> None:
        self.settings, self.role, self.geometry = settings, role, g
        self._num_blocks, self._vocab = num_blocks, vocab_size
        self.client = open_client(settings, role)
        self.ns = open_namespace(self.client, settings, g, num_blocks, vocab_size)
        self._next_try = 0.0
        self.reconnects = 0

    def usable(self) -> bool:
        if self.client.alive:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + self.settings.reconnect_s
        try:
            client = open_client(self.settings, self.role, connect_timeout_s=0.5)
        except errors.KVStoreClientError as err:
            log.debug("kvstore: %s: no daemon yet: %s", self.role, err)
            return False
        try:
            ns = open_namespace(client, self.settings, self.geometry, self._num_blocks, self._vocab)
        except (errors.KVStoreClientError, ValueError) as err:
            log.warning("kvstore: %s: the daemon is back, but: %s", self.role, err)
            client.close()
            return False
        old, self.client, self.ns = self.client, client, ns
        old.close()  # (unmaps the old pool: slots of its epoch fail to load from now on)
        self.reconnects += 1
        log.warning("kvstore: %s: session lost; a new one opened (namespace %s)", self.role, ns.name)
        return True

    def close(self) -> None:
        self.client.close()


def open_namespace(
    client: Client, settings: Settings, g: KVGeometry, num_blocks: int, vocab_size: int
) -> Namespace:
    """The namespace, created with `g` if it does not exist; refused (ValueError naming both)
    if it exists with another geometry: its pages would not be this model's KV."""
    try:
        ns = client.namespace(settings.namespace)
    except errors.NotFound:
        num_pages = settings.num_pages or num_blocks
        try:
            ns = client.create_namespace(
                settings.namespace,
                num_layers=g.num_layers,
                num_kv_heads=g.num_kv_heads,
                head_dim=g.head_dim,
                dtype=g.dtype,
                page_tokens=g.block_size,
                num_pages=num_pages,
                vocab_size=vocab_size,
                model_fingerprint=settings.model_fingerprint,
            )
            log.info(
                "kvstore: created namespace %s (%d pages of %d tokens)", ns.name, num_pages, g.block_size
            )
        except errors.AlreadyExists:  # (another vLLM process made it first)
            ns = client.namespace(settings.namespace)
    got = ns.geometry
    have = (got.num_layers, got.num_kv_heads, got.head_dim, torch_dtype(got.dtype), got.page_tokens)
    want = (g.num_layers, g.num_kv_heads, g.head_dim, g.dtype, g.block_size)
    if have != want:
        raise ValueError(
            f"kvstore namespace {ns.name!r} holds (layers, kv_heads, head_dim, dtype, page_tokens)={have}; "
            f"this vLLM model needs {want} (page_tokens = vLLM's block_size): use another namespace"
        )
    return ns
