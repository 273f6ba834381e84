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
empty=""
if [ "$#" -eq 0 ]; then
    # the installed cembed: run from an empty directory, so that neither pytest nor Ray's workers (which
    # get the driver's working directory on their path) import the unbuilt sources of this checkout
    set -- pytest "$PWD/tests/ray" -q -p no:cacheprovider
    empty="$(mktemp -d)"
    cd "$empty"
fi
status=0
unshare --net --pid --fork --kill-child --mount-proc -- \
    env RAY_USAGE_STATS_ENABLED=0 CEMBED_REQUIRE_RAY="${CEMBED_REQUIRE_RAY:-1}" \
    bash -c 'ip link set lo up && mkdir -p /tmp/ray && mount -t tmpfs -o size=4g cembed-ray /tmp/ray && exec "$@"' cembed-ray-netns "$@" \
    || status=$?
[ -z "$empty" ] || { cd / && rm -rf "$empty"; }   # (pytest-benchmark leaves .benchmarks/ there)
exit "$status"
