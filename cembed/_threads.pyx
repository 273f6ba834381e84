"""OpenMP and CPU facts of this build, read by cembed._config."""
from cembed._openmp cimport CEMBED_HAVE_OPENMP, CEMBED_OPENMP_VERSION, omp_get_max_threads

cdef extern from "_half.h" nogil:
    """
    #ifdef CEMBED_X86_INTRINSICS
    #define CEMBED_USES_F16C() cembed_have_f16c()
    #define CEMBED_USES_AVX512F() cembed_have_avx512f()
    #else
    #define CEMBED_USES_F16C() 0
    #define CEMBED_USES_AVX512F() 0
    #endif
    """
    int CEMBED_USES_F16C()
    int CEMBED_USES_AVX512F()


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


def cpu_paths():
    """Which hand-written CPU paths the kernels take on this machine (_half.h): {"f16c": float16 rows
    widened with F16C, "avx512f": bfloat16 rows rounded and updated, float16 rows rounded stochastically,
    with AVX-512F}. Each is the CPU's
    support, less what $CEMBED_DISABLE_CPU_FEATURES names; the results are the same bits either way."""
    return {"f16c": bool(CEMBED_USES_F16C()), "avx512f": bool(CEMBED_USES_AVX512F())}
