#!/usr/bin/env python3
"""The GPU check: every GPU test and the GPU benchmark, on a GPU machine, in one command.

    python3 tools/gpu_check.py --out $OUT         (docs/gpu.md says how, through the device tool)

It needs no network: the wheels the GPU image lacks (tools/gpu_check.py --fetch-wheels, run
where there is a network, puts cp312 ones in build/gpu-wheels) are unpacked into
build/gpu-site, first on PYTHONPATH, and the tree runs from source over PYTHONPATH (the
repo's 3.11 .venv cannot be used there). Then:
1. the environment: versions, the GPUs (nvidia-smi -L), whether the generated gRPC code
   imports under this grpcio/protobuf;
2. pytest on the GPU tests (the CUDA ones and issue 17's Triton quantization kernels must
   run natively, not skip and not fall back to TRITON_INTERPRET: a skip fails the check) and
   the fake-device tests; junit XML in --out;
3. `kvstore-bench gpu --json`;
4. tools/gpu_check_quant.py --no-tests (the Triton quantization kernels' speed);
5. --out/gpu-check.json: all of it, the goals and whether each was met, and `ok`.
Exit status 0 only when every step passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / "build" / "gpu-wheels"
SITE = ROOT / "build" / "gpu-site"
MODEL = ROOT / "build" / "gpu-model"
RAW = ROOT / "build" / "gpu-raw"  # what does not go back in --out
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The versions this tree's generated code and tests were built against (the .venv's).
PINS = [
    "grpcio==1.85.3",
    "grpcio-health-checking==1.85.1",
    "grpcio-reflection==1.85.1",
    "protobuf==7.36.2",
    "lmdb==3.0.0",
    "pytest-asyncio==1.5.0",
]
# Without their dependencies: gguf's (numpy, pyyaml, tqdm) are in the image already, and a
# numpy of ours first on the path would shadow the one the image's torch and CuPy were built with.
# gguf: transformers (the image's 5.17; the adapter passes the cache as past_key_values= there)
# reads SmolLM2's GGUF file with it, and refuses to without accelerate (which imports psutil).
PINS_NO_DEPS = ["gguf==0.19.0", "accelerate==1.16.0", "psutil==7.2.2"]
CUDA_TESTS = ["tests/test_gpu_cuda.py", "tests/test_pages_cupy.py", "tests/test_gpu_hf.py"]
# Run natively: KVSTORE_TRITON_NATIVE=1 makes the module fail, not fall back to the interpreter,
# where there is no CUDA device for it.
TRITON_TESTS = ["tests/test_quant_triton.py", "tests/test_pages_triton.py"]
OTHER_TESTS = [
    "tests/test_gpu_names.py",
    "tests/test_gpu_fake.py",
    "tests/test_gpu_quarantine.py",
    "tests/test_gpu_lifecycle.py",
]
GOALS = {
    "ipc_vs_d2d": 0.9,
    "offload_vs_pinned": 0.8,
    "promote_vs_pinned": 0.8,
    "gather_vs_d2d": 0.7,
    "scatter_vs_d2d": 0.7,
}


def fetch_wheels() -> int:
    """Where there is a network: the cp312 wheels the GPU image lacks, into build/gpu-wheels."""
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", "3.12"]
    cmd += ["--implementation", "cp", *[f"--platform={p}" for p in platforms], "-d", str(WHEELS)]
    return subprocess.call([*cmd, *PINS]) or subprocess.call([*cmd, "--no-deps", *PINS_NO_DEPS])


def must_run(result: dict[str, object]) -> bool:
    """Every test of the group ran and passed (a skip, or no test at all, is a failure)."""
    return bool(result.get("rc") == 0 and not result.get("not_passed") and result.get("passed"))


def env_for_tree(site: bool) -> dict[str, str]:
    paths = [SITE] * site + [ROOT, ROOT / "client", ROOT / "bench", ROOT / "proto", ROOT / "kernels"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("TRITON_INTERPRET", None)  # natively on the GPU
    env["KVSTORE_TRITON_NATIVE"] = "1"
    if (MODEL / GGUF).is_file():  # (joined by `model()` from the parts the device tool carried)
        env["KVSTORE_SMOLLM2_GGUF"] = str(MODEL / GGUF)
        env["KVSTORE_MODEL_CACHE"] = str(ROOT / "build" / "model-cache")
    return env


def model() -> dict[str, object]:
    """SmolLM2's GGUF file from the parts tools/gpu_model.py split (docs/gpu.md): the model
    tests and the TTFT benchmark need it; without it they skip, and the check fails."""
    if (MODEL / GGUF).is_file():
        return {"model": str(MODEL / GGUF)}
    if not all((MODEL / part).is_file() for part in ("part-a", "part-b", "SHA256")):
        return {
            "model": None,
            "why": f"no parts in {MODEL} (python3 tools/gpu_model.py split, then carry them)",
        }
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_model.py"), "join"], capture_output=True, text=True
    )
    return {
        "model": str(MODEL / GGUF) if run.returncode == 0 else None,
        "join": (run.stdout + run.stderr)[-1000:],
    }


def install_wheels() -> dict[str, object]:
    """Unpack the wheels into build/gpu-site (a wheel is laid out to be unpacked onto
    sys.path as it is; no pip needed), once per set of wheels."""
    wheels = sorted(WHEELS.glob("*.whl")) if WHEELS.is_dir() else []
    if not wheels:
        return {"installed": False, "why": f"no wheels in {WHEELS} (tools/gpu_check.py --fetch-wheels)"}
    stamp = SITE / ".wheels"
    names = "\n".join(w.name for w in wheels)
    if not (stamp.exists() and stamp.read_text() == names):
        shutil.rmtree(SITE, ignore_errors=True)
        SITE.mkdir(parents=True)
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(SITE)
        stamp.write_text(names)
    return {"installed": True, "wheels": [w.name for w in wheels], "site": str(SITE)}


def probe(env: dict[str, str]) -> dict[str, object]:
    code = (
        "import json, os, sys, grpc, google.protobuf as pb, torch\n"
        "info = {'python': sys.version.split()[0], 'grpcio': grpc.__version__, 'protobuf': pb.__version__,\n"
        "        'torch': torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.is_available() and torch.cuda.get_device_name()}\n"
        "try:\n    import cupy; info['cupy'] = cupy.__version__\nexcept Exception as e: info['cupy'] = repr(e)\n"
        "try:\n    import triton; info['triton'] = triton.__version__\nexcept Exception as e: info['triton'] = repr(e)\n"
        "try:\n    from kvstore_proto.kvstore.v1 import kvstore_pb2_grpc; info['generated_code'] = 'imports'\n"
        "except Exception as e: info['generated_code'] = repr(e)\n"
        "sys.path.insert(0, 'tests'); from gpu_probe import cuda_missing; info['cuda_missing'] = cuda_missing()\n"
        "if not info['cuda_missing']:\n"
        "    from kvstore.memory.cuda_pool import device_uuids\n"
        "    info['device_ids'] = device_uuids(cupy)  # what the daemon names the GPUs\n"
        "    info['torch_uuids'] = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]\n"
        "try:\n"
        "    import transformers; info['transformers'] = transformers.__version__\n"
        "except Exception as e: info['transformers'] = repr(e)\n"
        "try:\n"
        "    import cupy, time; t0 = time.perf_counter()\n"
        "    k = cupy.RawKernel(r'extern \"C\" __global__ void f(float* x){x[threadIdx.x]+=1;}', 'f')\n"
        "    x = cupy.zeros(32, dtype=cupy.float32); k((1,), (32,), (x,)); cupy.cuda.Device().synchronize()\n"
        "    info['cupy_rawkernel'] = {'ok': float(x.sum()) == 32.0, 'compile_s': round(time.perf_counter() - t0, 2)}\n"
        "except Exception as e: info['cupy_rawkernel'] = repr(e)\n"
        "info['cpus'] = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()\n"
        "print(json.dumps(info))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    info = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-3000:]}
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = repr(e)
    return info


def pytest(env: dict[str, str], out: Path, files: list[str], name: str, timeout: int) -> dict[str, object]:
    xml = RAW / f"pytest-{name}.xml"  # (the device tool brings back 8 files at most: not these)
    files = [f for f in files if (ROOT / f).exists()]
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *files]
    t0 = time.monotonic()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        rc, tail = run.returncode, (run.stdout + run.stderr)[-6000:]
    except subprocess.TimeoutExpired as e:
        rc, tail = 124, f"timed out after {timeout}s\n{(e.stdout or b'')[-4000:]!r}"
    (out / f"pytest-{name}.txt").write_text(tail)
    result: dict[str, object] = {"files": files, "rc": rc, "seconds": round(time.monotonic() - t0, 1)}
    if xml.exists():
        cases = ET.parse(xml).getroot().iter("testcase")
        outcome: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
        for case in cases:
            what = f"{case.get('classname')}::{case.get('name')}"
            kind = "failed" if case.find("failure") is not None or case.find("error") is not None else None
            kind = kind or ("skipped" if case.find("skipped") is not None else "passed")
            outcome[kind].append(what)
        result |= {k: len(v) for k, v in outcome.items()} | {
            "not_passed": outcome["failed"] + outcome["skipped"]
        }
    result["tail"] = tail[-1500:]
    return result


def bench(env: dict[str, str], out: Path, timeout: int) -> dict[str, object]:
    cmd = [sys.executable, "-m", "kvstore_bench.cli", "gpu", "--json"]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    (out / "gpu-bench.stderr.txt").write_text(run.stderr)
    if run.returncode != 0:
        return {"error": run.stderr[-3000:]}
    (out / "gpu-bench.json").write_text(run.stdout)
    return json.loads(run.stdout)


def quant(env: dict[str, str], out: Path, timeout: int) -> dict[str, object]:
    """tools/gpu_check_quant.py (issue 17's kernels): their throughput lines (their tests are
    the `triton` group above)."""
    script = ROOT / "tools" / "gpu_check_quant.py"
    if not script.exists():
        return {"skipped": f"{script} is not in this tree"}
    try:
        run = subprocess.run(
            [sys.executable, str(script), "--no-tests"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return {"rc": 124, "error": f"timed out after {timeout}s"}
    (RAW / "gpu-check-quant.txt").write_text(run.stdout + run.stderr)
    return {"rc": run.returncode, "tail": (run.stdout + run.stderr)[-3000:]}


def demo(env: dict[str, str], out: Path, name: str, args: list[str], timeout: int) -> dict[str, object]:
    """README's `make run` as the GPU machine runs it (examples/demo.py, which starts its own
    daemon with the embedded default config): the default namespace must land on the GPU
    (`device = auto`) and the demo must pass there."""
    cmd = [sys.executable, "examples/demo.py", "--no-serve", *args]
    env = env | {"KVSTORE_SOCKET": str(out / name / "kvstore.sock")}  # (a directory of its own, 0700)
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
        rc, text = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = 124, f"timed out after {timeout}s\n{e.stdout!r}"
    (out / f"{name}.txt").write_text(text)
    on_gpu = "cuda:GPU-" in text and "runs on cpu" not in text
    return {"rc": rc, "on_gpu": on_gpu, "ok": rc == 0 and on_gpu, "tail": text[-2500:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "build/gpu-out")))
    p.add_argument(
        "--fetch-wheels", action="store_true", help="download the wheels (needs a network) and exit"
    )
    p.add_argument("--only", help="comma-separated steps to run (default: all)")
    p.add_argument("--no-wheels", action="store_true", help="use the interpreter's packages (a dry run here)")
    args = p.parse_args()
    if args.fetch_wheels:
        return fetch_wheels()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    RAW.mkdir(parents=True, exist_ok=True)
    wheels = {"installed": False, "why": "--no-wheels"} if args.no_wheels else install_wheels()
    report: dict[str, object] = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wheels": wheels}
    report["model"] = model()
    env = env_for_tree(site=not args.no_wheels)

    def step(name: str, result: dict[str, object]) -> dict[str, object]:
        # Written after every step: a run cut short by the device's time limit still leaves
        # what it got.
        report[name] = result
        print(f"gpu_check: {name}: {json.dumps(result, default=str)[:600]}", flush=True)
        (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
        return result

    # Each step and whether it passed; --only runs some of them (a rerun after a fix: the
    # device's time is short), and `ok` is then about those alone.
    steps: dict[str, tuple[Callable[[], dict[str, object]], Callable[[dict[str, object]], bool]]] = {
        "cuda_tests": (lambda: pytest(env, out, CUDA_TESTS, "cuda", 300), must_run),
        "triton_tests": (lambda: pytest(env, out, TRITON_TESTS, "triton", 240), must_run),
        "other_tests": (lambda: pytest(env, out, OTHER_TESTS, "other", 240), lambda r: r.get("rc") == 0),
        "bench": (lambda: bench(env, out, 300), lambda r: "error" not in r),
        "quant": (lambda: quant(env, out, 180), lambda r: r.get("rc", 0) == 0),
        "demo_plain": (lambda: demo(env, out, "demo-plain", ["--plain"], 180), lambda r: bool(r.get("ok"))),
        "demo_model": (lambda: demo(env, out, "demo-model", ["--model"], 300), lambda r: bool(r.get("ok"))),
    }
    chosen = args.only.split(",") if args.only else list(steps)
    if unknown := set(chosen) - set(steps):
        p.error(f"--only: no step {sorted(unknown)} (steps: {', '.join(steps)})")
    step("env", probe(env))
    passed = {name: steps[name][1](step(name, steps[name][0]())) for name in chosen}
    result = report.get("bench", {})
    report["goals_met"] = {
        k: (result.get(k) is not None and result[k] >= goal)  # type: ignore[union-attr,operator,index]
        for k, goal in GOALS.items()
        if result and "error" not in result
    }
    report["passed"] = passed
    report["ok"] = all(passed.values())
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps({k: report[k] for k in ("ok", "goals_met")} | {"out": str(out)}, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
