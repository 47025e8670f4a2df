#!/usr/bin/env bash
# `make docker-cuda-test`: the CUDA variant of the image (docs/docker.md), checked without a GPU.
#   1. build it: docker/build.sh --cuda 12 (our own base, CuPy from PyPI wheels, no network);
#   2. in a container with no network, as the image's user: CuPy imports and reports its CUDA
#      runtime version (linked into CuPy: no driver needed), sees no driver, and CUPY_CACHE_DIR
#      is the user's and writable; with NVRTC in the image (CUDA_LIBS=nvrtc,cudart) CuPy also
#      compiles a kernel and keeps it there (then fails to load it: no driver);
#   3. the sidecar as the image runs it (its config's device = "auto", compose's hardening):
#      it starts on the CPU pool and logs why (no CUDA driver), the HEALTHCHECK (grpc health)
#      says healthy, a worker in the container stores pages and reads them back through its own
#      mapping of the pool, and `docker stop` drains it: exit 0, "stopped" without errors.
# What needs a GPU (a CUDA pool in the container, CUDA IPC to workers) is not checked here.
# CUDA (12 or 13) and CUDA_LIBS (build.sh --cuda-libs) choose the variant.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi # Debian's, matching its dockerd
CUDA=${CUDA:-12}
CUDA_LIBS=${CUDA_LIBS:-}
IMAGE=${KVSTORE_CUDA_IMAGE:-kvstore:cuda$CUDA}
name=kvstore-cuda-test-$$
logs=build/docker/test-cuda-logs.txt # the sidecar's log, written at teardown
mkdir -p build/docker

say() { echo "docker-cuda-test: $*"; }
die() {
    say "FAILED: $*"
    exit 1
}

IMAGE=$IMAGE docker/build.sh --cuda "$CUDA" ${CUDA_LIBS:+--cuda-libs "$CUDA_LIBS"}

teardown() {
    $DOCKER logs "$name" >"$logs" 2>&1 || true
    $DOCKER rm --force --volumes "$name" >/dev/null 2>&1 || true
}
trap teardown EXIT

# 2. CuPy without a driver, as the image's user.
check='
import json, os, tempfile
import cupy
rt = cupy.cuda.runtime
cache = os.environ["CUPY_CACHE_DIR"]
with tempfile.NamedTemporaryFile(dir=cache) as f:
    f.write(b"x")
print(json.dumps({"uid": os.getuid(), "cupy": cupy.__version__, "runtime": rt.runtimeGetVersion(),
                  "driver": rt.driverGetVersion(), "cache_dir": cache, "cache_owner": os.stat(cache).st_uid}))
'
out=$($DOCKER run --rm --network none "$IMAGE" python -c "$check") || die "CuPy in the image: $out"
say "CuPy: $out"
field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read())[sys.argv[1]])' "$1" <<<"$out"; }
[ "$(field uid)" != 0 ] && [ "$(field uid)" = "$(field cache_owner)" ] || die "CUPY_CACHE_DIR is not the non-root user's"
[ "$(($(field runtime) / 1000))" = "$CUDA" ] || die "CuPy's CUDA runtime is not CUDA $CUDA"
[ "$(field driver)" = 0 ] || die "a CUDA driver in the container: this check expects none"
case ,$CUDA_LIBS, in
*,nvrtc,*)
    # CuPy's own compile path (headers found by cuda-pathfinder, NVRTC, the cache), given the
    # architecture it would ask the missing device for (sm_90: H100/H200).
    kernel='
import os
import cupy
from cupy._core import core
from cupy.cuda import compiler
compiler._get_arch = lambda: "90"
compiler._get_arch_for_options_for_nvrtc = lambda arch=None: ("-arch=sm_90", "cubin")
src = "#include <cupy/float16.cuh>\nextern \"C\" __global__ void twice(float16* x) { x[threadIdx.x] = x[threadIdx.x] * float16(2.f); }"
try:
    core.compile_with_cache(src, arch="90")
except cupy.cuda.runtime.CUDARuntimeError as e:  # loading the module needs the driver
    assert "InsufficientDriver" in str(e), e
cache = os.environ["CUPY_CACHE_DIR"]
print(" ".join(f"{n} ({os.path.getsize(os.path.join(cache, n))} bytes)" for n in os.listdir(cache)))
'
    out=$($DOCKER run --rm --network none "$IMAGE" python -c "$kernel") || die "a CuPy kernel: $out"
    case $out in *.cubin*) ;; *) die "no kernel in CUPY_CACHE_DIR: $out" ;; esac
    say "a CuPy kernel compiled by NVRTC, in CUPY_CACHE_DIR: $out"
    ;;
esac

# 3. The sidecar: the CPU pool, saying why; healthy; a worker's put and get; a clean stop.
$DOCKER run -d --name "$name" --network none --cap-drop ALL --security-opt no-new-privileges \
    --read-only --tmpfs /tmp "$IMAGE" >/dev/null
for _ in $(seq 1 120); do
    status=$($DOCKER inspect -f '{{.State.Status}}/{{.State.Health.Status}}' "$name")
    [ "$status" = running/healthy ] && break
    [ "${status%%/*}" = running ] || break
    sleep 0.5
done
[ "$status" = running/healthy ] || die "the sidecar is not healthy ($status): $($DOCKER logs "$name" 2>&1 | tail -5)"
say "sidecar healthy (HEALTHCHECK: grpc health) after $((SECONDS - start))s (build included)"
why=$($DOCKER logs "$name" 2>&1 | grep -o "namespace 'default': device auto -> .*") || die "no device choice in the log"
say "$why"
case $why in *"-> cpu: no CUDA driver"*) ;; *) die "not the CPU pool for want of a driver" ;; esac
worker() { $DOCKER exec "$name" python /opt/kvstore/share/kv_worker.py "$@" --prompts 2 --tokens 64; }
out=$(worker write) || die "writer: $out"
say "writer: $out"
out=$(worker read --expect hit) || die "reader: $out"
say "reader (its own mapping of the pool): $out"
$DOCKER stop --time 20 "$name" >/dev/null
code=$($DOCKER inspect -f '{{.State.ExitCode}}' "$name")
last=$($DOCKER logs "$name" 2>&1 | tail -1)
[ "$code" = 0 ] || die "the sidecar exited $code on docker stop: $last"
case $last in *stopped) ;; *) die "the sidecar's last words were not 'stopped': $last" ;; esac
say "stopped cleanly (exit 0: $last)"
say "passed in $((SECONDS - start))s (image $IMAGE: $($DOCKER image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
