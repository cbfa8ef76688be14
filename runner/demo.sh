#!/bin/sh
# The main job, as `make demo` runs it: the busybox base image, an image
# imported from a tarball with a changed config, and the image views.
# Uses its own store so a second run shows the same thing.
set -eu
STRATA=${STRATA:-strata}
export STRATA_ROOT=${STRATA_ROOT:-$(pwd)/.demo-store}
rm -rf "$STRATA_ROOT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

echo "store: $STRATA_ROOT"
step $STRATA base
step $STRATA images

# a small rootfs tarball: an app directory on top of nothing
mkdir -p "$work/rootfs/app"
echo 'echo hello from the app' > "$work/rootfs/app/run.sh"
tar -C "$work/rootfs" -czf "$work/app.tar.gz" .
step $STRATA import --change 'CMD ["/app/run.sh"]' -m "the demo app" "$work/app.tar.gz" demo/app:1.0
step $STRATA tag demo/app:1.0 demo/app:latest
step $STRATA images
step $STRATA images --tree
step $STRATA history busybox
step $STRATA history demo/app
step $STRATA inspect --format '{{json .Config}}' demo/app
step $STRATA rmi demo/app:latest
step $STRATA images
