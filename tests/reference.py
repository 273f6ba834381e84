"""Readable NumPy references for every cembed kernel: the slow, obvious version of each formula
(docs/behaviour.md), used as the oracle beside torch. Loops are written out where that is clearer."""
import numpy as np

# ---------------------------------------------------------------------------------------------
# Lookup and renorm (issue 2)
# ---------------------------------------------------------------------------------------------


def embedding(indices, weight):
    """weight[indices]: shape indices.shape + (dim,)."""
    return weight[np.asarray(indices)]


def row_norm(row, p):
    """The norm torch's embedding_renorm_ uses for norm_type p (docs/behaviour.md §4)."""
    a = np.abs(row.astype(np.float64))
    if p == np.inf:
        return a.max() if a.size else 0.0
    if p == -np.inf:
        return a.min() if a.size else np.inf
    if p == 0:
        return float(np.count_nonzero(row))
    with np.errstate(divide="ignore"):  # negative p with zero entries: inf terms, as torch
        return float(np.sum(a ** p) ** (1.0 / p))


def embedding_renorm_(weight, indices, max_norm, norm_type=2.0):
    """Each distinct referenced row with norm > max_norm is scaled by max_norm / (norm + 1e-7),
    the scale rounded to the weight's dtype. In place; returns weight."""
    for r in np.unique(np.asarray(indices).reshape(-1)):
        norm = float(weight.dtype.type(row_norm(weight[r], norm_type)))
        if norm > max_norm:
            weight[r] = weight[r] * weight.dtype.type(max_norm / (norm + 1e-7))
    return weight


# ---------------------------------------------------------------------------------------------
# Gradients (issue 3)
# ---------------------------------------------------------------------------------------------


def embedding_backward(grad_output, indices, num_embeddings, padding_idx=None, scale_grad_by_freq=False):
    """Dense gradient of weight[indices] (docs/behaviour.md §5.1): for each position in input order,
    G[r] += s * grad_output[i], skipping padding; s = fp32(1/count[r]) fused (fma) with sgbf."""
    idx = np.asarray(indices).reshape(-1)
    go = np.asarray(grad_output)
    go = go.reshape(idx.size, go.shape[-1])
    dtype = go.dtype
    grad = np.zeros((num_embeddings, go.shape[1]), dtype=dtype)
    counts = np.bincount(idx, minlength=num_embeddings) if idx.size else np.zeros(num_embeddings, int)
    for i, r in enumerate(idx):
        if r == padding_idx:
            continue
        if scale_grad_by_freq:
            s = dtype.type(1.0 / counts[r])
            # fma(g, s, acc) with one rounding: exact in float64 for float32 data, then rounded
            if dtype == np.float32:
                grad[r] = (go[i].astype(np.float64) * np.float64(s) + grad[r].astype(np.float64)).astype(dtype)
            else:
                grad[r] = go[i] * s + grad[r]  # float64: two roundings (compare with a tolerance)
        else:
            grad[r] = grad[r] + go[i]
    return grad


def coalesce(rows, values, num_rows):
    """(unique ascending rows, per-row sums of values in input order)."""
    rows = np.asarray(rows).reshape(-1)
    uniq = np.unique(rows)
    out = np.zeros((uniq.size, values.shape[1]), dtype=values.dtype)
    pos = {int(r): k for k, r in enumerate(uniq)}
    for i, r in enumerate(rows):
        out[pos[int(r)]] = out[pos[int(r)]] + values[i]
    return uniq.astype(np.int64), out


# ---------------------------------------------------------------------------------------------
# EmbeddingBag (issue 5)
# ---------------------------------------------------------------------------------------------


def bags_of(indices, offsets=None, include_last_offset=False):
    """The list of bags (lists of positions into the flat input) per docs/behaviour.md §6.2."""
    idx = np.asarray(indices)
    if idx.ndim == 2:
        n_bags, n = idx.shape
        return [list(range(b * n, (b + 1) * n)) for b in range(n_bags)]
    offsets = list(np.asarray(offsets))
    ends = offsets[1:] if include_last_offset else offsets[1:] + [idx.size]
    starts = offsets[:-1] if include_last_offset else offsets
    return [list(range(s, e)) for s, e in zip(starts, ends)]


def embedding_bag(indices, weight, offsets=None, mode="mean", per_sample_weights=None,
                  include_last_offset=False, padding_idx=None):
    """Pooled rows, one bag at a time, in bag order (docs/behaviour.md §6.3)."""
    flat = np.asarray(indices).reshape(-1)
    psw = None if per_sample_weights is None else np.asarray(per_sample_weights).reshape(-1)
    bags = bags_of(indices, offsets, include_last_offset)
    out = np.zeros((len(bags), weight.shape[1]), dtype=weight.dtype)
    for b, positions in enumerate(bags):
        kept = [k for k in positions if flat[k] != padding_idx]
        if not kept:
            continue
        if mode == "max":
            acc = weight[flat[kept[0]]].copy()
            for k in kept[1:]:
                row = weight[flat[k]]
                acc = np.where(row > acc, row, acc)   # strictly greater: first occurrence wins
        else:
            acc = np.zeros(weight.shape[1], dtype=weight.dtype)
            for k in kept:
                term = weight[flat[k]] if psw is None else psw[k] * weight[flat[k]]
                acc = acc + term
            if mode == "mean":
                acc = acc / weight.dtype.type(len(kept))
        out[b] = acc
    return out


def embedding_bag_backward(grad_output, indices, weight, offsets=None, mode="mean", per_sample_weights=None,
                           include_last_offset=False, padding_idx=None, scale_grad_by_freq=False):
    """(dense weight gradient, per_sample_weights gradient) with the TRUE index counts for
    scale_grad_by_freq (docs/behaviour.md §0; torch 2.13 divides by wrong counts, docs/behaviour.md §7.1)."""
    flat = np.asarray(indices).reshape(-1)
    psw = None if per_sample_weights is None else np.asarray(per_sample_weights).reshape(-1)
    bags = bags_of(indices, offsets, include_last_offset)
    grad = np.zeros_like(weight, dtype=np.float64)
    psw_grad = np.zeros(flat.size, dtype=np.float64)
    counts = np.bincount(flat, minlength=weight.shape[0]) if flat.size else np.zeros(weight.shape[0], int)
    for b, positions in enumerate(bags):
        kept = [k for k in positions if flat[k] != padding_idx]
        if not kept:
            continue
        if mode == "max":
            for d in range(weight.shape[1]):
                winner = max(kept, key=lambda k: (weight[flat[k], d], -k))  # first occurrence of the max
                grad[flat[winner], d] += grad_output[b, d]
            continue
        for k in kept:
            s = 1.0
            if mode == "mean":
                s /= len(kept)
            if psw is not None:
                s *= psw[k]
                psw_grad[k] = float(np.dot(grad_output[b].astype(np.float64), weight[flat[k]].astype(np.float64)))
            if scale_grad_by_freq:
                s /= counts[flat[k]]
            grad[flat[k]] += s * grad_output[b]
    return grad, psw_grad.reshape(np.asarray(indices).shape)


# ---------------------------------------------------------------------------------------------
# Optimizers (issue 4)
# ---------------------------------------------------------------------------------------------


def sparse_adam_step(weight, exp_avg, exp_avg_sq, step, rows, grad, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                     maximize=False):
    """One SparseAdam step (docs/behaviour.md §8.2) on a coalesced gradient (rows, grad); in place.
    ``step`` is the step number after incrementing. Rows not in ``rows`` are untouched."""
    f = weight.dtype.type
    beta1, beta2 = betas
    g = -grad if maximize else grad
    for k, r in enumerate(rows):
        m0, v0 = exp_avg[r].copy(), exp_avg_sq[r].copy()
        dm = (g[k] - m0) * f(1 - beta1)
        dv = (g[k] * g[k] - v0) * f(1 - beta2)
        exp_avg[r] = m0 + dm
        exp_avg_sq[r] = v0 + dv
        step_size = lr * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        weight[r] = weight[r] + f(-step_size) * ((dm + m0) / (np.sqrt(dv + v0) + f(eps)))


def adagrad_step(weight, state_sum, step, rows, grad, lr=1e-2, lr_decay=0.0, eps=1e-10, maximize=False):
    """One sparse Adagrad step (docs/behaviour.md §8.3); ``step`` after incrementing; in place."""
    f = weight.dtype.type
    g = -grad if maximize else grad
    clr = lr / (1 + (step - 1) * lr_decay)
    for k, r in enumerate(rows):
        state_sum[r] = state_sum[r] + g[k] * g[k]
        std = np.sqrt(state_sum[r]) + f(eps)
        weight[r] = weight[r] + f(-clr) * (g[k] / std)   # torch fuses this (fma); compare with a tolerance


def sgd_dense_momentum_step(weight, buf, grad_dense, lr, momentum=0.0, dampening=0.0, nesterov=False,
                            maximize=False, first=False):
    """Dense SGD step; sparse gradients behave as their dense form with zeros (docs/behaviour.md §8.1).
    Returns the new momentum buffer (None without momentum)."""
    g = -grad_dense if maximize else grad_dense
    if momentum != 0:
        buf = g.copy() if first else momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    weight -= lr * g
    return buf


def rowwise_adagrad_step(weight, state_sum, rows, grad, lr=0.01, eps=1e-8, weight_decay=0.0,
                         weight_decay_mode="l2", maximize=False):
    """FBGEMM's EXACT_ROWWISE_ADAGRAD CPU rule, one row at a time, in the weight's dtype; in place:
    h = g (+ wd * w for "l2"); state += mean(h^2); multiplier = lr / (sqrt(state) + eps);
    w = correction * w - g * multiplier with correction 1 - multiplier * wd ("l2"),
    1 - lr * wd ("decoupled") or 1. The sum of squares is taken as cembed does: lane l of 8 sums
    d = l, l + 8, ... in order, then the lanes are added 0..7 (FBGEMM adds d = 0..D-1 in order)."""
    f = weight.dtype.type
    dim = weight.shape[1]
    mode = weight_decay_mode if weight_decay != 0 else None
    for k, r in enumerate(rows):
        g = f(-1) * grad[k] if maximize else grad[k]
        h = g + f(weight_decay) * weight[r] if mode == "l2" else g
        squares = h * h
        lanes = np.zeros(8, dtype=weight.dtype)
        for d in range(dim):
            lanes[d % 8] = lanes[d % 8] + squares[d]
        total = lanes[0]
        for lane in lanes[1:]:
            total = f(total + lane)
        state_sum[r] = f(state_sum[r] + f(total / f(dim)))
        multiplier = f(f(lr) / f(np.sqrt(state_sum[r]) + f(eps)))
        if mode == "l2":
            correction = f(f(1) - multiplier * f(weight_decay))
        elif mode == "decoupled":
            correction = f(f(1) - f(lr) * f(weight_decay))
        else:
            correction = f(1)
        weight[r] = correction * weight[r] - g * multiplier
# ---------------------------------------------------------------------------------------------
# cembed extensions: per-row bias correction, SparseAdamW (docs/behaviour.md §8.5)
# ---------------------------------------------------------------------------------------------


def sparse_adam_row_bias_step(weight, exp_avg, exp_avg_sq, row_step, rows, grad, lr=1e-3, betas=(0.9, 0.999),
                              eps=1e-8, maximize=False):
    """SparseAdam with bias_correction="row": each row is corrected with its own update count
    (``row_step[r]``, incremented first) instead of the parameter's step; in place."""
    for k, r in enumerate(rows):
        row_step[r] += 1
        sparse_adam_step(weight, exp_avg, exp_avg_sq, int(row_step[r]), rows[k:k + 1], grad[k:k + 1], lr=lr,
                         betas=betas, eps=eps, maximize=maximize)


def new_adamw_state(weight):
    """The reference's SparseAdamW state: moments, the lr of every step so far (``lrs[u - 1]`` is
    lr_u), the step each row was last decayed to, each row's update count."""
    n_rows = weight.shape[0]
    return dict(step=0, lrs=[], exp_avg=np.zeros_like(weight), exp_avg_sq=np.zeros_like(weight),
                last=np.zeros(n_rows, dtype=np.int64), row_step=np.zeros(n_rows, dtype=np.int64))


def _pending_decay(state, r, weight_decay):
    """prod_{u = last[r]+1 .. step} (1 - lr_u * weight_decay), as a plain float64 product."""
    factor = 1.0
    for lr_u in state["lrs"][state["last"][r]:state["step"]]:
        factor *= 1.0 - lr_u * weight_decay
    return factor


def sparse_adamw_step(weight, state, rows, grad, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                      maximize=False, bias_correction="global"):
    """One SparseAdamW step on a coalesced gradient (rows ascending, distinct); in place.

    Each named row first catches up on the decay of every step since its last update (the exact
    product of the factors), then takes torch's AdamW update (torch/optim/adam.py, single tensor):
    m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g g; w += -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
    Rows not named keep everything (their decay stays pending)."""
    f = weight.dtype.type
    beta1, beta2 = betas
    state["step"] += 1
    state["lrs"].append(lr)
    g = -grad if maximize else grad
    for k, r in enumerate(rows):
        weight[r] = weight[r] * f(_pending_decay(state, r, weight_decay))
        state["last"][r] = state["step"]
        state["row_step"][r] += 1
        n = state["step"] if bias_correction == "global" else int(state["row_step"][r])
        bc1, bc2 = 1 - beta1 ** n, 1 - beta2 ** n
        m = state["exp_avg"][r] + f(1 - beta1) * (g[k] - state["exp_avg"][r])
        v = state["exp_avg_sq"][r] * f(beta2) + f(1 - beta2) * g[k] * g[k]
        state["exp_avg"][r], state["exp_avg_sq"][r] = m, v
        weight[r] = weight[r] + f(-lr / bc1) * m / (np.sqrt(v) / f(bc2 ** 0.5) + f(eps))


def adamw_apply_pending_decay(weight, state, weight_decay):
    """Every row's pending decay, applied; in place."""
    for r in range(weight.shape[0]):
        weight[r] = weight[r] * weight.dtype.type(_pending_decay(state, r, weight_decay))
        state["last"][r] = state["step"]


# ---------------------------------------------------------------------------------------------
# 16-bit tables (issue 12): bfloat16 / float16 storage, float32 compute
# ---------------------------------------------------------------------------------------------

HALF_FORMATS = {"bf16": (8, 7), "f16": (5, 10)}   # exponent bits, mantissa bits (1 sign bit each)


def half_bits_to_float(bits, fmt):
    """uint16 bit patterns of bfloat16 ("bf16") or IEEE float16 ("f16") decoded by the textbook
    formula, as float64: sign * 2**(e - bias) * (1 + m / 2**mbits) for normal numbers,
    sign * 2**(1 - bias) * (m / 2**mbits) for zero and subnormals, +-inf or NaN for the top exponent."""
    ebits, mbits = HALF_FORMATS[fmt]
    bias = 2 ** (ebits - 1) - 1
    bits = np.asarray(bits).astype(np.int64)
    sign = np.where(bits >> 15, -1.0, 1.0)
    e = (bits >> mbits) & (2 ** ebits - 1)
    m = (bits & (2 ** mbits - 1)).astype(np.float64)
    normal = sign * np.exp2(e.astype(np.float64) - bias) * (1.0 + m / 2 ** mbits)
    subnormal = sign * 2.0 ** (1 - bias) * (m / 2 ** mbits)
    special = np.where(m == 0, sign * np.inf, np.nan)
    return np.where(e == 0, subnormal, np.where(e == 2 ** ebits - 1, special, normal))


def round_to_half(x, fmt):
    """float32 values rounded to nearest, ties to even, in bfloat16 / float16, returned as float64
    values: the quantum of x's binade (never finer than the subnormal step) times x / quantum rounded
    half-to-even (np.round), +-inf past the largest finite value; NaN stays NaN."""
    ebits, mbits = HALF_FORMATS[fmt]
    bias = 2 ** (ebits - 1) - 1
    with np.errstate(invalid="ignore"):   # signalling NaNs warn when widened
        x = np.asarray(x, dtype=np.float32).astype(np.float64)
    finite = np.isfinite(x)
    _, ex = np.frexp(np.where(finite, x, 1.0))          # |x| = m * 2**ex with m in [0.5, 1)
    binade = np.maximum(ex - 1, 1 - bias)               # floor(log2 |x|), at least the smallest normal's
    quantum = np.exp2((binade - mbits).astype(np.float64))
    with np.errstate(invalid="ignore"):
        r = np.round(np.where(finite, x, 0.0) / quantum) * quantum
    largest = (2.0 - 2.0 ** -mbits) * 2.0 ** bias
    r = np.where(np.abs(r) > largest, np.copysign(np.inf, x), r)
    return np.where(finite, r, x)


def embedding_renorm_half_(weight, indices, max_norm, norm_type=2.0):
    """embedding_renorm_ of a float16 / bfloat16 table as torch does it: the row widened to float32,
    its norm rounded to float32 and then to the table's dtype; the factor max_norm / (norm + 1e-7)
    rounded to the table's dtype; each element multiplied in float32 and rounded once. In place."""
    dtype = weight.dtype
    for r in np.unique(np.asarray(indices).reshape(-1)):
        row = weight[r].astype(np.float32)
        norm = float(np.array([np.float32(row_norm(row, norm_type))]).astype(dtype).astype(np.float64)[0])
        if norm > max_norm:
            scale = np.array([np.float32(max_norm / (norm + 1e-7))]).astype(dtype).astype(np.float32)[0]
            weight[r] = (row * scale).astype(dtype)
    return weight


# Reproducible stochastic rounding to bfloat16 / float16 (issue 12, docs/behaviour.md §8.7)
# ---------------------------------------------------------------------------------------------

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(z):
    """SplitMix64's step on a uint64 array: add the golden gamma, then the 64-bit finaliser."""
    with np.errstate(over="ignore"):
        z = np.asarray(z, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash32(x):
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint32)
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def round_draws(seed, step, rows, stream, n):
    """Draws 0..n-1 of the generator for every row: uint32 array (len(rows), n)."""
    rows = np.asarray(rows, dtype=np.int64).astype(np.uint64)
    key = _mix64(_mix64(_mix64(_mix64(np.uint64(seed)) ^ np.uint64(step)) ^ rows) ^ np.uint64(stream))
    lo = (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)[:, None]
    hi = (key >> np.uint64(32)).astype(np.uint32)[:, None]
    with np.errstate(over="ignore"):
        cols = np.arange(n, dtype=np.uint32)[None, :] * np.uint32(0x9E3779B9)
    return _hash32(lo ^ cols) ^ hi


def round_bits(seed, step, rows, stream, dim, dtype=np.float16):
    """The random bits of every (row, column) as a 32-bit fraction (uint32 array (len(rows), dim)):
    float16 uses draw j for column j; bfloat16 needs 16 bits, so draw (j // 32) * 16 + j % 16 serves
    columns j (its high half) and j + 16 (its low half) of each block of 32, and the fraction is those
    16 bits * 2**16."""
    if np.dtype(dtype) == np.float16:
        return round_draws(seed, step, rows, stream, dim)
    j = np.arange(dim)
    draws = round_draws(seed, step, rows, stream, max(1, (dim + 31) // 32 * 16))[:, (j // 32) * 16 + j % 16]
    halves = np.where((j // 16) % 2 == 0, draws >> np.uint32(16), draws & np.uint32(0xFFFF))
    return (halves << np.uint32(16)).astype(np.uint32)


def stochastic_round(values, dtype, bits):
    """float32 ``values`` rounded to the 16-bit ``dtype`` with the random ``bits`` (uint32, same
    shape), written the readable way: the two neighbours lo <= |x| < hi of each magnitude, and hi taken
    when the fraction (|x| - lo) / (hi - lo), as a 32-bit fixed-point number, exceeds the random bits.
    Past the largest finite value the next value up is 2**16 (float16) / 2**128 (bfloat16), which is
    stored as infinity; NaN and infinities pass through."""
    x = np.asarray(values, dtype=np.float32)
    bits = np.asarray(bits, dtype=np.uint32)
    grid = _half_grid(dtype)
    out = np.empty(x.shape, dtype=dtype)
    flat_x, flat_b, flat_out = x.reshape(-1), bits.reshape(-1), out.reshape(-1)
    for i, v in enumerate(flat_x.astype(np.float64)):
        mag = abs(v)
        if np.isnan(v) or mag >= grid[-1]:
            flat_out[i] = np.float32(v * np.inf if not np.isnan(v) else v)
            continue
        k = int(np.searchsorted(grid, mag, side="right")) - 1
        lo, hi = grid[k], grid[k + 1]
        if lo != mag and int(flat_b[i]) < int(np.floor((mag - lo) / (hi - lo) * 2.0 ** 32)):
            lo = hi
        flat_out[i] = np.float32(np.copysign(lo, v) if lo < grid[-1] else np.copysign(np.inf, v))
    return out


_GRIDS = {}


def _half_grid(dtype):
    """Every non-negative finite value of the 16-bit dtype, ascending, then the next power of two
    (2**16 for float16, 2**128 for bfloat16), as float64."""
    key = np.dtype(dtype).name
    if key not in _GRIDS:
        if np.dtype(dtype) == np.float16:
            finite = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
            top = 2.0 ** 16
        else:
            finite = (np.arange(0, 0x7F80, dtype=np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
            top = 2.0 ** 128
        _GRIDS[key] = np.append(finite, top)
    return _GRIDS[key]
