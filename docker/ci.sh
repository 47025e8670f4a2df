#!/usr/bin/env bash
# .ci/run's Docker lane: `make docker-test`, then `make docker-cuda-test` (the CUDA variant,
# checked without a GPU), when a Docker daemon can be had, else a printed reason and exit 0.
# As root it installs what is missing from Debian's packages (docker.io, docker-compose,
# mmdebstrap) and starts dockerd with no networking of its own (--bridge=none
# --iptables=false: the stack runs with network_mode none), and stops the dockerd it started
# at the end, leaving no container behind (test.sh and test-cuda.sh remove theirs).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/docker
skip() {
    echo "docker-test, docker-cuda-test: SKIPPED: $*"
    exit 0
}
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
started=""
if ! $DOCKER info >/dev/null 2>&1 || ! command -v docker-compose >/dev/null || ! command -v mmdebstrap >/dev/null; then
    [ "$(id -u)" = 0 ] || skip "no usable Docker daemon and not root (cannot install or start dockerd)"
    if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v mmdebstrap >/dev/null; then
        command -v apt-get >/dev/null || skip "docker.io, docker-compose or mmdebstrap missing and no apt-get"
        echo "docker-test: apt-get install docker.io docker-compose mmdebstrap"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose mmdebstrap) \
            >build/docker/apt.log 2>&1 || skip "apt-get install failed (build/docker/apt.log)"
    fi
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; fi
    if ! $DOCKER info >/dev/null 2>&1; then
        dockerd --bridge=none --iptables=false --ip6tables=false --pidfile build/docker/dockerd.pid \
            >build/docker/dockerd.log 2>&1 &
        started=$!
        for _ in $(seq 1 60); do
            $DOCKER info >/dev/null 2>&1 && break
            kill -0 "$started" 2>/dev/null || break
            sleep 0.5
        done
        if ! $DOCKER info >/dev/null 2>&1; then
            kill "$started" 2>/dev/null
            tail -5 build/docker/dockerd.log
            skip "dockerd did not start (build/docker/dockerd.log)"
        fi
        echo "docker-test: started dockerd (pid $started)"
    fi
fi
stop_dockerd() {
    if [ -n "$started" ]; then
        kill "$started" 2>/dev/null
        wait "$started" 2>/dev/null
        echo "docker-test: stopped dockerd (pid $started)"
    fi
}
trap stop_dockerd EXIT
rc=0
make docker-test || rc=$?
make docker-cuda-test || rc=$?
exit $rc
