#!/usr/bin/env bash
# Build the kvstore image with no network during the build (docs/docker.md):
#   1. the base image (docker/build-base.sh: mmdebstrap + docker import; cached tarball),
#   2. wheels on the host: the dependencies once per pyproject.toml (cached under
#      build/docker/wheels-<hash>), the project's own wheel every time (its C extensions
#      built by this Python, which must be the image's: 3.11); for the CUDA variant also CuPy
#      (and any CUDA_LIBS) downloaded for the image's Python and platform, once
#      (build/docker/wheels-<hash>-cuda<N>...),
#   3. `docker build --network=none` (the legacy builder) of docker/Dockerfile on a context
#      of those wheels and the files the image copies.
#
#   docker/build.sh [--cuda 12|13 [--cuda-libs nvrtc,...]] [--base IMAGE] [--image NAME]
# The CUDA variant is built on the same base (kvstore:cuda<N>); --base names another base
# image (with python3, python3-venv and tini; PY must then be a Python of its version).
# Needs: docker (a running daemon), root for the first base build, PyPI on the host for the
# first wheels; PY (default .venv/bin/python, else python3) runs pip.
set -euo pipefail
# Debian's docker CLI (docker.io), matching its dockerd, before any other on PATH.
if [ -x /usr/bin/docker ]; then docker() { /usr/bin/docker "$@"; }; fi
cd "$(dirname "$0")/.."
CACHE=${CACHE:-build/docker}
IMAGE=${IMAGE:-}
BASE_IMAGE=${BASE_IMAGE:-kvstore-base:bookworm}
own_base=1
CUDA=""
CUDA_LIBS=""
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) CUDA=$2; shift 2 ;;
        --cuda-libs) CUDA_LIBS=$2; shift 2 ;;
        --base) BASE_IMAGE=$2; own_base=""; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        *) echo "usage: $0 [--cuda 12|13 [--cuda-libs nvrtc,...]] [--base IMAGE] [--image NAME]" >&2; exit 2 ;;
    esac
done
case $CUDA in
    "" | 12 | 13) ;;
    *) echo "build: --cuda $CUDA: 12 or 13 (CuPy's wheels: cupy-cuda12x, cupy-cuda13x)" >&2; exit 2 ;;
esac
if [ -n "$CUDA_LIBS" ] && [ -z "$CUDA" ]; then
    echo "build: --cuda-libs needs --cuda" >&2
    exit 2
fi
if [ -z "$IMAGE" ]; then
    if [ -n "$CUDA" ]; then IMAGE=kvstore:cuda$CUDA; else IMAGE=kvstore:cpu; fi
fi
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -n "$own_base" ] && [ "$pyver" != 3.11 ]; then
    echo "build: $PY is Python $pyver; the image's (Debian bookworm) is 3.11: set PY to a 3.11" >&2
    exit 1
fi
# pip, without the warnings about find-links folders missing that this machine's pip config names.
pip() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
start=$SECONDS
if [ -n "$own_base" ]; then
    CACHE=$CACHE BASE_IMAGE=$BASE_IMAGE docker/build-base.sh
fi

# The dependencies' wheels: what `pip wheel .` resolves for this Python, cached by the hash
# of pyproject.toml (the project's wheel itself is left out here and built fresh below).
key=$(cat pyproject.toml | sha256sum | cut -c1-16)
deps=$CACHE/wheels-$key
if [ ! -f "$deps/.complete" ]; then
    rm -rf "$deps.tmp"
    pip wheel --quiet -w "$deps.tmp" .
    rm -f "$deps.tmp"/kvstore-*.whl
    touch "$deps.tmp/.complete"
    rm -rf "$deps" && mv "$deps.tmp" "$deps"
    echo "build: dependency wheels cached in $deps ($(du -sh "$deps" | cut -f1))"
fi

# The CUDA variant's wheels: CuPy (and the cuda-toolkit extras asked for), binary wheels for
# the image's Python and glibc (bookworm: 2.36), the dependencies held to the versions above.
wheels=("$deps")
if [ -n "$CUDA" ]; then
    reqs=("cupy-cuda${CUDA}x>=13")
    if [ -n "$CUDA_LIBS" ]; then reqs+=("cuda-toolkit[$CUDA_LIBS]==$CUDA.*"); fi
    cuda=$CACHE/wheels-$key-cuda$CUDA-$(echo "${reqs[*]}" | sha256sum | cut -c1-8)
    if [ ! -f "$cuda/.complete" ]; then
        rm -rf "$cuda.tmp" && mkdir -p "$cuda.tmp"
        arch=$(uname -m)
        platforms=(--platform "manylinux2014_$arch" --platform "manylinux2010_$arch")
        for v in $(seq 5 36); do platforms+=(--platform "manylinux_2_${v}_$arch"); done
        for w in "$deps"/*.whl; do basename "$w" | sed -E 's/^([^-]+)-([^-]+)-.*/\1==\2/'; done >"$cuda.tmp/constraints.txt"
        pip download --quiet --only-binary=:all: --python-version "$pyver" --implementation cp \
            "${platforms[@]}" -c "$cuda.tmp/constraints.txt" -d "$cuda.tmp" "${reqs[@]}"
        for w in "$cuda.tmp"/*.whl; do
            if [ -e "$deps/$(basename "$w")" ]; then rm "$w"; fi
        done
        touch "$cuda.tmp/.complete"
        rm -rf "$cuda" && mv "$cuda.tmp" "$cuda"
        echo "build: CUDA $CUDA wheels cached in $cuda ($(du -sh "$cuda" | cut -f1): $(cd "$cuda" && ls *.whl | tr '\n' ' '))"
    fi
    wheels+=("$cuda")
fi

ctx=$CACHE/context
rm -rf "$ctx" && mkdir -p "$ctx/wheels"
for d in "${wheels[@]}"; do cp --link "$d"/*.whl "$ctx/wheels/" 2>/dev/null || cp "$d"/*.whl "$ctx/wheels/"; done
pip wheel --quiet --no-deps -w "$ctx/wheels" .
cp docker/Dockerfile docker/kvstore.toml docker/kv_worker.py "$ctx/"
args=(--build-arg "BASE=$BASE_IMAGE")
if [ -n "$CUDA" ]; then args+=(--build-arg "CUDA=$CUDA" --build-arg "CUDA_LIBS=$CUDA_LIBS"); fi
DOCKER_BUILDKIT=0 docker build --quiet --network=none "${args[@]}" -t "$IMAGE" "$ctx" >/dev/null
# The image this build replaced, now untagged: no pile-up of old builds across runs.
docker image prune --force --filter dangling=true --filter label=org.opencontainers.image.title=kvstore >/dev/null
echo "build: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - start))s"
