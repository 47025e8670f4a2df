"""kvstore as a vLLM KV connector: `KVStoreConnector` (docs/vllm.md).

    KVTransferConfig(kv_connector="KVStoreConnector", kv_connector_module_path="kvstore_client.vllm",
                     kv_role="kv_both", kv_connector_extra_config={"target": ..., "namespace": ...})

Importing this package imports vLLM (the rest of kvstore_client never does).
"""

from ._connector import KVStoreConnector, KVStoreConnectorMetadata

__all__ = ["KVStoreConnector", "KVStoreConnectorMetadata"]
