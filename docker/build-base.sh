#!/usr/bin/env bash
# The image's base without a registry: Debian bookworm minbase plus python3, python3-venv and
# tini, made by mmdebstrap from the Debian mirror this machine's apt already uses, then
# `docker import`ed as $BASE_IMAGE. The tarball is cached in $CACHE (build/docker by default),
# so later runs only import it.
#   docker/build-base.sh            # needs root (mmdebstrap), docker, and the Debian mirror
set -euo pipefail
# Debian's docker CLI (docker.io), matching its dockerd, before any other on PATH.
if [ -x /usr/bin/docker ]; then docker() { /usr/bin/docker "$@"; }; fi
CACHE=${CACHE:-build/docker}
BASE_IMAGE=${BASE_IMAGE:-kvstore-base:bookworm}
tarball=$CACHE/base-bookworm.tar

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "build-base: $BASE_IMAGE is present"
    exit 0
fi
mkdir -p "$CACHE"
if [ ! -s "$tarball" ]; then
    # The mirrors of this machine's apt sources (deb822 or one-line), else Debian's.
    main=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
    security=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep security | head -1)
    if [ -z "$main" ]; then
        main=$(awk '$1 == "deb" && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    fi
    main=${main:-http://deb.debian.org/debian}
    sources=("deb $main bookworm main" "deb $main bookworm-updates main")
    if [ -n "$security" ]; then sources+=("deb $security bookworm-security main"); fi
    echo "build-base: mmdebstrap bookworm from $main"
    start=$SECONDS
    mmdebstrap --quiet --format=tar --variant=minbase --include=python3,python3-venv,tini \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$tarball.tmp" "${sources[@]}"
    mv "$tarball.tmp" "$tarball"
    echo "build-base: $(du -h "$tarball" | cut -f1) in $((SECONDS - start))s"
fi
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$BASE_IMAGE" >/dev/null
echo "build-base: imported $BASE_IMAGE"
