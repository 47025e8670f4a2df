"""Process A of the cross-process adapter test: loads the model itself, reads a prompt into
kvstore with `kvstore_client.hf.prefill` and prints one JSON line, then exits.

    python tests/hf_prefill_worker.py TARGET NAMESPACE IDS_JSON_FILE [DEVICE]

DEVICE: the torch device the model runs on (default cpu).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvstore_client
from kvstore_client import hf
from model_fixtures import load_model


def main() -> None:
    target, namespace, ids_file = sys.argv[1:4]
    device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
    ids = json.loads(Path(ids_file).read_text())
    model, _ = load_model()
    model.to(device)
    with kvstore_client.connect(target, client_name="hf-worker-a") as client:
        _, cache = hf.prefill(model, ids, client, namespace)
        with cache:
            stored = cache.sequence.committed_tokens if cache.sequence else 0
            line = {
                "pid": os.getpid(),
                "hit_tokens": cache.hit_tokens,
                "stored_tokens": stored,
                "model_device": str(model.device),
                "pool_device": client.namespace(namespace).info.pool.device,
            }
            print(json.dumps(line))


if __name__ == "__main__":
    main()
