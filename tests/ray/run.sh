#!/usr/bin/env bash
# Run the Ray tests (tests/ray) -- or, with arguments, any command -- inside a fresh network namespace
# that has only loopback, and a PID namespace so that no Ray process outlives the run.
# Ray contacts a cloud-metadata address and DNS when it starts: it must never run outside such a
# namespace (docs/distributed.md). Needs root (unshare --net). Ray's session directory /tmp/ray is a
# private tmpfs inside the namespace: a cluster file another session left there (ray_current_cluster)
# would otherwise make ray.init() try to join that cluster.
#   bash tests/ray/run.sh                       # pytest tests/ray (the installed cembed), failing, not
#                                               # skipping, without Ray
#   bash tests/ray/run.sh python -m pytest tests/ray -q     # against an in-place build of this checkout
#   bash tests/ray/run.sh python benchmarks/bench_ray.py
set -euo pipefail
cd "$(dirname "$0")/../.."
workdir=""
if [ "$#" -eq 0 ]; then
    # the installed cembed: run from an empty directory, so that neither pytest nor Ray's workers (which
    # get the driver's working directory on their path) import the unbuilt sources of this checkout --
    # one inside the namespace's private tmpfs, which goes with it (nothing is left to clean up, and
    # exec keeps this script's process id the namespace's: ending it ends everything inside)
    set -- pytest "$PWD/tests/ray" -q -p no:cacheprovider
    workdir=/tmp/ray/cwd
fi
exec unshare --net --pid --fork --kill-child --mount-proc -- \
    env RAY_USAGE_STATS_ENABLED=0 CEMBED_REQUIRE_RAY="${CEMBED_REQUIRE_RAY:-1}" CEMBED_RAY_WORKDIR="$workdir" \
    bash -c 'ip link set lo up && mkdir -p /tmp/ray && mount -t tmpfs -o size=4g cembed-ray /tmp/ray &&
             { [ -z "$CEMBED_RAY_WORKDIR" ] || { mkdir -p "$CEMBED_RAY_WORKDIR" && cd "$CEMBED_RAY_WORKDIR"; }; } &&
             exec "$@"' cembed-ray-netns "$@"
