"""Koopman spectra of trajectories by exact DMD on a time-delay (Hankel) embedding.

:func:`spectrum` (and :func:`fit_dmd`, which keeps the SVD and reduced operator): delay
embedding of one or several trajectories, snapshot pairs formed inside each trajectory,
optional dimension reduction (lossless QR for large D, or PCA), SVD truncation by a rank
rule (numerical rank, a count, an energy fraction, or the Gavish-Donoho threshold), exact
DMD eigenvalues. Pure numpy/scipy, arrays in, arrays/dataclasses out.

Units: eigenvalues are per recorded step (discrete-time, dimensionless) unless
``continuous=True``, in which case they are rates per unit of ``dt``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from numbers import Integral, Real
from typing import Sequence, Union

import numpy as np
from scipy import optimize

from raydyn.analysis._checks import check_trajectories

# scipy.integrate (Gavish-Donoho) is imported where used: Ray workers that only compute
# distances start faster without it.

__all__ = [
    "DMDResult",
    "hankel_snapshots",
    "fit_dmd",
    "spectrum",
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
            trajectories = [trajectories]
        elif trajectories.ndim == 3:
            trajectories = list(trajectories)
        else:
            raise ValueError(
                "trajectories must be a (T, D) array, an (n_traj, T, D) array or a list of "
                f"(T_i, D) arrays; got an array of shape {trajectories.shape}"
            )
    elif not isinstance(trajectories, (list, tuple)):
        raise ValueError(
            "trajectories must be a (T, D) array, an (n_traj, T, D) array or a list of (T_i, D) "
            f"arrays; got {type(trajectories).__name__}"
        )
    return check_trajectories(
        trajectories, name="trajectories", item="trajectory {i}", dim="D", min_length=n_delays + 2,
        need=f"n_delays={n_delays} needs at least n_delays + 2 = {n_delays + 2} (one delay vector pair)",
        allow_1d=True, allow_complex=True,
    )


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
