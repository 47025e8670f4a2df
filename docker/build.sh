#!/usr/bin/env bash
# Build the kvstore image with no network during the build (docs/docker.md):
#   1. the base image (docker/build-base.sh: mmdebstrap + docker import; cached tarball),
#   2. wheels on the host: the dependencies once per pyproject.toml (cached under
#      build/docker/wheels-<hash>), the project's own wheel every time (its C extensions
#      built by this Python, which must be the image's: 3.11),
#   3. `docker build --network=none` (the legacy builder) of docker/Dockerfile on a context
#      of those wheels and the files the image copies.
#
#   docker/build.sh [--cuda 12|13 --base IMAGE] [--image NAME]
# Needs: docker (a running daemon), root for the first base build, PyPI on the host for the
# first wheels; PY (default .venv/bin/python, else python3) runs pip.
set -euo pipefail
# Debian's docker CLI (docker.io), matching its dockerd, before any other on PATH.
if [ -x /usr/bin/docker ]; then docker() { /usr/bin/docker "$@"; }; fi
cd "$(dirname "$0")/.."
CACHE=${CACHE:-build/docker}
IMAGE=${IMAGE:-kvstore:cpu}
BASE_IMAGE=${BASE_IMAGE:-kvstore-base:bookworm}
CUDA=""
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) CUDA=$2; shift 2 ;;
        --base) BASE_IMAGE=$2; shift 2 ;;
        --image) IMAGE=$2; shift 2 ;;
        *) echo "usage: $0 [--cuda 12|13 --base IMAGE] [--image NAME]" >&2; exit 2 ;;
    esac
done
if [ -n "$CUDA" ] && [ "$BASE_IMAGE" = kvstore-base:bookworm ]; then
    echo "build: --cuda needs --base, a CUDA runtime image with python3.11, python3-venv and tini" >&2
    exit 2
fi
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ -z "$CUDA" ] && [ "$pyver" != 3.11 ]; then
    echo "build: $PY is Python $pyver; the image's (Debian bookworm) is 3.11: set PY to a 3.11" >&2
    exit 1
fi
# pip, without the warnings about find-links folders missing that this machine's pip config names.
pip() { "$PY" -m pip --disable-pip-version-check "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }
start=$SECONDS
if [ -z "$CUDA" ]; then
    CACHE=$CACHE BASE_IMAGE=$BASE_IMAGE docker/build-base.sh
fi

# The dependencies' wheels: what `pip wheel .` resolves for this Python, cached by the hash
# of pyproject.toml (the project's wheel itself is left out here and built fresh below).
key=$(cat pyproject.toml | sha256sum | cut -c1-16)${CUDA:+-cuda$CUDA}
deps=$CACHE/wheels-$key
if [ ! -f "$deps/.complete" ]; then
    rm -rf "$deps.tmp"
    pip wheel --quiet -w "$deps.tmp" .
    rm -f "$deps.tmp"/kvstore-*.whl
    if [ -n "$CUDA" ]; then
        pip download --quiet --only-binary=:all: -d "$deps.tmp" "cupy-cuda${CUDA}x>=13"
    fi
    touch "$deps.tmp/.complete"
    rm -rf "$deps" && mv "$deps.tmp" "$deps"
    echo "build: dependency wheels cached in $deps ($(du -sh "$deps" | cut -f1))"
fi

ctx=$CACHE/context
rm -rf "$ctx" && mkdir -p "$ctx/wheels"
cp "$deps"/*.whl "$ctx/wheels/"
pip wheel --quiet --no-deps -w "$ctx/wheels" .
cp docker/Dockerfile docker/kvstore.toml docker/kv_worker.py "$ctx/"
args=(--build-arg "BASE=$BASE_IMAGE")
if [ -n "$CUDA" ]; then args+=(--build-arg "CUDA=$CUDA"); fi
DOCKER_BUILDKIT=0 docker build --quiet --network=none "${args[@]}" -t "$IMAGE" "$ctx" >/dev/null
# The image this build replaced, now untagged: no pile-up of old builds across runs.
docker image prune --force --filter dangling=true --filter label=org.opencontainers.image.title=kvstore >/dev/null
echo "build: $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')) in $((SECONDS - start))s"
