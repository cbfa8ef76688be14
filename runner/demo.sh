#!/bin/sh
# The main job, as `make demo` runs it: the busybox base image, images and
# history, then containers: a command run three times with start, its logs,
# and a detached one stopped again. Uses its own store, so a second run
# shows the same thing.
set -eu
STRATA=${STRATA:-strata}
export STRATA_ROOT=${STRATA_ROOT:-$(pwd)/.demo-store}
if [ -d "$STRATA_ROOT/containers" ]; then  # containers of an earlier demo, stopped first
    ids=$($STRATA ps -aq || true)
    [ -z "$ids" ] || $STRATA rm -f $ids > /dev/null
fi
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
step $STRATA images --tree
step $STRATA history busybox

# containers: one command, three runs, one writable layer
step $STRATA run --name counter busybox sh -c 'echo run >> /runs; echo "run number $(wc -l < /runs)"'
step $STRATA start -a counter
step $STRATA start -a counter
step $STRATA logs counter
step $STRATA run -d --name ticker busybox sh -c 'while true; do date; sleep 1; done'
step $STRATA ps
step $STRATA stop -t 1 ticker
step $STRATA ps -a
step $STRATA logs --tail 2 ticker
step $STRATA rm counter ticker
