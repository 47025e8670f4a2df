"""Process A of `kvstore-bench ttft`: loads the model itself, stores each prompt's KV in kvstore
with `kvstore_client.hf.prefill`, prints one JSON line per prompt, and exits.

    python -m kvstore_bench.ttft_worker TARGET NAMESPACE IDS_JSON_FILE [DEVICE]

DEVICE: the torch device the model runs on (default cpu; `kvstore-bench gpu` gives cuda).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import kvstore_client
from kvstore_client import hf

from .ttft import load_model


def main() -> None:
    target, namespace, ids_file = sys.argv[1:4]
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    prompts = json.loads(Path(ids_file).read_text())
    model, _ = load_model()
    model.to(device)
    with kvstore_client.connect(target, client_name="bench-ttft-a") as client:
        for ids in prompts:
            _, cache = hf.prefill(model, ids, client, namespace)
            with cache:
                stored = cache.sequence.committed_tokens if cache.sequence else 0
                line = {
                    "pid": os.getpid(),
                    "tokens": len(ids),
                    "hit_tokens": cache.hit_tokens,
                    "stored_tokens": stored,
                }
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
