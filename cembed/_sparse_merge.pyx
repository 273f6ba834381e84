"""Merging two coalesced row-sparse gradients (`SparseGrad.merge`, the momentum buffer's live rows).

Both inputs list strictly increasing row ids. `merge_plan` walks them once, serially, and assigns
every row of either input its slot in the sorted union; `merge_values` then writes the union's
values with one writer per output row in each phase, so the result does not depend on the thread
count. Work is O(n_a + n_b), never O(number of rows in the table).
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memset

from cembed._rows cimport row_add


def merge_plan(const int64_t[::1] a_rows,     # IN  (n_a,) strictly increasing
               const int64_t[::1] b_rows,     # IN  (n_b,) strictly increasing
               int64_t[::1] out_rows,         # OUT (n_a + n_b,) union, ascending (first n_out used)
               int64_t[::1] a_slot,           # OUT (n_a,) output slot of each row of a
               int64_t[::1] b_slot):          # OUT (n_b,) output slot of each row of b
    """Linear merge of two sorted row lists; returns the number of distinct rows."""
    cdef Py_ssize_t n_a = a_rows.shape[0], n_b = b_rows.shape[0]
    cdef Py_ssize_t i = 0, k = 0, n_out = 0
    with nogil:
        while i < n_a or k < n_b:
            if k >= n_b or (i < n_a and a_rows[i] < b_rows[k]):
                out_rows[n_out] = a_rows[i]
                a_slot[i] = n_out
                i += 1
            elif i >= n_a or b_rows[k] < a_rows[i]:
                out_rows[n_out] = b_rows[k]
                b_slot[k] = n_out
                k += 1
            else:
                out_rows[n_out] = a_rows[i]
                a_slot[i] = n_out
                b_slot[k] = n_out
                i += 1
                k += 1
            n_out += 1
    return n_out


def merge_values(const floating[:, ::1] a_values,   # IN  (n_a, dim)
                 const int64_t[::1] a_slot,          # IN  (n_a,) ascending output slots
                 const floating[:, ::1] b_values,   # IN  (n_b, dim)
                 const int64_t[::1] b_slot,          # IN  (n_b,) ascending output slots
                 floating[:, ::1] out,               # OUT (n_out, dim)
                 int n_threads):
    """out = +0.0, plus a scattered to a_slot, plus b scattered to b_slot: every row summed from +0.0,
    a's value first, as torch's sparse add coalesces (a row of one input holding -0.0 gives +0.0,
    whichever input holds it). Parallel over a's rows, then over b's rows: each output row has one
    writer in each phase."""
    cdef Py_ssize_t n_a = a_slot.shape[0], n_b = b_slot.shape[0], dim = out.shape[1]
    cdef Py_ssize_t n_out = out.shape[0]
    cdef Py_ssize_t i
    if dim == 0 or n_out == 0:
        return
    with nogil:
        for i in prange(n_out, schedule="static", num_threads=n_threads):
            memset(&out[i, 0], 0, dim * sizeof(floating))
        for i in prange(n_a, schedule="static", num_threads=n_threads):
            row_add(&out[a_slot[i], 0], &a_values[i, 0], dim)
        for i in prange(n_b, schedule="static", num_threads=n_threads):
            row_add(&out[b_slot[i], 0], &b_values[i, 0], dim)
