import os

import numpy as np
import pytest
from hypothesis import settings

import cembed

# Shared 2-core machines are noisy: no per-example deadline; a bounded number of examples.
settings.register_profile("cembed", deadline=None, max_examples=60, derandomize=True)
settings.register_profile("thorough", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("CEMBED_HYPOTHESIS_PROFILE", "cembed"))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _restore_threads():
    """No test leaks a set_num_threads() into the next."""
    old = cembed._config._user_threads
    yield
    cembed.set_num_threads(old)


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt during the test, as in an interactive Python: a process started
    in the background by a non-interactive shell inherits SIGINT ignored, and Python keeps it so."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
