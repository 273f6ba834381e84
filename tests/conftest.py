import numpy as np
import pytest

import cembed


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(autouse=True)
def _restore_threads():
    """No test leaks a set_num_threads() into the next."""
    old = cembed._config._user_threads
    yield
    cembed.set_num_threads(old)
