#!/bin/sh
# The main job, as `make demo` runs it: the busybox base image, images and
# history; containers: a command run three times with start, its logs, and a
# detached one stopped again; then the seed story: run, make a directory and
# a file, diff, commit, diff again, history and images --tree, a second
# commit under the same name, start, logs, and diff --audit saying which
# process made each change. Uses its own store, so a second run shows the
# same thing.
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

# the seed story: what a container changed, kept as an image, and who changed it
step $STRATA run --name seed busybox sh -c 'mkdir /data && echo hello > /data/file && echo made it'
step $STRATA diff seed
step $STRATA commit -m "the data directory" seed local
step $STRATA diff seed
step $STRATA history local
step $STRATA images --tree
step $STRATA update --cmd 'sh -c "echo again >> /data/file; chmod 600 /data/file; rm /bin/vi; cat /data/file"' seed
step $STRATA start -a seed
step $STRATA logs seed
step $STRATA diff seed
step $STRATA commit -m "a second commit, same name" seed local
step $STRATA images
step $STRATA diff --audit seed
step $STRATA run --rm local cat /data/file
step $STRATA rm seed
