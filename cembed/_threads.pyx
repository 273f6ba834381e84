"""OpenMP facts of this build, read by cembed._config."""
from cembed._openmp cimport CEMBED_HAVE_OPENMP, CEMBED_OPENMP_VERSION, omp_get_max_threads


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(CEMBED_HAVE_OPENMP)


def openmp_version():
    """The _OPENMP date macro of the build (e.g. 201511), 0 without OpenMP."""
    return int(CEMBED_OPENMP_VERSION)


def max_threads():
    """omp_get_max_threads() of the calling thread, resolved now: honours OMP_NUM_THREADS and
    threadpoolctl limits (which call omp_set_num_threads on the OpenMP runtime we link)."""
    return int(omp_get_max_threads())
