"""Wasserstein distances between Koopman spectra (eigenvalue sets in the complex plane).

:func:`wasserstein` -- optimal-transport distance between two eigenvalue sets (uniform
point masses, Euclidean ground cost, optionally imaginary parts modulo a period);
:func:`pairwise_wasserstein` / :func:`wasserstein_block` -- batched kernels for many
spectra (the Ray fan-out in :mod:`raydyn.fanout` calls these), solving many small
assignment problems at once through the optional C extension
(raydyn/_ext/assignment.c) or scipy.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from numbers import Real
from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

__all__ = [
    "wasserstein",
    "wasserstein_block",
    "pairwise_wasserstein",
]

# ---------------------------------------------------------------------------
# Wasserstein distance between eigenvalue sets
# ---------------------------------------------------------------------------

_LCM_MAX = 240  # unequal counts: exact assignment on lcm-replicated sets up to this size


def _as_spectrum(e, name: str) -> np.ndarray:
    a = np.asarray(e)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of eigenvalues, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{name} is empty: a spectrum needs at least one eigenvalue")
    if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.complex128)
    if not np.all(np.isfinite(a)):
        raise ValueError(
            f"{name} contains NaN or inf (a zero eigenvalue under continuous=True gives -inf)"
        )
    return a


def _check_p(p: float) -> float:
    if isinstance(p, (bool, np.bool_)) or not isinstance(p, Real) or not (np.isfinite(p) and p >= 1):
        raise ValueError(f"p must be a finite number >= 1, got {p!r}")
    return float(p)


def _check_period(period, name: str = "imag_period") -> float:
    if period is None:
        return math.inf
    if isinstance(period, (bool, np.bool_)) or not isinstance(period, Real) or not (float(period) > 0):
        raise ValueError(f"{name} must be None or a number > 0 (2 pi / dt for continuous-time spectra), got {period!r}")
    return float(period)


def _periods(imag_period, n: int, name: str = "imag_period") -> np.ndarray | None:
    """None (no wrap), or (n,) periods from a scalar or a per-spectrum sequence (inf: no wrap)."""
    if imag_period is None:
        return None
    if isinstance(imag_period, (list, tuple, np.ndarray)):
        arr = [_check_period(v, f"{name}[{k}]") for k, v in enumerate(imag_period)]
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} periods but there are {n} spectra; give one per spectrum")
        return np.asarray(arr, dtype=np.float64)
    return np.full(n, _check_period(imag_period, name))


def _wrap(di: np.ndarray, period) -> np.ndarray:
    """Imaginary differences wrapped into [-P/2, P/2] (P: scalar or (..., 1, 1) per pair; inf: unchanged)."""
    per = np.asarray(period, dtype=np.float64)
    finite = np.isfinite(per)
    if not finite.any():
        return di
    safe = np.where(finite, per, 1.0)
    wrapped = di - safe * np.round(di / safe)
    return np.where(finite, wrapped, di)


def _cost(a: np.ndarray, b: np.ndarray, p: float, period=None) -> np.ndarray:
    """|a_i - b_j|^p for (..., n) and (..., m) complex -> (..., n, m) float64.

    ``period``: when given (scalar, or broadcastable to the leading axes), imaginary parts are
    compared modulo it: the ground cost of continuous-time eigenvalues log(lambda) / dt,
    whose imaginary parts are only defined modulo 2 pi / dt.
    """
    dr = a.real[..., :, None] - b.real[..., None, :]
    di = a.imag[..., :, None] - b.imag[..., None, :]
    if period is not None:
        per = np.asarray(period, dtype=np.float64)
        di = _wrap(di, per.reshape(per.shape + (1, 1)) if per.ndim else per)
    dr *= dr
    di *= di
    dr += di
    if p == 1.0:
        return np.sqrt(dr, out=dr)
    if p == 2.0:
        return dr
    return np.power(dr, p / 2, out=dr)


def _transport_lp(cost: np.ndarray) -> float:
    """min sum pi_ij c_ij with row sums 1/n, column sums 1/m (HiGHS)."""
    n, m = cost.shape
    rows = np.repeat(np.arange(n), m)
    cols = np.tile(np.arange(m), n)
    idx = np.arange(n * m)
    a_eq = coo_matrix(
        (np.ones(2 * n * m), (np.concatenate([rows, n + cols]), np.concatenate([idx, idx]))),
        shape=(n + m, n * m),
    ).tocsr()
    b_eq = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
    res = linprog(cost.ravel(), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"transport LP failed: {res.message}")
    return float(res.fun)


def wasserstein(eigs_a, eigs_b, p: float = 1, *, imag_period: float | None = None) -> float:
    """Wasserstein-p distance between two eigenvalue sets as uniform point masses.

    W_p = (min_pi sum_ij pi_ij |a_i - b_j|^p)^(1/p), pi with row sums 1/n and column
    sums 1/m, Euclidean ground cost in the complex plane. Equal counts: exact
    assignment. Unequal counts: exact assignment on the sets replicated to
    lcm(n, m) points (when lcm <= 240), else the transport LP -- always a full
    transport, never a partial matching.

    Parameters
    ----------
    eigs_a : (n,) complex;  eigs_b : (m,) complex;  p : float >= 1
    imag_period : None or float > 0
        Compare imaginary parts modulo this period, i.e. on a cylinder: for continuous-time
        spectra log(lambda) / dt pass 2 pi / dt, so that a pair of eigenvalues just above and
        below the negative real axis (lambda ~ -1, the period-2 oscillation) is close, not
        2 pi / dt apart. None (default): plain Euclidean cost (discrete-time spectra).

    Returns
    -------
    float, in the units of the eigenvalues.
    """
    p = _check_p(p)
    period = _check_period(imag_period)
    period = None if math.isinf(period) else period
    a = _as_spectrum(eigs_a, "eigs_a")
    b = _as_spectrum(eigs_b, "eigs_b")
    n, m = a.size, b.size
    if n != m:
        big = n * m // math.gcd(n, m)
        if big > _LCM_MAX:
            return _transport_lp(_cost(a, b, p, period)) ** (1.0 / p)
        a, b = np.repeat(a, big // n), np.repeat(b, big // m)
    c = _cost(a, b, p, period)
    r, k = linear_sum_assignment(c)
    return float((c[r, k].sum() / a.size) ** (1.0 / p))


# --- batched kernels --------------------------------------------------------

_BRUTE_MAX = 4  # n <= this: enumerate permutations in one vectorised op

try:  # raydyn/_ext/assignment.c, built at install when a C compiler is present (optional)
    from raydyn._ext._assignment import assignment_sums as _batched_assignment
except ImportError:  # pragma: no cover - depends on the install
    _batched_assignment = None
try:  # the fused cost + row-minimum + solve kernel of the same extension (absent from builds before it)
    from raydyn._ext._assignment import wasserstein_pair_sums as _fused_pair_sums
except ImportError:  # pragma: no cover - depends on the install
    _fused_pair_sums = None
_PAIR_CHUNK = 4096  # pairs whose cost matrices are materialised at once
_FUSED_CHUNK = 65536  # pairs per call of the fused kernel (its (P, n) row minima)


@lru_cache(maxsize=8)
def _perms(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))), dtype=np.intp)


def _assignment_sums(cost: np.ndarray) -> np.ndarray:
    """Minimum assignment cost of each square problem in a batch.

    cost : (B, n, n) non-negative -> (B,) sum of the optimal assignment's costs.

    Tiny n: all n! permutations at once. Otherwise problems whose row minima fall
    in distinct columns are settled without a solver (that assignment attains the
    lower bound sum_i min_j c_ij), and the rest go in one call to the compiled batch
    solver (raydyn/_ext/assignment.c, ~1.5 us per 10 x 10 problem, tested against
    scipy) or, when it was not built, through scipy's
    linear_sum_assignment one precomputed contiguous matrix at a time; the sums
    are gathered in one vectorised step. (Solving many problems in one call of
    min_weight_full_bipartite_matching on a sparse block-diagonal matrix was
    measured too: no faster for n = 10, and superlinear in the number of blocks.)
    """
    bsz, n, _ = cost.shape
    if n == 1:
        return cost[:, 0, 0].copy()
    if n <= _BRUTE_MAX:
        perms = _perms(n)  # (n!, n)
        totals = cost[:, np.arange(n)[None, :], perms].sum(axis=-1)  # (B, n!)
        return totals.min(axis=1)
    # Exact shortcut: if every row's minimum lies in a distinct column, that
    # assignment attains the lower bound sum_i min_j c_ij and is optimal. Common
    # when the two spectra are close (the interesting case); cheap otherwise.
    arg = cost.argmin(axis=2)  # (B, n)
    out = np.take_along_axis(cost, arg[:, :, None], axis=2)[:, :, 0].sum(axis=1)
    if n <= 62:
        easy = np.bitwise_or.reduce(np.left_shift(1, arg, dtype=np.int64), axis=1) == (1 << n) - 1
    else:
        easy = np.all(np.sort(arg, axis=1) == np.arange(n), axis=1)
    hard = np.flatnonzero(~easy)
    if hard.size == 0:
        return out
    hard_cost = cost[hard]
    if _batched_assignment is not None:  # the compiled batch solver: one call for every hard problem
        sums = np.empty(hard.size)
        _batched_assignment(np.ascontiguousarray(hard_cost, dtype=np.float64), sums, n)
        out[hard] = sums
        return out
    # Row then column reduction leaves the optimal assignment unchanged and gives the
    # solver a warm dual start (measured ~15% faster for n = 10).
    reduced = hard_cost - np.take_along_axis(hard_cost, arg[hard][:, :, None], axis=2)
    reduced -= reduced.min(axis=1, keepdims=True)
    cols = np.empty((hard.size, n), dtype=np.intp)
    for k, c in enumerate(reduced):  # C-contiguous (n, n) views, no validation copies
        cols[k] = linear_sum_assignment(c)[1]
    out[hard] = np.take_along_axis(hard_cost, cols[:, :, None], axis=2)[:, :, 0].sum(axis=1)
    return out


def _w_equal_fused(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray, p: float,
                   period: np.ndarray | None) -> np.ndarray:
    """:func:`_w_equal_batch` through the compiled fused kernel, for pairs (a[ia[k]], b[ib[k]]).

    The extension computes each pair's ground cost with the same floating-point operations as
    :func:`_cost`, the row minima (numpy's argmin) and, for the pairs whose minima share a
    column, the assignment (the solver :func:`_assignment_sums` calls); the easy pairs' sums are
    taken here with numpy's sum over the same (P, n) row minima, so every value is bit-for-bit
    the one of the numpy path, without the (P, n, n) cost arrays."""
    n = a.shape[1]
    av = np.ascontiguousarray(a, dtype=np.complex128).view(np.float64)
    bv = av if b is a else np.ascontiguousarray(b, dtype=np.complex128).view(np.float64)
    ia = np.ascontiguousarray(ia, dtype=np.intp)
    ib = np.ascontiguousarray(ib, dtype=np.intp)
    out = np.empty(ia.size)
    for s in range(0, ia.size, _FUSED_CHUNK):
        e = min(ia.size, s + _FUSED_CHUNK)
        rowmin = np.empty((e - s, n))
        sums = np.empty(e - s)
        hard = np.empty(e - s, dtype=np.bool_)
        per = None if period is None else np.ascontiguousarray(period[s:e], dtype=np.float64)
        _fused_pair_sums(av, bv, n, ia[s:e], ib[s:e], per, p == 2.0, rowmin, sums, hard)
        tot = rowmin.sum(axis=1)
        tot[hard] = sums[hard]
        out[s:e] = tot / n
    return out if p == 1.0 else out ** (1.0 / p)


def _fused_ok(n: int, p: float) -> bool:
    return (_fused_pair_sums is not None and _batched_assignment is not None and n > _BRUTE_MAX
            and p in (1.0, 2.0))


def _w_equal_batch(a: np.ndarray, b: np.ndarray, p: float, period: np.ndarray | None = None) -> np.ndarray:
    """W_p for pairs of equal-size sets: a, b (P, n) -> (P,); period (P,) or None."""
    n = a.shape[1]
    if _fused_ok(n, p):
        rows = np.arange(a.shape[0], dtype=np.intp)
        return _w_equal_fused(a, b, rows, rows, p, period)
    out = np.empty(a.shape[0])
    for s in range(0, a.shape[0], _PAIR_CHUNK):
        per = None if period is None else period[s : s + _PAIR_CHUNK]
        c = _cost(a[s : s + _PAIR_CHUNK], b[s : s + _PAIR_CHUNK], p, per)
        out[s : s + c.shape[0]] = _assignment_sums(c) / n
    return out if p == 1.0 else out ** (1.0 / p)


class _Packed:
    """Spectra grouped by length: for length n, a (k_n, n) array and each spectrum's row."""

    def __init__(self, spectra: Sequence[np.ndarray]):
        self.lengths = np.array([s.size for s in spectra], dtype=np.intp)
        self.row = np.empty(len(spectra), dtype=np.intp)
        self.by_len: dict[int, np.ndarray] = {}
        for n in np.unique(self.lengths):
            idx = np.flatnonzero(self.lengths == n)
            self.by_len[int(n)] = np.stack([spectra[i] for i in idx]) if idx.size else np.empty((0, n))
            self.row[idx] = np.arange(idx.size)


def _pair_values(packed: _Packed, i: np.ndarray, j: np.ndarray, p: float,
                 periods: np.ndarray | None = None) -> np.ndarray:
    """W_p for the pairs (i[k], j[k]) of packed spectra; ``periods`` (N,) per spectrum or None.

    A pair's imaginary period is the smaller of its two (frequencies are comparable only
    modulo the coarser sampling's 2 pi / dt)."""
    out = np.empty(i.size)
    if i.size == 0:
        return out
    pair_period = None if periods is None else np.minimum(periods[i], periods[j])
    ni, nj = packed.lengths[i], packed.lengths[j]
    keys = ni.astype(np.int64) * (1 << 32) + nj
    for key in np.unique(keys):
        sel = np.flatnonzero(keys == key)
        n, m = int(key >> 32), int(key & 0xFFFFFFFF)
        per = None if pair_period is None else pair_period[sel]
        big = n * m // math.gcd(n, m)
        if big <= _LCM_MAX and _fused_ok(big, p):  # no per-pair gathering: the kernel indexes the tables
            ta = packed.by_len[n] if n == big else np.repeat(packed.by_len[n], big // n, axis=1)
            tb = ta if m == n else np.repeat(packed.by_len[m], big // m, axis=1)
            out[sel] = _w_equal_fused(ta, tb, packed.row[i[sel]], packed.row[j[sel]], p, per)
            continue
        a = packed.by_len[n][packed.row[i[sel]]]
        b = packed.by_len[m][packed.row[j[sel]]]
        if n == m:
            out[sel] = _w_equal_batch(a, b, p, per)
            continue
        if big <= _LCM_MAX:
            out[sel] = _w_equal_batch(np.repeat(a, big // n, axis=1), np.repeat(b, big // m, axis=1), p, per)
        else:
            out[sel] = [_transport_lp(_cost(x, y, p, None if per is None else per[k])) ** (1.0 / p)
                        for k, (x, y) in enumerate(zip(a, b))]
    return out


def _as_spectra_list(spectra, name: str) -> list[np.ndarray]:
    if isinstance(spectra, np.ndarray) and spectra.ndim == 2:
        spectra = list(spectra)
    if not isinstance(spectra, (list, tuple)):
        raise ValueError(f"{name} must be a list of 1-D eigenvalue arrays (or an (N, n) array)")
    return [_as_spectrum(s, f"{name}[{k}]") for k, s in enumerate(spectra)]


def pairwise_wasserstein(spectra, p: float = 1, *, imag_period=None) -> np.ndarray:
    """Symmetric matrix of W_p distances between all spectra.

    Parameters
    ----------
    spectra : list of (n_k,) complex arrays (or an (N, n) complex array)
    p : float >= 1
    imag_period : None, a float > 0, or N floats (one per spectrum, inf = none)
        Imaginary parts compared modulo the period (see :func:`wasserstein`); per pair the
        smaller of the two spectra's periods.

    Returns
    -------
    (N, N) float64, zero diagonal; only pairs i < j are computed. Values equal
    :func:`wasserstein` on each pair (to rounding).
    """
    p = _check_p(p)
    spectra = _as_spectra_list(spectra, "spectra")
    n = len(spectra)
    out = np.zeros((n, n))
    if n < 2:
        return out
    periods = _periods(imag_period, n)
    packed = _Packed(spectra)
    iu, ju = np.triu_indices(n, 1)
    vals = _pair_values(packed, iu, ju, p, periods)
    out[iu, ju] = vals
    out[ju, iu] = vals
    return out


def wasserstein_block(spectra_rows, spectra_cols, p: float = 1, *, imag_period=None) -> np.ndarray:
    """W_p distances between every row spectrum and every column spectrum.

    Parameters
    ----------
    spectra_rows : list of R (n_k,) complex arrays;  spectra_cols : list of C arrays
    imag_period : None, a float > 0, or R + C floats (rows first), as in
        :func:`pairwise_wasserstein`

    Returns
    -------
    (R, C) float64 block (no symmetry assumed).
    """
    p = _check_p(p)
    rows = _as_spectra_list(spectra_rows, "spectra_rows")
    cols = _as_spectra_list(spectra_cols, "spectra_cols")
    out = np.zeros((len(rows), len(cols)))
    if not rows or not cols:
        return out
    periods = _periods(imag_period, len(rows) + len(cols))
    packed = _Packed(rows + cols)
    i, j = np.meshgrid(np.arange(len(rows)), len(rows) + np.arange(len(cols)), indexing="ij")
    out[:] = _pair_values(packed, i.ravel(), j.ravel(), p, periods).reshape(len(rows), len(cols))
    return out
