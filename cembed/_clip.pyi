"""Type stub for the compiled clipping kernels (cembed/_clip.pyx)."""
import numpy as np
import numpy.typing as npt

KIND_MAX_ABS: int
KIND_SUM_ABS: int
KIND_SUM_SQ: int
KIND_SUM_POW: int

_Floats = npt.NDArray[np.float32] | npt.NDArray[np.float64]

def norm_reduce(x: _Floats, kind: int, p: float, n_threads: int) -> float:
    """Float64 sum of |x|^p (or max |x|, NaN wins) over a flat C-contiguous array, thread-count independent."""
    ...

def transform_(x: _Floats, op: int, a: float, b: float, n_threads: int) -> None:
    """In place: op 0 scales by a; op 1 clamps into [a, b] (NaN kept)."""
