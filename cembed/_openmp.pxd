# OpenMP shim: compiles with and without OpenMP. Without it the query functions report one thread
# and Cython's prange/parallel blocks run serially.
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CEMBED_HAVE_OPENMP 1
    #define CEMBED_OPENMP_VERSION _OPENMP
    #else
    #define CEMBED_HAVE_OPENMP 0
    #define CEMBED_OPENMP_VERSION 0
    static inline int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int CEMBED_HAVE_OPENMP
    int CEMBED_OPENMP_VERSION
    int omp_get_max_threads() noexcept nogil
