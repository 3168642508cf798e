"""Topological conjugacy from distances between Koopman spectra.

:func:`conjugacy_test` -- permutation test over seed labels (are two conditions further
apart than seeds of one condition?); :func:`conjugacy_classes` -- hierarchical
clustering of a distance matrix, cut at a threshold, a count, or
:func:`seed_threshold` of seed-to-seed distances.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from raydyn.analysis.koopman.distances import _as_spectra_list, pairwise_wasserstein

# scipy.cluster (classes) is imported where used: Ray workers that only compute
# distances start faster without it.

__all__ = [
    "ConjugacyTestResult",
    "conjugacy_test",
    "conjugacy_classes",
    "seed_threshold",
]

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
