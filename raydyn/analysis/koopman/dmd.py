"""Koopman spectra of trajectories and distances between them (topological conjugacy).

After Redman et al., "Identifying Equivalent Training Dynamics" (NeurIPS 2024): two
dynamical systems that are topologically conjugate share their Koopman eigenvalues,
so the distance between the DMD spectra of two training runs measures how far
they are from being equivalent.

Pipeline (all pure numpy/scipy, arrays in, arrays/dataclasses out):

1. :func:`spectrum` -- time-delay (Hankel) embedding of one or several trajectories,
   snapshot pairs formed inside each trajectory, exact DMD, eigenvalues.
2. :func:`wasserstein` -- optimal-transport distance between two eigenvalue sets
   (uniform point masses in the complex plane, Euclidean ground cost).
3. :func:`pairwise_wasserstein` / :func:`wasserstein_block` -- fast vectorised
   kernels for many spectra (the Ray fan-out in :mod:`raydyn.fanout` calls these).
4. :func:`conjugacy_test` -- permutation test over seed labels.
5. :func:`conjugacy_classes` -- hierarchical clustering of a distance matrix.

Units: eigenvalues are per recorded step (discrete-time, dimensionless) unless
``continuous=True``, in which case they are rates per unit of ``dt``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import Sequence, Union

import numpy as np
from scipy import optimize
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix

# scipy.integrate (Gavish-Donoho) and scipy.cluster (classes) are imported where
# used: Ray workers that only compute distances start faster without them.

__all__ = [
    "DMDResult",
    "ConjugacyTestResult",
    "hankel_snapshots",
    "fit_dmd",
    "spectrum",
    "wasserstein",
    "wasserstein_block",
    "pairwise_wasserstein",
    "conjugacy_test",
    "conjugacy_classes",
    "seed_threshold",
    "gavish_donoho_omega",
]

Rank = Union[int, float, str, None]
Precision = Union[None, str, type, np.dtype, float]

# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------


def _check_n_delays(n_delays: int) -> int:
    if isinstance(n_delays, (bool, np.bool_)) or not isinstance(n_delays, Integral) or n_delays < 0:
        raise ValueError(f"n_delays must be a non-negative integer, got {n_delays!r}")
    return int(n_delays)


def _input_eps(trajectories) -> float:
    """Unit roundoff of the given snapshots: float32's when every array is float32/complex64
    (float16's for float16), float64's otherwise (lists, ints, float64)."""
    arrays = trajectories if isinstance(trajectories, (list, tuple)) else [trajectories]
    eps = 0.0
    for x in arrays:
        dt = getattr(x, "dtype", None)
        if dt is None or not np.issubdtype(dt, np.inexact):
            eps = max(eps, float(np.finfo(np.float64).eps))
        else:
            eps = max(eps, float(np.finfo(dt).eps))
    return eps or float(np.finfo(np.float64).eps)


def _precision_eps(precision: Precision, trajectories) -> float:
    """The relative precision that sets the numerical-rank cutoff (see :func:`spectrum`)."""
    if precision is None:
        return _input_eps(trajectories)
    if isinstance(precision, (bool, np.bool_)):
        raise ValueError(f"precision must be None, a float dtype or a relative precision in (0, 1), got {precision!r}")
    if isinstance(precision, Real):
        if not 0 < float(precision) < 1:
            raise ValueError(f"precision as a number is the data's relative precision and must lie in (0, 1), "
                             f"got {precision!r}")
        return float(precision)
    try:
        dt = np.dtype(precision)
    except TypeError:
        dt = None
    if dt is None or not np.issubdtype(dt, np.inexact):
        raise ValueError(f"precision must be None, a float dtype ('float32', 'float64') or a relative precision "
                         f"in (0, 1), got {precision!r}")
    return float(np.finfo(dt).eps)


def _as_trajectories(trajectories, n_delays: int) -> list[np.ndarray]:
    """Validate and convert to a list of C-contiguous (T_i, D) float64/complex128 arrays."""
    if isinstance(trajectories, np.ndarray):
        if trajectories.ndim in (1, 2):
            trajs = [trajectories]
        elif trajectories.ndim == 3:
            trajs = list(trajectories)
        else:
            raise ValueError(
                "trajectories must be a (T, D) array, an (n_traj, T, D) array or a list of "
                f"(T_i, D) arrays; got an array of shape {trajectories.shape}"
            )
    elif isinstance(trajectories, (list, tuple)):
        trajs = list(trajectories)
    else:
        raise ValueError(
            "trajectories must be a (T, D) array, an (n_traj, T, D) array or a list of (T_i, D) "
            f"arrays; got {type(trajectories).__name__}"
        )
    if not trajs:
        raise ValueError("trajectories is empty: give at least one (T, D) array")
    out: list[np.ndarray] = []
    dim = None
    for i, x in enumerate(trajs):
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"trajectory {i} must be 2-D (T, D); got shape {x.shape}")
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
            raise ValueError(f"trajectory {i} has non-numeric dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.complex128 if np.iscomplexobj(x) else np.float64)
        if dim is None:
            dim = x.shape[1]
        elif x.shape[1] != dim:
            raise ValueError(
                f"trajectory {i} has D={x.shape[1]} features but trajectory 0 has D={dim}; "
                "all trajectories must share the state dimension"
            )
        if dim == 0:
            raise ValueError(f"trajectory {i} has zero features (shape {x.shape})")
        if x.shape[0] < n_delays + 2:
            raise ValueError(
                f"trajectory {i} has T={x.shape[0]} time steps; n_delays={n_delays} needs at "
                f"least n_delays + 2 = {n_delays + 2} (one delay vector pair)"
            )
        bad = ~np.isfinite(x)
        if bad.any():
            t, j = np.argwhere(bad)[0]
            raise ValueError(
                f"trajectory {i} contains NaN or inf values (first at time step {t}, feature {j})"
            )
        out.append(x)
    return out


# ---------------------------------------------------------------------------
# Dimension reduction (exact for large D, or PCA)
# ---------------------------------------------------------------------------


def _split(rows: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(lengths)[:-1], axis=0)


def _reduce_lossless(trajs: list[np.ndarray]) -> list[np.ndarray]:
    """Coordinates of every state in an orthonormal basis of the span of all states.

    With all states stacked as rows, ``X = R^H Q^H`` (thin QR of ``X^H``) and
    ``Q`` has orthonormal columns, so ``R^H`` (shape (sum T_i, sum T_i)) are exact
    coordinates of the data. Exact DMD eigenvalues are invariant under an
    isometric embedding, so nothing is lost; the D-sized factor ``Q`` is never
    formed. Cost O(D (sum T_i)^2), memory one copy of the data.
    """
    lengths = [x.shape[0] for x in trajs]
    stacked = np.concatenate(trajs, axis=0)
    r = np.linalg.qr(stacked.conj().T, mode="r")  # (min(D, T), T)
    return _split(np.ascontiguousarray(r.conj().T), lengths)


def _reduce_pca(trajs: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Project states on the top-k principal directions of the pooled, centred states.

    Directions come from centred data (ordinary PCA); the coordinates are the
    *uncentred* projections ``x @ W`` so that a linear system stays linear in the
    reduced coordinates (centring would add an affine offset that DMD without a
    constant observable cannot represent).
    """
    lengths = [x.shape[0] for x in trajs]
    stacked = np.concatenate(trajs, axis=0)
    n, dim = stacked.shape
    centred = stacked - stacked.mean(axis=0, keepdims=True)
    if dim > n:
        # Large D: thin QR of the centred data first, SVD of the small R factor.
        q, r = np.linalg.qr(centred.conj().T)  # q (D, n), r (n, n)
        _, _, vh = np.linalg.svd(r.conj().T, full_matrices=False)
        w = q @ vh[:k].conj().T  # (D, k)
    else:
        _, _, vh = np.linalg.svd(centred, full_matrices=False)
        w = vh[:k].conj().T
    return _split(stacked @ w, lengths)


# ---------------------------------------------------------------------------
# Hankel embedding and exact DMD
# ---------------------------------------------------------------------------


def _hankel(x: np.ndarray, d: int) -> np.ndarray:
    """(T, D) -> (T - d, D (d + 1)), row t = [x_t, x_{t+1}, ..., x_{t+d}]."""
    t = x.shape[0] - d
    return np.concatenate([x[k : k + t] for k in range(d + 1)], axis=1)


def hankel_snapshots(trajectories, n_delays: int) -> tuple[np.ndarray, np.ndarray]:
    """Snapshot matrices of the delay embedding, pairs formed inside each trajectory.

    Parameters
    ----------
    trajectories : (T, D) array, (n_traj, T, D) array or list of (T_i, D) arrays
    n_delays : int >= 0, the embedding is z_t = [x_t; x_{t+1}; ...; x_{t+d}]

    Returns
    -------
    X, Y : (D (d + 1), M) arrays with Y[:, k] the successor of X[:, k];
        M = sum_i (T_i - d - 1). No pair straddles two trajectories.
    """
    d = _check_n_delays(n_delays)
    trajs = _as_trajectories(trajectories, d)
    xs, ys = [], []
    for x in trajs:
        h = _hankel(x, d)
        xs.append(h[:-1])
        ys.append(h[1:])
    return np.concatenate(xs, axis=0).T, np.concatenate(ys, axis=0).T


@lru_cache(maxsize=256)
def _mp_median(beta: float) -> float:
    """Median of the Marchenko-Pastur distribution with aspect ratio beta in (0, 1]."""
    from scipy import integrate

    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(t: float) -> float:
        return math.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * math.pi * beta * t)

    def cdf(x: float) -> float:
        return integrate.quad(density, lo, x, limit=200)[0]

    return float(optimize.brentq(lambda x: cdf(x) - 0.5, lo, hi, xtol=1e-12))


def gavish_donoho_omega(beta: float) -> float:
    """omega(beta) of Gavish & Donoho (2014) for unknown noise level.

    The optimal hard threshold on singular values is ``omega(beta) * median(s)``
    for an m x n matrix with beta = min(m, n) / max(m, n). Computed exactly from
    the Marchenko-Pastur median (omega(1) = 2.858...), not the cubic fit.
    """
    if not 0 < beta <= 1:
        raise ValueError(f"beta must lie in (0, 1], got {beta!r}")
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))
    return lam / math.sqrt(_mp_median(float(beta)))


def _choose_rank(s: np.ndarray, shape: tuple[int, int], rank: Rank, eps: float = float(np.finfo(np.float64).eps)
                 ) -> tuple[int, int]:
    """Return (rank used, numerical rank). ``shape`` is that of the full Hankel matrix; ``eps``
    the relative precision of the snapshots (rounding noise below ``s_max max(shape) eps`` is
    not dynamics)."""
    if s.size == 0 or s[0] == 0:
        raise ValueError("the snapshot matrix is identically zero: no dynamics to fit")
    tol = s[0] * max(shape) * eps
    r_num = int(np.count_nonzero(s > tol))
    if rank is None:
        r = r_num
    elif isinstance(rank, str):
        if rank != "optimal":
            raise ValueError(f"rank must be None, an int >= 1, a float in (0, 1) or 'optimal'; got {rank!r}")
        m, n = shape
        beta = min(m, n) / max(m, n)
        # all min(m, n) singular values enter the median (zeros included).
        full = np.zeros(min(m, n))
        full[: s.size] = s
        tau = gavish_donoho_omega(beta) * float(np.median(full))
        r = max(1, int(np.count_nonzero(s > tau)))
    elif isinstance(rank, (bool, np.bool_)):
        raise ValueError(f"rank must be None, an int >= 1, a float in (0, 1) or 'optimal'; got {rank!r}")
    elif isinstance(rank, Integral):
        if rank < 1:
            raise ValueError(f"rank must be >= 1 when an int, got {rank}")
        r = int(rank)
    elif isinstance(rank, Real):
        if not 0 < rank < 1:
            raise ValueError(
                f"rank as a float is an energy fraction and must lie in (0, 1), got {rank!r}"
            )
        energy = np.cumsum(s**2) / np.sum(s**2)
        r = int(np.searchsorted(energy, rank) + 1)
    else:
        raise ValueError(f"rank must be None, an int >= 1, a float in (0, 1) or 'optimal'; got {rank!r}")
    return min(r, r_num), r_num


@dataclass(frozen=True)
class DMDResult:
    """Exact DMD of a delay-embedded trajectory set.

    Attributes
    ----------
    eigenvalues : (rank,) complex -- discrete-time eigenvalues (per recorded step),
        sorted by decreasing modulus, then by angle.
    rank : int -- number of singular values kept.
    numerical_rank : int -- singular values above ``s_max * max(shape) * eps``, ``eps`` the
        precision of the snapshots (``precision``).
    singular_values : (min(N, M),) float -- of the (possibly reduced) snapshot matrix X.
    n_features : int -- N = D' (d + 1) with D' the state dimension after ``pca``.
    n_snapshots : int -- M, number of snapshot pairs.
    reduced : str -- "none", "qr" (lossless projection for large D) or "pca".
    atilde : (rank, rank) complex -- the reduced operator U^H Y V S^-1.
    eps : float -- the relative precision used for the numerical rank.
    """

    eigenvalues: np.ndarray
    rank: int
    numerical_rank: int
    singular_values: np.ndarray
    n_features: int
    n_snapshots: int
    reduced: str
    atilde: np.ndarray
    eps: float = float(np.finfo(np.float64).eps)

    def continuous_eigenvalues(self, dt: float = 1.0) -> np.ndarray:
        """log(lambda) / dt on the principal branch (zero eigenvalues give -inf)."""
        return _to_continuous(self.eigenvalues, dt)


def _check_dt(dt: float) -> float:
    if isinstance(dt, (bool, np.bool_)) or not isinstance(dt, Real) or not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive finite number, got {dt!r}")
    return float(dt)


def _to_continuous(eigs: np.ndarray, dt: float) -> np.ndarray:
    dt = _check_dt(dt)
    with np.errstate(divide="ignore"):
        return np.log(eigs.astype(np.complex128)) / dt


def _sort_eigs(eigs: np.ndarray) -> np.ndarray:
    eigs = np.asarray(eigs, dtype=np.complex128)
    order = np.lexsort((np.angle(eigs), -np.round(np.abs(eigs), 12)))
    return eigs[order]


def fit_dmd(
    trajectories,
    n_delays: int,
    rank: Rank = None,
    *,
    pca: int | None = None,
    precision: Precision = None,
) -> DMDResult:
    """Exact DMD (Tu et al. 2014) of delay-embedded trajectories; see :func:`spectrum`."""
    d = _check_n_delays(n_delays)
    eps = _precision_eps(precision, trajectories)
    trajs = _as_trajectories(trajectories, d)
    dim = trajs[0].shape[1]
    total = sum(x.shape[0] for x in trajs)
    reduced = "none"
    if pca is not None:
        if isinstance(pca, (bool, np.bool_)) or not isinstance(pca, Integral) or not 1 <= pca <= dim:
            raise ValueError(f"pca must be None or an int in [1, D={dim}], got {pca!r}")
        trajs = _reduce_pca(trajs, int(pca))
        reduced = "pca"
    elif dim > total:
        # D (d + 1) far exceeds the number of snapshots: work in an exact orthonormal
        # basis of the data span (size <= sum T_i) instead of a D-sized SVD.
        trajs = _reduce_lossless(trajs)
        reduced = "qr"
    dim_eff = trajs[0].shape[1] if reduced == "pca" else dim
    xs, ys = [], []
    for x in trajs:
        h = _hankel(x, d)
        xs.append(h[:-1])
        ys.append(h[1:])
    x_rows = np.concatenate(xs, axis=0)  # (M, N') snapshots as rows
    y_rows = np.concatenate(ys, axis=0)
    del xs, ys
    n_snap = x_rows.shape[0]
    full_shape = (dim_eff * (d + 1), n_snap)
    # X = x_rows^T = U S V^H  <=>  x_rows = conj(V) S U^T: take the SVD of the rows directly.
    vc, s, ut = np.linalg.svd(x_rows, full_matrices=False)  # vc (M, k), ut (k, N')
    r, r_num = _choose_rank(s, full_shape, rank, eps)
    u = ut[:r].T  # (N', r) left singular vectors of X
    v = vc[:, :r].conj()  # (M, r) right singular vectors of X
    # Atilde = U^H Y V S^-1 with Y = y_rows^T
    atilde = (u.conj().T @ (y_rows.T @ v)) / s[:r][None, :]
    eigs = _sort_eigs(np.linalg.eigvals(atilde))
    return DMDResult(
        eigenvalues=eigs,
        rank=r,
        numerical_rank=r_num,
        singular_values=s,
        n_features=full_shape[0],
        n_snapshots=n_snap,
        reduced=reduced,
        atilde=atilde,
        eps=eps,
    )


def spectrum(
    trajectories,
    n_delays: int,
    rank: Rank = None,
    *,
    dt: float = 1.0,
    continuous: bool = False,
    pca: int | None = None,
    random_state=None,
    precision: Precision = None,
) -> np.ndarray:
    """Koopman eigenvalues of one system from one or several trajectories (exact DMD).

    Parameters
    ----------
    trajectories : (T, D) array, (n_traj, T, D) array, or list of (T_i, D) arrays
        Several nearby initialisations of one system; lengths may differ.
    n_delays : int >= 0
        Delay embedding z_t = [x_t; x_{t+1}; ...; x_{t+d}] (d = n_delays), built per
        trajectory; snapshot pairs (z_t, z_{t+1}) never straddle two trajectories.
    rank : None | int | float | "optimal"
        SVD truncation of the stacked snapshot matrix X (N = D (d+1) by M pairs):
        None = full numerical rank (s > s_max max(N, M) eps, eps from ``precision``);
        int = that many (capped at the numerical rank); float in (0, 1) = smallest rank
        holding that fraction of sum s^2; "optimal" = Gavish-Donoho hard threshold
        omega(beta) median(s).
    dt : float > 0
        Recording interval, used when ``continuous``.
    continuous : bool
        Return log(lambda) / dt (principal branch) instead of lambda, so distances do
        not depend on the recording interval. A zero eigenvalue maps to -inf.
    pca : int, optional
        Project states on their top-k principal directions first (see
        :func:`_reduce_pca`); otherwise, when D exceeds the number of recorded
        states, an exact orthonormal reduction (thin QR, R factor only) is used so
        no dense D-sized SVD is needed.
    random_state : ignored
        Accepted for API symmetry; every path here is deterministic.
    precision : None | dtype | float
        Relative precision of the snapshots, which sets the numerical-rank cutoff eps.
        None (default): that of the arrays given -- float32 (or complex64) arrays use
        float32's eps = 1.2e-7, float64 ones 2.2e-16; so pass snapshots as stored, not
        cast to float64 first (rounding noise of float32 weights would otherwise be kept as
        up to N spurious eigenvalues). A dtype ('float32') or a number in (0, 1) overrides it.

    Returns
    -------
    (rank,) complex128 array, sorted by decreasing modulus then angle (of lambda).
    """
    del random_state  # deterministic algorithm
    dt = _check_dt(dt)
    res = fit_dmd(trajectories, n_delays, rank, pca=pca, precision=precision)
    if continuous:
        return _to_continuous(res.eigenvalues, dt)
    return res.eigenvalues


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
_PAIR_CHUNK = 4096  # pairs whose cost matrices are materialised at once


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


def _w_equal_batch(a: np.ndarray, b: np.ndarray, p: float, period: np.ndarray | None = None) -> np.ndarray:
    """W_p for pairs of equal-size sets: a, b (P, n) -> (P,); period (P,) or None."""
    n = a.shape[1]
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
        a = packed.by_len[n][packed.row[i[sel]]]
        b = packed.by_len[m][packed.row[j[sel]]]
        per = None if pair_period is None else pair_period[sel]
        if n == m:
            out[sel] = _w_equal_batch(a, b, p, per)
            continue
        big = n * m // math.gcd(n, m)
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


# ---------------------------------------------------------------------------
# Significance: permutation test over seed labels
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConjugacyTestResult:
    """Outcome of :func:`conjugacy_test`.

    statistic : mean cross-condition distance - mean within-condition distance
    effect_size : statistic / pooled sd of the within-condition distances
        (inf if that sd is 0 and the statistic positive, nan if both are 0)
    p_value : one-sided, P(null statistic >= observed); random permutations use the
        (1 + #{>=}) / (1 + n) correction, full enumeration is exact
    mean_within, mean_cross : float
    within_a, within_b : (n_a (n_a-1)/2,), (n_b (n_b-1)/2,) seed-to-seed distances
    cross : (n_a n_b,) distances between a seed of A and a seed of B
    null : (n_null,) statistics under relabelled seeds
    exact : bool, True when every relabelling was enumerated
    distance_matrix : (n_a + n_b, n_a + n_b), A's seeds first
    p_floor : the smallest p-value this design can give: the observed labelling and, when
        n_a == n_b, its mirror image (A and B swapped: the same statistic) always count, so
        2 / C(n_a + n_b, n_a) for equal sizes, 1 / C(n_a + n_b, n_a) otherwise (and at least
        1 / (1 + n_permutations) for random relabellings). 1/3 for 2 seeds per condition,
        0.1 for 3, 0.029 for 4, 0.0079 for 5, 1.1e-5 for 10.
    """

    statistic: float
    effect_size: float
    p_value: float
    mean_within: float
    mean_cross: float
    within_a: np.ndarray
    within_b: np.ndarray
    cross: np.ndarray
    null: np.ndarray
    exact: bool
    distance_matrix: np.ndarray
    p_floor: float = 0.0

    @property
    def within(self) -> np.ndarray:
        return np.concatenate([self.within_a, self.within_b])


def _label_stats(dist: np.ndarray, labels: np.ndarray, n_a: int) -> np.ndarray:
    """Statistic for each label row; labels (L, N) float 0/1 with exactly n_a ones."""
    n = dist.shape[0]
    n_b = n - n_a
    total = dist[np.triu_indices(n, 1)].sum()
    cross = np.einsum("li,ij,lj->l", labels, dist, 1.0 - labels)
    n_within = n_a * (n_a - 1) / 2 + n_b * (n_b - 1) / 2
    return cross / (n_a * n_b) - (total - cross) / n_within


def conjugacy_test(
    spectra_a,
    spectra_b,
    n_permutations: int = 1000,
    random_state=None,
    *,
    p: float = 1,
    distance_matrix: np.ndarray | None = None,
    imag_period=None,
    alpha: float = 0.05,
) -> ConjugacyTestResult:
    """Are two conditions' Koopman spectra further apart than seeds of one condition?

    Statistic: mean W_p between a seed of A and a seed of B minus the mean W_p
    between two seeds of the same condition. Under H0 (A and B are one system,
    seeds exchangeable) the seed labels can be permuted; the p-value is one-sided.
    When the number of distinct relabellings C(n_a + n_b, n_a) is at most
    ``n_permutations`` they are all enumerated (exact test, includes the observed
    labelling); otherwise ``n_permutations`` random relabellings are drawn.

    Parameters
    ----------
    spectra_a : list of n_a >= 2 (n_k,) complex arrays, one per seed of condition A
    spectra_b : list of n_b >= 2 arrays for condition B
    n_permutations : int >= 1
    random_state : None | int | np.random.Generator
    p : Wasserstein order
    distance_matrix : optional precomputed (n_a + n_b)^2 matrix (A's seeds first),
        e.g. from :func:`raydyn.fanout.pairwise_distance_matrix`.
    imag_period : passed to :func:`pairwise_wasserstein` (2 pi / dt for continuous spectra).
    alpha : significance level the design is checked against: when even the most extreme
        outcome cannot reach it (``p_floor > alpha``, e.g. 2 seeds per condition: 1/3) a
        ``UserWarning`` says so; the result carries ``p_floor``.
    """
    a = _as_spectra_list(spectra_a, "spectra_a")
    b = _as_spectra_list(spectra_b, "spectra_b")
    n_a, n_b = len(a), len(b)
    if n_a < 2 or n_b < 2:
        raise ValueError(
            f"conjugacy_test needs at least 2 seeds per condition (within-condition distances); "
            f"got n_a={n_a}, n_b={n_b}"
        )
    if isinstance(n_permutations, (bool, np.bool_)) or not isinstance(n_permutations, Integral) or n_permutations < 1:
        raise ValueError(f"n_permutations must be an int >= 1, got {n_permutations!r}")
    n = n_a + n_b
    if distance_matrix is None:
        dist = pairwise_wasserstein(a + b, p=p, imag_period=imag_period)
    else:
        dist = _check_distance_matrix(distance_matrix)
        if dist.shape[0] != n:
            raise ValueError(f"distance_matrix is {dist.shape}, expected ({n}, {n}) for n_a + n_b spectra")
    observed_labels = np.zeros((1, n))
    observed_labels[0, :n_a] = 1.0
    stat = float(_label_stats(dist, observed_labels, n_a)[0])

    n_total = math.comb(n, n_a)
    exact = n_total <= n_permutations
    if exact:
        labels = np.zeros((n_total, n))
        for row, combo in enumerate(itertools.combinations(range(n), n_a)):
            labels[row, list(combo)] = 1.0
    else:
        rng = np.random.default_rng(random_state)
        keys = rng.random((n_permutations, n))
        labels = (np.argsort(keys, axis=1) < n_a).astype(float)
    null = np.concatenate([_label_stats(dist, labels[s : s + 4096], n_a) for s in range(0, labels.shape[0], 4096)])
    tol = 1e-12 * max(1.0, abs(stat))
    hits = int(np.count_nonzero(null >= stat - tol))
    p_value = hits / n_total if exact else (1 + hits) / (1 + n_permutations)
    floor = (2.0 if n_a == n_b else 1.0) / n_total
    if not exact:
        floor = max(floor, 1.0 / (1 + n_permutations))
    if floor > alpha:
        import warnings

        warnings.warn(
            f"conjugacy_test: with {n_a} and {n_b} seeds the smallest attainable p-value is {floor:.3g} "
            f"(> alpha = {alpha}); no outcome can be significant -- use more seeds per condition "
            f"(n = {_seeds_needed(alpha)} each reaches {alpha})",
            UserWarning,
            stacklevel=2,
        )

    ia, ib = np.arange(n_a), np.arange(n_a, n)
    within_a = dist[np.ix_(ia, ia)][np.triu_indices(n_a, 1)]
    within_b = dist[np.ix_(ib, ib)][np.triu_indices(n_b, 1)]
    cross = dist[np.ix_(ia, ib)].ravel()
    within = np.concatenate([within_a, within_b])
    resid = np.concatenate([within_a - within_a.mean(), within_b - within_b.mean()])
    dof = resid.size - 2
    sd = math.sqrt(float(resid @ resid) / dof) if dof > 0 else float("nan")
    if sd > 0:
        effect = stat / sd
    elif sd == 0:
        effect = math.copysign(math.inf, stat) if stat != 0 else float("nan")
    else:
        effect = float("nan")
    return ConjugacyTestResult(
        statistic=stat,
        effect_size=float(effect),
        p_value=float(p_value),
        mean_within=float(within.mean()),
        mean_cross=float(cross.mean()),
        within_a=within_a,
        within_b=within_b,
        cross=cross,
        null=null,
        exact=exact,
        distance_matrix=dist,
        p_floor=float(floor),
    )


def _seeds_needed(alpha: float) -> int:
    """Smallest n with 2 / C(2n, n) <= alpha (equal seeds per condition)."""
    n = 2
    while 2.0 / math.comb(2 * n, n) > alpha:
        n += 1
    return n


# ---------------------------------------------------------------------------
# Conjugacy classes by hierarchical clustering
# ---------------------------------------------------------------------------

_LINKAGES = ("single", "complete", "average", "weighted")


def _check_distance_matrix(d) -> np.ndarray:
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance_matrix must be square (N, N), got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise ValueError("distance_matrix contains NaN or inf")
    if np.any(d < 0):
        raise ValueError("distance_matrix has negative entries")
    scale = max(1.0, float(np.abs(d).max(initial=0.0)))
    if not np.allclose(d, d.T, rtol=0, atol=1e-10 * scale):
        raise ValueError("distance_matrix is not symmetric")
    if np.any(np.abs(np.diag(d)) > 1e-10 * scale):
        raise ValueError("distance_matrix must have a zero diagonal")
    return d


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.intp)
    rank[np.argsort(first)] = np.arange(first.size)
    return rank[inv]


def seed_threshold(within_distances, n_sd: float = 3.0) -> float:
    """Cut height from seed-to-seed distances of runs known to be one system: mean + n_sd SD.

    With ``n_sd = 3`` two seeds of one system fall in one class with high probability, so
    a split at this height is a separation beyond seed-to-seed variation. Needs >= 2
    distances (an SD).
    """
    w = np.asarray(within_distances, dtype=np.float64).ravel()
    if w.size < 2 or not np.all(np.isfinite(w)):
        raise ValueError(f"within_distances must hold at least 2 finite seed-to-seed distances, got {w.size}")
    return float(w.mean() + n_sd * w.std(ddof=1))


def conjugacy_classes(
    distance_matrix,
    threshold: float | str | None = None,
    n_classes: int | None = None,
    method: str = "average",
    *,
    within_distances=None,
) -> np.ndarray:
    """Group spectra into conjugacy classes by hierarchical clustering.

    Parameters
    ----------
    distance_matrix : (N, N) symmetric, zero diagonal (e.g. :func:`pairwise_wasserstein`)
    threshold : cut height: spectra whose clusters merge at linkage distance
        <= threshold share a class. ``"gap"``: cut in the middle of the largest gap
        between successive merge heights -- this always yields >= 2 classes for N >= 3,
        so use it only for data known to hold several classes.
    n_classes : alternatively, the number of classes (``maxclust``).
    method : "single" | "complete" | "average" | "weighted" (scipy linkage).
    within_distances : optional 1-D seed-to-seed distances of runs known to be the
        same system; when no threshold/n_classes is given the threshold is
        :func:`seed_threshold` of them (mean + 3 SD).

    Default (no threshold, n_classes or within_distances): **one class**. Nothing in a
    distance matrix alone says how far apart two systems must be to differ, so classes
    are only split against a scale: seed-to-seed distances, a threshold, or a count.

    Returns
    -------
    (N,) int labels 0..k-1 numbered in order of first appearance.
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import squareform

    d = _check_distance_matrix(distance_matrix)
    if method not in _LINKAGES:
        raise ValueError(f"method must be one of {_LINKAGES}, got {method!r}")
    if threshold is not None and n_classes is not None:
        raise ValueError("give threshold or n_classes, not both")
    n = d.shape[0]
    if n_classes is not None:
        if isinstance(n_classes, (bool, np.bool_)) or not isinstance(n_classes, Integral) or not 1 <= n_classes <= n:
            raise ValueError(f"n_classes must be an int in [1, N={n}], got {n_classes!r}")
    gap = isinstance(threshold, str)
    if gap and threshold != "gap":
        raise ValueError(f"threshold must be a finite number >= 0 or 'gap', got {threshold!r}")
    if threshold is not None and not gap:
        if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, Real) or not np.isfinite(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a finite number >= 0 or 'gap', got {threshold!r}")
    if n == 1:
        return np.zeros(1, dtype=np.intp)
    if threshold is None and n_classes is None and within_distances is None:
        return np.zeros(n, dtype=np.intp)
    z = hierarchy.linkage(squareform(d, checks=False), method=method)
    if n_classes is not None:
        labels = hierarchy.fcluster(z, n_classes, criterion="maxclust")
        return _first_appearance(labels)
    if threshold is None:
        threshold = seed_threshold(within_distances)
    elif gap:
        if n <= 2:
            return np.zeros(n, dtype=np.intp)
        h = np.sort(z[:, 2])
        gaps = np.diff(h)
        k = int(np.argmax(gaps))
        threshold = float((h[k] + h[k + 1]) / 2)
    labels = hierarchy.fcluster(z, threshold, criterion="distance")
    return _first_appearance(labels)
