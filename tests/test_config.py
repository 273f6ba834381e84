"""Threads, build configuration and the grouping sort shared by the kernels (issue 2)."""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, strategies as st

import cembed
from cembed import _sort

from util import assert_bitwise_equal, env_importing_this_cembed


def test_set_get_num_threads():
    default = cembed.get_num_threads()
    assert default >= 1
    cembed.set_num_threads(3)
    assert cembed.get_num_threads() == 3
    cembed.set_num_threads(None)
    assert cembed.get_num_threads() == default
    for bad, exc in [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]:
        with pytest.raises(exc):
            cembed.set_num_threads(bad)
    assert cembed.get_num_threads() == default


def test_threadpoolctl_limits_are_honoured():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cembed._config.openmp_enabled():
        pytest.skip("serial build")
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cembed.get_num_threads() == 1
    cembed.set_num_threads(2)
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cembed.get_num_threads() == 2  # an explicit set_num_threads wins
    cembed.set_num_threads(None)
    with threadpoolctl.threadpool_limits(cembed._config.MAX_THREADS + 100, user_api="openmp"):
        assert cembed.get_num_threads() == cembed._config.MAX_THREADS   # capped as set_num_threads is


def test_omp_num_threads_is_honoured(tmp_path):
    code = "import cembed; print(cembed.get_num_threads())"
    env = env_importing_this_cembed(OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "1"
    if cembed._config.openmp_enabled():
        env["OMP_NUM_THREADS"] = "3"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
        assert out.stdout.strip() == "3"
        env["OMP_NUM_THREADS"] = "100000"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
        assert out.stdout.strip() == str(cembed._config.MAX_THREADS)


def test_show_config():
    buf = io.StringIO()
    cembed.show_config(file=buf)
    text = buf.getvalue()
    assert f"cembed {cembed.__version__}" in text
    assert ("OpenMP: enabled" in text) != ("OpenMP: disabled" in text)
    assert "threads:" in text and "compile flags:" in text
    assert "-ffast-math" not in text and "-march=native" not in text
    if os.environ.get("CEMBED_FAIL_NO_OPENMP", "") not in ("", "0"):
        assert "OpenMP: enabled" in text  # CI builds with OpenMP


@given(keys=st.lists(st.integers(0, 2**40), max_size=300), small=st.booleans(), int32=st.booleans())
def test_sort_rows_is_a_stable_grouping(keys, small, int32):
    keys = np.array(keys, dtype=np.int64)
    if small:
        keys %= 7
    if int32:
        keys = (keys % 2**31).astype(np.int32)
    for n_threads in (1, 2):
        order, rows, starts = _sort.sort_rows(keys, n_threads)
        expect = np.argsort(keys, kind="stable")
        np.testing.assert_array_equal(order, expect)
        np.testing.assert_array_equal(rows, np.unique(keys))
        assert starts[0] == 0 and starts[-1] == keys.size
        assert np.all(np.diff(starts) > 0)
        for s in range(rows.size):
            assert np.all(keys[order[starts[s]:starts[s + 1]]] == rows[s])


def test_sort_rows_large_parallel_is_thread_independent(rng):
    keys = rng.integers(0, 50_000_000, 200_000)
    a = _sort.sort_rows(keys, 1)
    b = _sort.sort_rows(keys, 2)
    for x, y in zip(a, b):
        assert_bitwise_equal(x, y)
    np.testing.assert_array_equal(a[0], np.argsort(keys, kind="stable"))
