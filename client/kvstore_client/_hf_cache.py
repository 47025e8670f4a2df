"""`KVStoreCache`, the transformers `DynamicCache` backed by kvstore (see `kvstore_client.hf`).

Imported on first use of `kvstore_client.hf.KVStoreCache`: importing it imports transformers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer

from ._hf_model import as_batch, cache_kwarg, cached_fingerprint, check_fits, is_model, prompt_ids
from ._hf_pages import read_pages, write_runs
from .client import Client, Lookup, Sequence
from .errors import KVStoreClientError
from .namespace import Namespace
from .results import PreemptResult, SequenceOptions


class _BudgetedLayer(DynamicLayer):
    """A `DynamicLayer` that may hold fewer tokens than the sequence has: the pages a kvstore
    budget dropped are cut out of `keys`/`values`. `get_seq_length` stays the sequence's length,
    so new tokens get their true positions (RoPE), and `get_mask_sizes` reports the cut as the
    mask's kv offset (as transformers' own sliding-window layer does): the kept tokens all
    precede the query, and the query's own tokens line up with their absolute positions, so
    the causal mask is exact for batch 1 without padding."""

    def __init__(self) -> None:
        super().__init__()
        self.cut_tokens = 0  # tokens of dropped pages no longer in keys/values

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.cut_tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return super().get_seq_length() + query_length, self.cut_tokens


class _SaveAsPagesFill(StoppingCriteria):
    """Called by `generate` after every step: stores the KV of each page as it fills, so the
    page is sealed (shared) while generation goes on and a budget's drops happen in step."""

    def __init__(self, cache: KVStoreCache) -> None:
        self.cache = cache

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cache = self.cache
        if cache.get_seq_length() // cache.page_tokens > cache._written // cache.page_tokens:
            cache.save(input_ids[0])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class KVStoreCache(DynamicCache):
    """A `DynamicCache` whose prefix comes from a kvstore namespace and whose new KV goes back.

    One prompt (batch 1) per cache. `load_prefix(ids)` fills the cache with the longest cached
    prefix (pinned until `release()`), `save(ids)` stores the KV the cache holds for `ids`;
    `prefill`/`generate` wrap both around the model call. Use it in `with`, or `release()` it:
    that frees the sequence's writable pages and the pin (sealed pages stay cached).

    `model_or_config`: the model (its fingerprint goes with every Lookup and Allocate) or its
    config (the fingerprint is then taken from the model given to `prefill`/`generate`, or is
    `model_fingerprint` when given; `""` sends none). A namespace made for another model
    refuses the cache with `errors.FailedPrecondition` (the daemon's message names both); one of
    another geometry or dtype than the model's, with `errors.InvalidArgument` before any RPC.

    `options`: the sequence's budget (`SequenceOptions`; default unconstrained). Each `save`
    appends to the budgeted sequence and cuts the pages the daemon dropped out of the model's
    KV, so the model attends to exactly the pages kvstore holds. A cut page's positions stay
    counted (new tokens keep their absolute positions). When a single forward pass covers many
    pages (a whole prompt), the model attends to all of them in that pass and the budget
    applies after it; `prefill(..., chunk_tokens=page_tokens)` applies it page by page.
    `max_tokens` > 0: static preallocation; the sequence's pages are reserved before the model
    runs (or the daemon refuses at once), and going past `max_tokens` is refused.
    """

    def __init__(
        self,
        client: Client,
        namespace: str | Namespace,
        model_or_config: Any,
        *,
        model_fingerprint: str | None = None,
        options: SequenceOptions | None = None,
        max_tokens: int = 0,
    ) -> None:
        config = model_or_config
        if is_model(model_or_config):
            config = model_or_config.config
            if model_fingerprint is None:
                model_fingerprint = cached_fingerprint(model_or_config)
        super().__init__(config=config)
        if any(not isinstance(layer, DynamicLayer) or layer.is_sliding for layer in self.layers):
            raise NotImplementedError("KVStoreCache supports full-attention layers only (no sliding window)")
        self.layers = [_BudgetedLayer() for _ in self.layers]
        self.client = client
        self.namespace = client.namespace(namespace)
        check_fits(self.namespace, model_or_config)
        self.page_tokens = self.namespace.page_tokens
        self.hit_tokens = 0  # tokens of the prompt found in kvstore (whole pages)
        self.prefix_tokens = 0  # tokens loaded into the cache from kvstore (< prompt length)
        self.lookup: Lookup | None = None
        self.sequence: Sequence | None = None
        self._written = 0  # tokens [0, _written) are stored (written or already sealed)
        self.model_fingerprint = model_fingerprint  # None: taken from the model at prefill/generate
        self.options = options
        self.max_tokens = max_tokens
        # Page index of each position the model's KV tensors hold (ascending; budget cuts
        # leave gaps), and how many of the sequence's tokens it accounts for.
        self._position_pages: list[int] = []
        self._positions_seen = 0
        self._pass_pages: list[int] = []
        self._preempted: str | None = None  # "swap" | "drop": what resume() undoes
        # Where the model's KV tensors live: the model's device once one is seen (a GPU pool
        # may serve a CPU model and the other way round), else where the pool's pages are.
        self.kv_device: torch.device | None = model_or_config.device if is_model(model_or_config) else None

    def _use_model(self, model: Any) -> None:
        check_fits(self.namespace, model)  # (a cache made from a config has not seen the model)
        if self.model_fingerprint is None:
            self.model_fingerprint = cached_fingerprint(model)
        self.kv_device = model.device

    # ------------------------------------------------------------ kvstore side

    def load_prefix(self, input_ids: Any) -> int:
        """Look up the prompt's longest cached prefix and load it into this (empty) cache.
        Returns the tokens loaded: the hit, but at most len(prompt) - 1 so that the model has a
        token left to compute logits for."""
        if self.get_seq_length() or self.lookup is not None:
            raise RuntimeError("load_prefix needs an empty KVStoreCache (one prompt per cache)")
        ids = prompt_ids(input_ids)
        self.lookup = self.client.lookup(
            self.namespace, ids, pin=True, model_fingerprint=self.model_fingerprint or ""
        )
        self._sequence()  # before the model runs: a static budget the pool cannot hold fails now
        self.hit_tokens = self.lookup.hit_tokens
        n = min(self.hit_tokens, len(ids) - 1)
        if n <= 0:
            return 0
        pt = self.page_tokens
        counts = [min(pt, n - start) for start in range(0, n, pt)]
        self._load_pages(self.lookup.views()[: len(counts)], counts)
        self.prefix_tokens = n
        self._position_pages = [t // pt for t in range(n)]
        self._positions_seen = n
        return n

    def save(self, token_ids: Any) -> int:
        """Store the KV this cache holds for `token_ids` (the prompt, plus generated tokens):
        appends the new tokens to the sequence, writes the WRITABLE pages' new tokens and
        commits (full pages are sealed). Pages the sequence's budget dropped are cut out of the
        model's KV. Returns the tokens stored in all."""
        ids = prompt_ids(token_ids)
        total = self.get_seq_length()
        pt = self.page_tokens
        self._position_pages.extend(t // pt for t in range(self._positions_seen, total))
        self._positions_seen = total
        n = min(len(ids), total)
        seq = self._sequence()
        if n > seq.num_tokens:
            seq.append(ids[seq.num_tokens : n])
            if self.lookup is not None and self.lookup.pinned:
                # The sequence now holds the prefix pages itself; the lookup's pin would keep
                # pages a budget drops in the pool.
                self.lookup.release()
        if n > self._written:
            self._write(seq, n)
            seq.commit(n)
            self._written = n
        self._pass_pages = list(self._position_pages)  # what the last forward pass attended to
        self._cut_dropped(seq)
        return self._written

    def _sequence(self) -> Sequence:
        if self.sequence is None:
            self.sequence = self.client.allocate(
                self.namespace,
                self.max_tokens,
                options=self.options,
                model_fingerprint=self.model_fingerprint or "",
            )
        return self.sequence

    def _write(self, seq: Sequence, n: int) -> None:
        """Copy the KV of tokens [_written, n) into the sequence's WRITABLE pages."""
        pt = self.page_tokens
        runs = []
        for page in seq.pages[self._written // pt : (n + pt - 1) // pt]:
            if page is None or not page.writable:
                continue  # dropped by the budget, or someone's sealed page
            first = page.index * pt
            start, end = max(first, self._written), min(first + pt, n)
            at = bisect_left(self._position_pages, page.index) + (start - first)  # in the KV tensors
            runs.append((page.slot, start - first, end - start, at))
        write_runs(self.namespace.pool, self.layers, runs)

    def _cut_dropped(self, seq: Sequence) -> None:
        dropped = set(seq.dropped)
        if not dropped or not any(p in dropped for p in self._position_pages):
            return
        keep = [i for i, p in enumerate(self._position_pages) if p not in dropped]
        cut = len(self._position_pages) - len(keep)
        index = torch.tensor(keep, dtype=torch.long, device=self.layers[0].keys.device)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(2, index)
            layer.values = layer.values.index_select(2, index)
            layer.cut_tokens += cut
        self._position_pages = [self._position_pages[i] for i in keep]

    @property
    def held_tokens(self) -> int:
        """Tokens whose KV the model's cache holds now (the sequence's length minus cut pages)."""
        layer = self.layers[0]
        return layer.keys.shape[-2] if layer.is_initialized else 0

    def report_importance(self, attentions: Any) -> int:
        """IMPORTANCE sequences: score each page by the attention mass the last forward pass put
        on its tokens (`attentions`: the model output's per-layer `[1, heads, q, kv]` weights,
        `output_attentions=True`, eager attention) and send the scores. Returns pages held."""
        if self.sequence is None:
            raise RuntimeError("report_importance needs a saved sequence (call save() first)")
        mass = torch.stack([a[0].float().sum(dim=(0, 1)) for a in attentions]).sum(0).tolist()
        if len(mass) != len(self._pass_pages):
            raise ValueError(
                f"attentions cover {len(mass)} positions; the last pass held {len(self._pass_pages)}: "
                "report right after the save that followed the forward pass"
            )
        scores = [0.0] * (self._pass_pages[-1] + 1 if self._pass_pages else 0)
        for page, weight in zip(self._pass_pages, mass, strict=True):
            scores[page] += weight
        return self.sequence.report_importance(scores)

    # ------------------------------------------------------------ preemption

    def swap_out(self, token_ids: Any) -> PreemptResult:
        """Preempt by swapping: store the KV of `token_ids` computed so far (the prompt and the
        generated tokens), have the daemon move the sequence's pages below the pool (host or
        disk tier; its pool pages are freed), and free this cache's KV tensors. `resume`
        brings the pages back and goes on."""
        self.save(token_ids)
        result = self._sequence().swap_out()
        self._forget_kv()
        self._preempted = "swap"
        return result

    def drop(self) -> PreemptResult:
        """Preempt by dropping: the daemon frees the sequence's pages (its sealed pages stay
        cached) and this cache's KV tensors are freed; `resume` recomputes what is not cached."""
        result = self._sequence().drop()
        self._forget_kv()
        self._written = 0
        if self.lookup is not None:
            self.lookup.release()
            self.lookup = None
        self._preempted = "drop"
        return result

    @torch.no_grad()
    def resume(self, model: Any, token_ids: Any, **gen_kwargs: Any) -> torch.Tensor:
        """Go on generating after `swap_out` or `drop`: `token_ids` are all the tokens so far.
        After a swap the pages come back (new slots) and are loaded into the model's KV; after
        a drop the tokens are prefilled again (a cached prefix still hits). Returns `generate`'s
        output ids."""
        how, self._preempted = self._preempted, None
        if how == "swap":
            self._load_sequence(self._sequence().swap_in())
            return self._generate(model, token_ids, gen_kwargs)
        if how == "drop":
            return self.generate(model, token_ids, **gen_kwargs)
        raise RuntimeError("resume() follows swap_out() or drop()")

    def _forget_kv(self) -> None:
        for layer in self.layers:
            layer.reset()
            layer.cut_tokens = 0
        self._position_pages, self._positions_seen, self._pass_pages = [], 0, []

    def _load_sequence(self, seq: Sequence) -> None:
        """Fill the (empty) model KV with the sequence's held pages: one copy per page, as
        load_prefix does; cut (budget-dropped) pages stay cut."""
        pages = seq.held_pages
        n = self._load_pages(seq.views(pages), [p.token_count for p in pages])
        for layer in self.layers:
            layer.cut_tokens = seq.num_tokens - n
        self._position_pages = [p.index for p in pages for _ in range(p.token_count)]
        self._positions_seen = self._written = seq.num_tokens

    def _load_pages(self, views: list[torch.Tensor], counts: list[int]) -> int:
        """Fill the (empty) model KV with the first `counts[i]` tokens of page `views[i]`, in
        order: one copy, pool `[layer, kv, token, head, dim]` -> HF `[1, head, seq, dim]`.
        Returns the tokens loaded."""
        L, _, _, H, D = views[0].shape
        n = sum(counts)
        # [layer, kv, batch, kv_head, token, head_dim]: each layer's K and V are views of it.
        kv = torch.empty((L, 2, 1, H, n, D), dtype=views[0].dtype, device=self.kv_device or views[0].device)
        read_pages(self.namespace.pool, views, counts, kv)  # the one copy
        for layer, (keys, values) in zip(self.layers, kv, strict=True):
            # update() with no tokens initializes the layer; then the layer takes our tensors as
            # they are, where update() would copy them once more.
            layer.update(keys[:, :, :0], values[:, :, :0])
            layer.keys, layer.values = keys, values
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
    def prefill(
        self,
        model: Any,
        input_ids: Any,
        *,
        chunk_tokens: int | None = None,
        logits_to_keep: int = 0,
        on_chunk: Callable[[KVStoreCache, Any], None] | None = None,
        **model_kwargs: Any,
    ) -> torch.Tensor:
        """Load the cached prefix, run `model` on the rest of the prompt, store the prompt's KV.
        Returns the logits of the tokens after the prefix, `[1, n - prefix_tokens, vocab]`, or of
        the last `logits_to_keep` tokens of each forward pass when it is > 0 (1 for a prompt whose
        only use is its next token: it spares the vocabulary projection of every other one).

        `chunk_tokens`: run the model on that many tokens at a time and save after each chunk,
        so a budget (`options`) drops pages as the prompt goes in, as in generation.
        `on_chunk(cache, output)` is called after each chunk's save (e.g. to report importance
        from `output.attentions`); `model_kwargs` go to every model call (`output_attentions`)."""
        self._use_model(model)
        ids = prompt_ids(input_ids)
        n = self.load_prefix(ids)
        batch = as_batch(input_ids, model.device)
        step = chunk_tokens or len(ids)
        if step <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        kwargs = model_kwargs | ({"logits_to_keep": logits_to_keep} if logits_to_keep else {})
        logits = []
        for start in range(n, len(ids), step):
            end = min(start + step, len(ids))
            out = model(input_ids=batch[:, start:end], use_cache=True, **{cache_kwarg(model): self}, **kwargs)
            self.save(ids[:end])
            logits.append(out.logits)
            if on_chunk is not None:
                on_chunk(self, out)
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)

    @torch.no_grad()
    def generate(self, model: Any, input_ids: Any, **gen_kwargs: Any) -> torch.Tensor:
        """`model.generate` with the prompt's cached prefix loaded; the prompt and the generated
        tokens (all but the last, whose KV is never computed) are stored page by page as pages
        fill. Returns the output ids."""
        self._use_model(model)
        self.load_prefix(prompt_ids(input_ids))
        return self._generate(model, input_ids, gen_kwargs)

    def _generate(self, model: Any, input_ids: Any, gen_kwargs: dict[str, Any]) -> torch.Tensor:
        """`model.generate` on this cache (holding the KV of all but the last token or fewer),
        saving pages as they fill, and the rest at the end."""
        batch = as_batch(input_ids, model.device)
        gen_kwargs.setdefault("attention_mask", torch.ones_like(batch))
        # Ours first: the caller's criteria see the pages saved in this step.
        user = gen_kwargs.pop("stopping_criteria", None) or []
        criteria = StoppingCriteriaList([_SaveAsPagesFill(self), *user])
        out = model.generate(batch, stopping_criteria=criteria, **{cache_kwarg(model): self}, **gen_kwargs)
        self.save(out[0])
        return out
