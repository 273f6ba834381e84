"""The Ray tests run only inside the private network namespace of tests/ray/run.sh (only ``lo``)
with Ray installed; elsewhere they are skipped — or fail, when CEMBED_REQUIRE_RAY=1 (run.sh and CI).

Nothing here imports Ray at collection: a plain ``pytest`` never imports it
(tests/ray/test_without_ray.py checks that)."""
import importlib.util
import os
import socket

import pytest

REQUIRED = os.environ.get("CEMBED_REQUIRE_RAY", "") not in ("", "0")


def why_not():
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        return f"not inside a network namespace with only loopback (interfaces {names}): run tests/ray/run.sh"
    if importlib.util.find_spec("ray") is None:
        return "Ray is not installed (pip install \".[ray]\")"
    return None


@pytest.fixture(scope="session")
def _ray_allowed():
    """Every test that starts Ray asks for this first: skip (or fail under CEMBED_REQUIRE_RAY=1)
    outside the namespace. Tests that do not start Ray run everywhere."""
    reason = why_not()
    if reason:
        if REQUIRED:
            pytest.fail(f"CEMBED_REQUIRE_RAY=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def ray_local(_ray_allowed):
    """A local Ray (2 CPUs, bound to 127.0.0.1), shared by the test modules that ask for it (the
    cluster test and the main job start and stop their own before it: modules run in name order)."""
    from cembed.distributed import init_local

    ray = init_local(num_cpus=2)
    yield ray
    ray.shutdown()
