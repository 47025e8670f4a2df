"""What the adapter reads off a transformers model and its input: its KV geometry and dtype, its
fingerprint, whether a namespace fits it, token ids. transformers itself is never imported here
(`kvstore_client.hf` imports this module and stays light); torch is, on first use.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import weakref
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgument
from .pool import dtype_name

if TYPE_CHECKING:
    import torch

    from .namespace import Namespace


def text_config(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def geometry_of(model_or_config: Any) -> dict[str, Any]:
    """num_layers, num_kv_heads, head_dim and dtype of a transformers model (or its config)."""
    import torch

    config = text_config(model_or_config)
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


# Config keys that say how a model was loaded or is being run, not what it computes.
_VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "name_or_path",
        "quantization_config",
        "use_cache",
        "return_dict",
        "output_attentions",
        "output_hidden_states",
        "torchscript",
    }
)
_SAMPLE_BYTES = 4096  # of each parameter's start and end


def is_model(obj: Any) -> bool:
    return hasattr(obj, "config") and callable(getattr(obj, "named_parameters", None))


def model_fingerprint(model: Any, tokenizer: Any = None) -> str:
    """ "sha256:<16 hex>" over the model's config (without `_*` keys, versions, loader and
    runtime flags; with the dtype), the tokenizer's vocabulary when given, and the first and
    last 4 KiB of the bytes of every parameter, in name order (shapes and dtypes included).
    Stable across processes and reloads; a changed config field or sampled weight changes it."""
    import torch

    h = hashlib.sha256()
    config = getattr(model, "config", model)
    d = {
        k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS
    }
    d["dtype"] = str(geometry_of(model)["dtype"]).removeprefix("torch.")
    h.update(b"config\0" + json.dumps(d, sort_keys=True, default=str, separators=(",", ":")).encode())
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab().items())
        h.update(b"tokenizer\0" + json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode())
    if is_model(model):
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            flat = param.detach().reshape(-1)
            n = -(-_SAMPLE_BYTES // max(flat.element_size(), 1))
            head = flat[:n].cpu().contiguous().view(torch.uint8)
            tail = flat[-n:].cpu().contiguous().view(torch.uint8)
            h.update(f"\0{name}:{tuple(param.shape)}:{param.dtype}\0".encode())
            h.update(head.numpy().tobytes())
            h.update(tail.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def cached_fingerprint(model: Any) -> str:
    """`model_fingerprint(model)`, computed once per model object (what `KVStoreCache` sends)."""
    fp = _FINGERPRINTS.get(model)
    if fp is None:
        fp = _FINGERPRINTS[model] = model_fingerprint(model)
    return fp


def check_fits(namespace: Namespace, model_or_config: Any) -> None:
    """Refuse, naming both sides, a namespace whose geometry or dtype is not the model's. A copy
    between them would convert silently (int8 truncates the KV and changes the output) or fail
    half-way after storing pages; a lossy page format is for the caller to choose explicitly,
    not for the adapter to fall into."""
    g = namespace.geometry
    model = geometry_of(model_or_config)
    theirs = {
        "num_layers": g.num_layers,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "dtype": dtype_name(g.dtype),
    }
    ours = {**model, "dtype": str(model["dtype"]).removeprefix("torch.")}
    differ = [k for k in theirs if theirs[k] != ours[k]]
    if differ:
        raise InvalidArgument(
            f"namespace {namespace.name!r} has {', '.join(f'{k}={theirs[k]}' for k in differ)}; "
            f"the model has {', '.join(f'{k}={ours[k]}' for k in differ)}: the adapter stores KV only "
            "in a namespace of the model's own geometry and dtype (hf.namespace_spec_for(model, ...))"
        )


def cache_kwarg(model: Any) -> str:
    """The keyword a model's forward and `generate` take the cache under: `cache` since
    transformers 5.24 (where `past_key_values` is deprecated), `past_key_values` before (the
    GPU machine's 5.17: there `cache=` would be swallowed by `**kwargs` and the model would run
    without the prefix)."""
    return _cache_kwarg_of(type(model))


@functools.cache
def _cache_kwarg_of(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_ids(input_ids: Any) -> list[int]:
    """A prompt (a list, a 1-D tensor or a batch of one) as a list of ints."""
    import torch

    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 2:
            if input_ids.shape[0] != 1:
                raise ValueError(
                    f"KVStoreCache takes a batch of one; got input_ids of shape {tuple(input_ids.shape)}"
                )
            input_ids = input_ids[0]
        return [int(t) for t in input_ids.tolist()]
    return [int(t) for t in input_ids]


def as_batch(input_ids: Any, device: Any) -> torch.Tensor:
    """A prompt as a `[1, n]` tensor on `device` (the model's)."""
    import torch

    if isinstance(input_ids, torch.Tensor):
        return (input_ids if input_ids.dim() == 2 else input_ids.unsqueeze(0)).to(device)
    return torch.tensor([list(input_ids)], dtype=torch.long, device=device)
