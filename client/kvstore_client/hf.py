"""Hugging Face transformers on kvstore: a `Cache` whose prefix comes from the shared pool.

    from kvstore_client import hf

    client.create_namespace(hf.namespace_spec_for(model, "smollm2", num_pages=256))
    with hf.KVStoreCache(client, "smollm2", model.config) as cache:
        logits = cache.prefill(model, input_ids)  # logits of the tokens after the cached prefix
        # or: out = cache.generate(model, input_ids, max_new_tokens=32, do_sample=False)

What a call does, for a batch of one prompt:

1. **lookup** the longest cached prefix of the prompt in the namespace (pinned while the cache
   lives) and copy its pages into the model's per-layer KV tensors: one copy, pool page
   `[layer, kv, token, kv_head, head_dim]` -> HF `[1, kv_heads, seq, head_dim]`;
2. run the model on the rest of the prompt only (`model(...)` or `model.generate(...)`: the cache
   is a `transformers.DynamicCache`, so HF sees a cache already holding the prefix);
3. **append** the tokens whose KV the cache now holds to a kvstore sequence, write their KV into
   its WRITABLE pages (pages someone already sealed are skipped) and **commit**: full pages are
   sealed and shared with every process, the partial last page stays writable for the next save.

`KVStoreCache.save(token_ids)` does step 3 by hand, e.g. after more `model(...)` calls.

The API: `namespace_spec_for(model, name, num_pages, page_tokens=16)` builds the namespace spec
from the model config (layers, KV heads, head dim, the model's dtype); `KVStoreCache(client,
namespace, config)` with `.prefill(model, ids)`, `.generate(model, ids, **gen_kwargs)`,
`.load_prefix(ids)`, `.save(ids)`, `.hit_tokens`, `.sequence`, `.release()`; and the one-call
helpers `prefill(model, ids, client, namespace)` -> `(logits, cache)` and
`generate(model, ids, client, namespace, **gen_kwargs)` -> `(output_ids, hit_tokens)`.

transformers is imported on first use only (`import kvstore_client` stays fast). Full-attention
decoder models only (no sliding-window layers); batch size 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._wire import namespace_spec

if TYPE_CHECKING:
    import torch
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    from ._hf_cache import KVStoreCache
    from .client import Client
    from .namespace import Namespace

__all__ = ["KVStoreCache", "generate", "namespace_spec_for", "prefill"]


def _text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def geometry_of(model_or_config: Any) -> dict[str, Any]:
    """num_layers, num_kv_heads, head_dim and dtype of a transformers model (or its config)."""
    import torch

    config = _text_config(model_or_config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = getattr(model_or_config, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return {
        "num_layers": config.num_hidden_layers,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "dtype": dtype,
    }


def namespace_spec_for(
    model: Any, name: str, num_pages: int, page_tokens: int = 16, **fields: Any
) -> pb.NamespaceSpec:
    """A NamespaceSpec whose geometry fits `model` (a transformers model or config); `fields`
    go to `kvstore_client.namespace_spec` (policy, salt, model_fingerprint, ...)."""
    vocab = getattr(_text_config(model), "vocab_size", 0) or 0
    return namespace_spec(
        name,
        page_tokens=page_tokens,
        num_pages=num_pages,
        **{"vocab_size": vocab, **geometry_of(model), **fields},
    )


_CACHE_CLASS: type | None = None


def _cache_class() -> type:
    global _CACHE_CLASS
    if _CACHE_CLASS is None:
        from ._hf_cache import KVStoreCache as cls

        _CACHE_CLASS = cls
    return _CACHE_CLASS


def __getattr__(name: str) -> Any:
    if name == "KVStoreCache":
        return _cache_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def prefill(
    model: Any, input_ids: Any, client: Client, namespace: str | Namespace
) -> tuple[torch.Tensor, Any]:
    """Run `model` on `input_ids` ([1, n] or a list of ids) reusing the cached prefix and storing
    the rest. Returns (logits of the tokens after the prefix, the open `KVStoreCache`): logits
    row i is token `cache.hit_tokens + i`. Release the cache (or use it in `with`) when done."""
    cache = _cache_class()(client, namespace, model.config)
    try:
        return cache.prefill(model, input_ids), cache
    except BaseException:
        cache.release()
        raise


def generate(
    model: Any, input_ids: Any, client: Client, namespace: str | Namespace, **gen_kwargs: Any
) -> tuple[torch.Tensor, int]:
    """`model.generate(input_ids, **gen_kwargs)` with the prompt's cached prefix loaded from
    kvstore and the prompt plus generated tokens stored. Returns (output ids, prefix tokens hit)."""
    with _cache_class()(client, namespace, model.config) as cache:
        out = cache.generate(model, input_ids, **gen_kwargs)
        return out, cache.hit_tokens
