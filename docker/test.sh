#!/usr/bin/env bash
# `make docker-test`: the sidecar stack end to end, with no network (docs/docker.md).
#   1. build the image (docker/build.sh: base image, wheels, docker build --network=none),
#   2. bring up the compose stack (pod, kvstore, a watching worker),
#   3. a worker container writes KV pages through the pool and flushes them to the disk tier;
#      a second container reads them in place through its own mapping, byte for byte,
#   4. the sidecar is killed twice: `docker kill -s KILL` then `docker start`; then kill -9 of
#      the daemon's process, which the restart policy answers. The watching worker, which read
#      all along, and a new reader after each restart must never see a wrong byte, and must
#      get full hits again from the restarted sidecar (its disk tier, on a volume, re-indexed),
#   5. tear down (always: a trap), volumes included.
# Needs a running Docker daemon (docker/ci.sh starts one for .ci/run) and docker-compose.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi  # Debian's, matching its dockerd
export KVSTORE_IMAGE=${KVSTORE_IMAGE:-kvstore:cpu}
project=kvstore-test-$$
compose=(docker-compose --ansi never -p "$project" -f docker/compose.yaml)
logs=build/docker/test-logs.txt  # the stack's logs, written at teardown
runlog=build/docker/test-run.log # the one-shot workers' stderr
mkdir -p build/docker && : >"$runlog"
PROMPTS=8
TOKENS=256 # 16 pages of 16 tokens a prompt

say() { echo "docker-test: $*"; }
die() {
    say "FAILED: $*"
    tail -20 "$runlog"
    exit 1
}

IMAGE=$KVSTORE_IMAGE docker/build.sh

teardown() {
    mkdir -p build/docker
    "${compose[@]}" logs --no-color >"$logs" 2>&1 || true
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
}
trap teardown EXIT

container() { "${compose[@]}" ps -q "$1"; }
# Wait until the kvstore container is running and its HEALTHCHECK (grpc health) says healthy.
wait_healthy() {
    local id status
    id=$(container kvstore)
    for _ in $(seq 1 120); do
        status=$($DOCKER inspect -f '{{.State.Status}}/{{.State.Health.Status}}' "$id")
        [ "$status" = running/healthy ] && return 0
        sleep 0.5
    done
    die "the sidecar is not healthy after 60 s ($status); logs in $logs"
}
# A one-shot worker container in the pod (the shared PID namespace; the pool comes over the
# socket volume); prints its JSON.
worker() { "${compose[@]}" run --rm --no-deps -T worker "$@" --prompts $PROMPTS --tokens $TOKENS 2>>"$runlog"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"; }

"${compose[@]}" up -d pod kvstore 2>/dev/null
wait_healthy
say "sidecar healthy after $((SECONDS - start))s (build included)"
"${compose[@]}" up -d --no-deps worker 2>/dev/null # the watcher: reads all along, until stopped

out=$(worker write) || die "writer: $out"
say "writer: $out"
[ "$(field sealed_pages <<<"$out")" = $((PROMPTS * TOKENS / 16)) ] || die "the writer sealed too few pages"
out=$(worker read --expect hit) || die "reader: $out"
say "reader (another container, zero-copy through its own mapping): $out"

kv=$(container kvstore)
watcher=$(container worker)
running() { [ "$($DOCKER inspect -f '{{.State.Running}}' "$1")" = true ]; }
# Round 1: `docker kill -s KILL`, as an operator would. Docker counts that as a stop, so its
# restart policy leaves it; it is started again as an operator would.
$DOCKER kill -s KILL "$kv" >/dev/null
say "sidecar killed (docker kill -s KILL)"
for _ in $(seq 1 20); do running "$kv" && sleep 0.5; done
running "$kv" && die "the sidecar still runs after docker kill"
running "$watcher" || die "the watching worker died with the sidecar"
$DOCKER start "$kv" >/dev/null
wait_healthy
out=$(worker read --expect hit) || die "reader after docker kill + start: $out"
say "reader after docker kill + start: $out"
# Round 2: a crash: the daemon's own process gets SIGKILL (from the host: the child of the
# container's tini), and the restart policy (unless-stopped) must bring the sidecar back.
tini=$($DOCKER inspect -f '{{.State.Pid}}' "$kv")
daemon=$(cat "/proc/$tini/task/$tini/children")
kill -KILL $daemon
say "daemon process killed (kill -9 $daemon on the host)"
for _ in $(seq 1 60); do
    [ "$($DOCKER inspect -f '{{.State.Pid}}' "$kv")" != "$tini" ] && running "$kv" && break
    sleep 0.5
done
[ "$($DOCKER inspect -f '{{.State.Pid}}' "$kv")" != "$tini" ] || die "the restart policy did not restart the sidecar"
running "$watcher" || die "the watching worker died with the sidecar"
wait_healthy
say "restarted by its restart policy"
out=$(worker read --expect hit) || die "reader after the restart: $out"
say "reader after the restart: $out"

"${compose[@]}" stop --timeout 20 worker >/dev/null 2>&1
report=$($DOCKER logs "$watcher" 2>/dev/null | grep '^{' | tail -1)
say "watcher: $report"
[ -n "$report" ] || die "the watcher printed no report"
[ "$(field wrong_pages <<<"$report")" = 0 ] || die "the watcher read wrong bytes"
[ "$(field errors <<<"$report")" -ge 2 ] || die "the watcher did not see the sidecar go twice"
[ "$(field full_hits_since_error <<<"$report")" -ge 1 ] || die "the watcher got no full hit after the restart"
say "passed in $((SECONDS - start))s: no wrong byte before, during or after two kill -9 of the sidecar"
