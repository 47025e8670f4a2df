"""The engine processes of `kvstore-bench vllm`: `EngineProcess` starts `vllm_worker` (one vLLM
engine per OS process), waits until it is up, sends it commands and reads its answers, each
with a timeout; its log (vLLM's output) goes to a file, shown when it fails."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .harness import BenchError, clean_env, progress


def engine_env(kvcache_gib: float) -> dict[str, str]:
    """A worker's environment: the V1 engine in the worker itself (no engine-core child, so one
    process is one engine), vLLM's CPU KV cache sized small, offline, no progress bars."""
    return clean_env() | {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": f"{kvcache_gib:g}",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
    }


class EngineProcess:
    """`python -m kvstore_bench.vllm_worker CONFIG` as a child; `start()` returns at once,
    `wait_ready()` blocks until the engine is up, `generate()` is one command and its answer."""

    def __init__(self, name: str, config: dict[str, Any], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.config = config
        self.env = env
        self.log_path = log_dir / f"engine-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.counters: dict[str, int] = {}  # the connector's, as of the last answer
        self._buffer = b""

    def start(self) -> EngineProcess:
        argv = [sys.executable, "-m", "kvstore_bench.vllm_worker", json.dumps(self.config)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env
            )
        progress("engine %s: starting (pid %d): %s", self.name, self.proc.pid, describe(self.config))
        return self

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        t0 = time.monotonic()
        self.info = self._answer(timeout)
        progress(
            "engine %s: up in %.1fs (%.1fs since asked), block_size %s, %s KV blocks",
            self.name,
            self.info["start_s"],
            time.monotonic() - t0,
            self.info["block_size"],
            self.info["num_gpu_blocks"],
        )
        return self.info

    def generate(
        self,
        prompts: list[list[int]],
        max_tokens: int,
        *,
        batch: bool = False,
        ignore_eos: bool = False,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        cmd = {"op": "generate", "prompts": prompts, "max_tokens": max_tokens, "batch": batch}
        self._send(cmd | {"ignore_eos": ignore_eos})
        answer = self._answer(timeout)
        self.counters = answer["counters"]
        return answer

    def stop(self, timeout: float = 60.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                assert proc.stdin is not None
                proc.stdin.write(b'{"op": "exit"}\n')
                proc.stdin.close()
                proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                progress("engine %s: did not exit %gs after asked; killing it", self.name, timeout)
                proc.kill()
                proc.wait()
        if proc.returncode != 0:
            progress(
                "engine %s: exited with status %s; log:\n%s", self.name, proc.returncode, self.log_tail()
            )
        else:
            progress("engine %s: exited", self.name)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:
            raise self._failed("its stdin closed") from None

    def _answer(self, timeout: float) -> dict[str, Any]:
        """The next line the worker writes, as JSON; BenchError if it exits, fails or is late."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._failed(f"no answer in {timeout:g}s")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise self._failed(f"exited with status {self.proc.wait()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise self._failed(f"failed:\n{answer['error']}")
        return answer

    def _failed(self, what: str) -> BenchError:
        return BenchError(f"engine {self.name} {what}; its log ({self.log_path}):\n{self.log_tail()}")


def describe(config: dict[str, Any]) -> str:
    conn = config.get("connector")
    return ", ".join(
        [
            f"connector {'on (' + conn['namespace'] + ')' if conn else 'off'}",
            f"prefix caching {'on' if config['prefix_caching'] else 'off'}",
            f"block_size {config.get('block_size') or 'default'}",
        ]
    )
