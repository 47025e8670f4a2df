"""One vLLM engine in this process, for the connector's tests: `python engine.py JOB.json OUT.json`.

JOB: {"model": dir, "connector": null | kv_connector_extra_config, "phases": [[prompt ids, ...], ...],
"max_tokens": n, "kill_before_phase": [i, daemon pid], "restart_before_phase": [j, the daemon's config file] (optional)}. Each phase is one `generate` call (its prompts batched); after each, the
daemon's view of this process's sessions is recorded (pins, sequences), so a test sees what the
connector still held once its requests had finished. OUT: per phase the generated token ids and
`num_cached_tokens` of each prompt, the sessions, and the worker's counters (so far).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the connectors live here: counters readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    import kvstore_client
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    extra = job.get("connector")
    kv = None
    if extra is not None:
        kv = KVTransferConfig(
            kv_connector="KVStoreConnector",
            kv_connector_module_path="kvstore_client.vllm",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    llm = LLM(
        model=job["model"],
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        enable_prefix_caching=False,  # every cached token it reports is then kvstore's
        kv_transfer_config=kv,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=job.get("max_tokens", 12))
    admin = kvstore_client.connect(extra["target"]) if extra is not None else None
    phases = []
    kill_at, daemon_pid = job.get("kill_before_phase") or (None, 0)
    restart_at, config = job.get("restart_before_phase") or (None, "")
    restarted = None
    for i, prompts in enumerate(job["phases"]):
        if i == kill_at:
            admin = _kill_daemon(daemon_pid, extra["target"], admin)
        if i == restart_at:
            restarted = _start_daemon(config, extra["target"])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        phase = {
            "token_ids": [list(o.outputs[0].token_ids) for o in outs],
            "num_cached_tokens": [o.num_cached_tokens for o in outs],
        }
        if admin is not None and admin.alive:
            phase["sessions"] = [
                {"name": s.client_name, "pins": s.pins, "sequences": s.sequences}
                for s in admin.list_sessions()
                if s.client_name.startswith("vllm-")
            ]
            ns = admin.stats(extra["namespace"]).namespaces[0]
            phase["stats"] = {
                k: getattr(ns, k) for k in ("hit_tokens", "lookups", "pages_pinned", "sequences")
            }
        phase["counters"] = get_kv_transfer_group().kvstore_counters() if has_kv_transfer_group() else {}
        phases.append(phase)
    counters = get_kv_transfer_group().kvstore_counters() if has_kv_transfer_group() else {}
    with open(sys.argv[2], "w") as f:
        json.dump({"phases": phases, "counters": counters}, f)
    if admin is not None:
        admin.close()
    if restarted is not None:
        restarted.terminate()
        restarted.wait(30)


def _kill_daemon(pid: int, target: str, admin: Any) -> None:
    """SIGKILL the daemon and wait until its socket refuses connections (it is gone)."""
    admin.close()
    os.kill(pid, signal.SIGKILL)
    path = target.removeprefix("unix:")
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                return None
        time.sleep(0.01)  # (the kernel closes its socket as the process ends: a short wait)


def _start_daemon(config: str, target: str) -> subprocess.Popen[bytes]:
    """A new daemon on the same config (socket, shm prefix), up and serving."""
    import kvstore_client

    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--config", config], stdin=subprocess.DEVNULL, env=env
    )
    kvstore_client.wait_until_serving(target, 30, still_starting=lambda: proc.poll() is None)
    return proc


if __name__ == "__main__":
    main()
