"""`KVStoreCache`, the transformers `DynamicCache` backed by kvstore (see `kvstore_client.hf`).

Imported on first use of `kvstore_client.hf.KVStoreCache`: importing it imports transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .client import Client, Lookup, Sequence
from .errors import KVStoreClientError
from .hf import _is_model, cached_fingerprint
from .namespace import Namespace


def _ids(input_ids: Any) -> list[int]:
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(
                    f"KVStoreCache takes a batch of one; got input_ids of shape {tuple(input_ids.shape)}"
                )
            input_ids = input_ids[0]
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def _as_batch(input_ids: Any, device: Any) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        return input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)
    return torch.tensor([list(input_ids)], dtype=torch.long, device=device)


class KVStoreCache(DynamicCache):
    """A `DynamicCache` whose prefix comes from a kvstore namespace and whose new KV goes back.

    One prompt (batch 1) per cache. `load_prefix(ids)` fills the cache with the longest cached
    prefix (pinned until `release()`), `save(ids)` stores the KV the cache holds for `ids`;
    `prefill`/`generate` wrap both around the model call. Use it in `with`, or `release()` it:
    that frees the sequence's writable pages and the pin (sealed pages stay cached).

    `model_or_config`: the model (its fingerprint goes with every Lookup and Allocate) or its
    config (the fingerprint is then taken from the model given to `prefill`/`generate`, or is
    `model_fingerprint` when given; `""` sends none). A namespace made for another model
    refuses the cache with `errors.FailedPrecondition` (the daemon's message names both).
    """

    def __init__(
        self,
        client: Client,
        namespace: str | Namespace,
        model_or_config: Any,
        *,
        model_fingerprint: str | None = None,
    ) -> None:
        config = model_or_config
        if _is_model(model_or_config):
            config = model_or_config.config
            if model_fingerprint is None:
                model_fingerprint = cached_fingerprint(model_or_config)
        super().__init__(config=config)
        if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in self.layers):
            raise NotImplementedError("KVStoreCache supports full-attention layers only (no sliding window)")
        self.client = client
        self.namespace = client.namespace(namespace)
        g = self.namespace.geometry
        if (g.num_layers, g.num_kv_heads) != (len(self.layers), self._kv_heads(config)):
            raise ValueError(
                f"namespace {self.namespace.name!r} has num_layers={g.num_layers}, num_kv_heads={g.num_kv_heads}; "
                f"the model has {len(self.layers)} layers and {self._kv_heads(config)} KV heads"
            )
        self.page_tokens = self.namespace.page_tokens
        self.hit_tokens = 0  # tokens of the prompt found in kvstore (whole pages)
        self.prefix_tokens = 0  # tokens loaded into the cache from kvstore (< prompt length)
        self.lookup: Lookup | None = None
        self.sequence: Sequence | None = None
        self._written = 0  # tokens [0, _written) are stored (written or already sealed)
        self.model_fingerprint = model_fingerprint  # None: taken from the model at prefill/generate

    def _use_model(self, model: Any) -> None:
        if self.model_fingerprint is None:
            self.model_fingerprint = cached_fingerprint(model)

    @staticmethod
    def _kv_heads(config: Any) -> int:
        config = config.get_text_config(decoder=True)
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads

    # ------------------------------------------------------------ kvstore side

    def load_prefix(self, input_ids: Any) -> int:
        """Look up the prompt's longest cached prefix and load it into this (empty) cache.
        Returns the tokens loaded: the hit, but at most len(prompt) - 1 so that the model has a
        token left to compute logits for."""
        if self.get_seq_length() or self.lookup is not None:
            raise RuntimeError("load_prefix needs an empty KVStoreCache (one prompt per cache)")
        ids = _ids(input_ids)
        self.lookup = self.client.lookup(
            self.namespace, ids, pin=True, model_fingerprint=self.model_fingerprint or ""
        )
        self.hit_tokens = self.lookup.hit_tokens
        n = min(self.hit_tokens, len(ids) - 1)
        if n <= 0:
            return 0
        views = self.lookup.views()
        pt = self.page_tokens
        L, _, _, H, D = views[0].shape
        # [layer, kv, batch, kv_head, token, head_dim]: each layer's K and V are views of it.
        kv = torch.empty((L, 2, 1, H, n, D), dtype=views[0].dtype)
        for i, view in enumerate(views):
            start = i * pt
            if start >= n:
                break
            t = min(pt, n - start)
            kv[:, :, 0, :, start : start + t].copy_(view[:, :, :t].transpose(2, 3))  # the one copy
        for layer_idx, layer in enumerate(self.layers):
            keys, values = kv[layer_idx, 0], kv[layer_idx, 1]
            # update() with no tokens initializes the layer (its signature is stable across
            # transformers versions, lazy_initialization's is not); then the layer takes our
            # tensors as they are, where update() would copy them once more.
            layer.update(keys[:, :, :0], values[:, :, :0])
            layer.keys, layer.values = keys, values
        self.prefix_tokens = n
        return n

    def save(self, token_ids: Any) -> int:
        """Store the KV this cache holds for `token_ids` (the prompt, plus generated tokens):
        appends the new tokens to the sequence, writes the WRITABLE pages' new tokens and
        commits (full pages are sealed). Returns the tokens stored in all."""
        ids = _ids(token_ids)
        n = min(len(ids), self.get_seq_length())
        if self.sequence is None:
            self.sequence = self.client.allocate(
                self.namespace, model_fingerprint=self.model_fingerprint or ""
            )
        seq = self.sequence
        if n > seq.num_tokens:
            seq.append(ids[seq.num_tokens : n])
        if n <= self._written:
            return self._written
        pt = self.page_tokens
        views = self.namespace.pool
        for page in seq.pages[self._written // pt : (n + pt - 1) // pt]:
            if not page.writable:
                continue
            start = max(page.index * pt, self._written)
            end = min(page.index * pt + pt, n)
            view = views.page(page.slot)
            a, b = start - page.index * pt, end - page.index * pt
            for layer_idx, layer in enumerate(self.layers):
                view[layer_idx, 0, a:b].copy_(layer.keys[0, :, start:end].transpose(0, 1))
                view[layer_idx, 1, a:b].copy_(layer.values[0, :, start:end].transpose(0, 1))
        seq.commit(n)
        self._written = n
        return n

    def release(self) -> None:
        """Release the sequence (its unsealed pages) and the prefix pin. Idempotent."""
        errors: list[KVStoreClientError] = []
        for held in (self.sequence, self.lookup):
            if held is not None:
                try:
                    held.release()
                except KVStoreClientError as err:
                    errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> KVStoreCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------ model side

    @torch.no_grad()
    def prefill(self, model: Any, input_ids: Any) -> torch.Tensor:
        """Load the cached prefix, run `model` on the rest of the prompt, store the prompt's KV.
        Returns the logits `[1, n - prefix_tokens, vocab]` of the tokens after the prefix."""
        self._use_model(model)
        ids = _ids(input_ids)
        n = self.load_prefix(ids)
        batch = _as_batch(input_ids, model.device)
        out = model(input_ids=batch[:, n:], past_key_values=self, use_cache=True)
        self.save(ids)
        return out.logits

    @torch.no_grad()
    def generate(self, model: Any, input_ids: Any, **gen_kwargs: Any) -> torch.Tensor:
        """`model.generate` with the prompt's cached prefix loaded; the prompt and the generated
        tokens (all but the last, whose KV is never computed) are stored. Returns the output ids."""
        self._use_model(model)
        ids = _ids(input_ids)
        self.load_prefix(ids)
        batch = _as_batch(input_ids, model.device)
        gen_kwargs.setdefault("attention_mask", torch.ones_like(batch))
        out = model.generate(batch, past_key_values=self, **gen_kwargs)
        self.save(out[0])
        return out
