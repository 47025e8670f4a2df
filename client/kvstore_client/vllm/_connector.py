"""`KVStoreConnector`: vLLM's `KVConnectorBase_V1` over a kvstore namespace (docs/vllm.md).

vLLM makes one instance per role: SCHEDULER (in the scheduler) and WORKER (in each worker).
They share nothing but the metadata the scheduler builds each step, so they work whether vLLM
puts them in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0) or in two. Each opens its own
session with the daemon.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from ._scheduler import ConnectorMeta, SchedulerSide
from ._setup import Settings
from ._worker import WorkerSide

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


class KVStoreConnectorMetadata(KVConnectorMetadata, ConnectorMeta):
    """This step's loads and saves, scheduler -> worker (plain lists: it pickles)."""


class KVStoreConnector(KVConnectorBase_V1):
    """Loads a request's prefix from kvstore when the daemon holds it (whole pages, pinned from
    the lookup until copied) and stores every full page vLLM computes, for any process on the
    host. Load with `KVTransferConfig(kv_connector="KVStoreConnector",
    kv_connector_module_path="kvstore_client.vllm", kv_role="kv_both",
    kv_connector_extra_config={"target": ..., "namespace": ...})`."""

    # The pool is host memory shared with the daemon.
    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if kv_cache_config is None:
            raise ValueError("KVStoreConnector needs vLLM's kv_cache_config (vLLM >= 0.11)")
        tc = self._kv_transfer_config
        mc = vllm_config.model_config
        fingerprint = f"vllm:{mc.model}@{mc.revision or ''}:{mc.dtype}"
        self._settings = Settings.from_extra_config(dict(tc.kv_connector_extra_config or {}), fingerprint)
        # kvstore is a cache: a load that fails is a miss, recomputed; vLLM's default policy
        # ("fail") would fail the request instead. The scheduler reads it after making us.
        if tc.kv_load_failure_policy != "recompute":
            log.info("KVStoreConnector: kv_load_failure_policy=%r -> 'recompute'", tc.kv_load_failure_policy)
            tc.kv_load_failure_policy = "recompute"
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(vllm_config, kv_cache_config, self._settings)
        else:
            self._worker = WorkerSide(vllm_config, kv_cache_config, self._settings)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a save that does not happen is a later miss, never lost data

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker_side().register(kv_caches)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker_side().load(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv copied every layer before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole pages (every layer) in wait_for_save, after the forward pass

    def wait_for_save(self) -> None:
        if self.has_connector_metadata():
            self._worker_side().save(self._meta())

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker_side().take_failed_blocks()

    def shutdown(self) -> None:
        for side in (self._scheduler, self._worker):
            if side is not None:
                side.close()

    def kvstore_counters(self) -> dict[str, int]:
        """This process's worker-side counts: pages loaded, loads failed (recomputed), pages
        written, saves failed. Empty on the scheduler side."""
        w = self._worker
        if w is None:
            return {}
        return {
            "loaded_pages": w.loaded_pages,
            "failed_loads": w.failed_loads,
            "saved_pages": w.saved_pages,
            "failed_saves": w.failed_saves,
        }

    # ------------------------------------------------------------ scheduler side

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self._scheduler_side().kv_cache_manager = kv_cache_manager

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler_side().num_new_matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler_side().after_alloc(request, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = self._scheduler_side().build_meta(scheduler_output)
        return KVStoreConnectorMetadata(loads=meta.loads, saves=meta.saves)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves are synchronous (done by the end of the step that computed the page), so vLLM
        # may free the request's blocks at once.
        self._scheduler_side().finished(request)
        return False, None

    # ------------------------------------------------------------ helpers

    def _meta(self) -> ConnectorMeta:
        meta = self._get_connector_metadata()
        assert isinstance(meta, ConnectorMeta)
        return meta

    def _worker_side(self) -> WorkerSide:
        if self._worker is None:
            raise RuntimeError("a worker-side call on the scheduler's KVStoreConnector")
        return self._worker

    def _scheduler_side(self) -> SchedulerSide:
        if self._scheduler is None:
            raise RuntimeError("a scheduler-side call on a worker's KVStoreConnector")
        return self._scheduler
