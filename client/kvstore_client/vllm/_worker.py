"""The connector's worker side: copies hit pages from the pool into vLLM's blocks before the
forward pass, and the request's new full pages from vLLM's blocks into the pool after it.

Loads are synchronous (all of them before the first layer runs) and so are saves (after the
last layer, in `wait_for_save`, one Reserve + Seal per request): vLLM never has to hold
blocks for us after a step, so `request_finished` never asks it to.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..errors import KVStoreClientError
from ..namespace import Namespace
from ..results import Page
from ._layout import BlockCopier, probe_part_orders
from ._scheduler import ConnectorMeta, LoadSpec, SaveSpec
from ._setup import Link, Settings, geometry_of

log = logging.getLogger(__name__)


def _layer_index(name: str) -> int:
    """`model.layers.12.self_attn.attn` -> 12: the order of the layers in a page."""
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if len(numbers) != 1:
        raise ValueError(f"cannot tell the layer index of KV cache {name!r}")
    return numbers[0]


class WorkerSide:
    def __init__(self, vllm_config: Any, kv_cache_config: Any, settings: Settings) -> None:
        self.settings = settings
        self.geometry = geometry_of(kv_cache_config)
        self.page_tokens = self.geometry.block_size
        vocab = vllm_config.model_config.get_vocab_size()
        self.link = Link(settings, "worker", self.geometry, kv_cache_config.num_blocks, vocab)
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        self.copier: BlockCopier | None = None
        self.failed_blocks: set[int] = set()
        self.failed_requests: set[str] = set()  # requests whose load failed in this step
        # Counters for this process (tests and the benchmark read them).
        self.loaded_pages = 0
        self.failed_loads = 0
        self.saved_pages = 0
        self.failed_saves = 0

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=_layer_index)
        orders = probe_part_orders(self.geometry, self.kv_cache_dtype)
        self.copier = BlockCopier([kv_caches[n] for n in names], self.geometry, orders)
        log.info("kvstore: vLLM blocks hold K %s, V %s", *orders)

    # ------------------------------------------------------------ loads

    def load(self, meta: ConnectorMeta) -> None:
        self.failed_requests = set()
        for spec in meta.loads:
            try:
                self._load(spec)
                self.loaded_pages += len(spec.slots)
            except (KVStoreClientError, OSError, RuntimeError, ValueError) as err:
                # vLLM recomputes the blocks reported here (kv_load_failure_policy="recompute");
                # what was copied into them is never used.
                self.failed_loads += 1
                self.failed_blocks.update(spec.block_ids)
                self.failed_requests.add(spec.req_id)
                log.warning(
                    "kvstore: loading %d pages for request %s failed, vLLM recomputes them: %s",
                    len(spec.slots),
                    spec.req_id,
                    err,
                )

    def _load(self, spec: LoadSpec) -> None:
        assert self.copier is not None, "register_kv_caches comes first"
        self._check_deadline(spec, "started")  # (copying what would be thrown away)
        ns = self._namespace_of(spec.epoch)
        self.copier.load(ns.pages_of(spec.epoch, spec.slots, f"request {spec.req_id}"), spec.block_ids)
        self._check_deadline(spec, "ended")

    @staticmethod
    def _check_deadline(spec: LoadSpec, what: str) -> None:
        late = time.monotonic_ns() - spec.deadline_ns
        if late >= 0:
            raise KVStoreClientError(
                f"the copy {what} {late / 1e6:.3f} ms after the pin's deadline: the pages may have been "
                "reused meanwhile"
            )

    def _namespace_of(self, epoch: int) -> Namespace:
        """Our mapping of the pool the scheduler's lookup saw: the daemon may have created the
        namespace again (restarted) since we mapped it; its slots index the new pool then."""
        link = self.link
        link.usable()  # (a new session if the daemon came back: the old epoch's slots then fail)
        if not link.ns.is_current(epoch) and link.client.alive:
            link.client._namespaces.pop(link.ns.name, None)
            link.ns.unmap()
            link.ns = link.client.namespace(link.ns.name)
        return link.ns

    def take_failed_blocks(self) -> set[int]:
        failed, self.failed_blocks = self.failed_blocks, set()
        return failed

    # ------------------------------------------------------------ saves

    def save(self, meta: ConnectorMeta) -> None:
        if meta.saves and not self.link.usable():
            self.failed_saves += len(meta.saves)
            return
        for spec in meta.saves:
            if spec.req_id in self.failed_requests:
                # Its new pages were computed this step over blocks whose load failed: not its
                # KV. vLLM recomputes them, and the scheduler asks for the save again then.
                continue
            try:
                self._save(spec)
            except KVStoreClientError as err:  # a save that fails is a later miss, nothing more
                self.failed_saves += 1
                log.warning("kvstore: saving request %s's pages failed: %s", spec.req_id, err)

    def _save(self, spec: SaveSpec) -> None:
        copier = self.copier
        assert copier is not None, "register_kv_caches comes first"

        def write(pages: list[Page], views: list[torch.Tensor]) -> None:
            copier.save([spec.block_ids[p.index] for p in pages], views)
            self.saved_pages += len(pages)

        self.link.client.put(
            self.link.ns,
            spec.token_ids,
            write,
            cached_tokens=spec.stored_pages * self.page_tokens,
            model_fingerprint=self.settings.model_fingerprint,
        )

    def close(self) -> None:
        self.link.close()
