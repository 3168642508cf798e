"""Correlation Mode Decomposition (CMD) of a weight trajectory.

CMD (Turjeman, Berkov, Cohen & Gilboa 2022, "Enhancing neural training via a
correlated dynamics model"; online variant Brokman et al., ICLR 2024) models the
trajectories of the N parameters of a network during training by a handful of
*modes*.  Every mode ``m`` owns a reference trajectory ``r_m(t)`` -- the recorded
trajectory of one real parameter -- and every parameter ``i`` is an affine copy of
the reference of the mode it belongs to::

    w_i(t) ~= a_i * r_{m(i)}(t) + b_i            for all recorded steps t

Post-hoc CMD (:func:`decompose`):

1. sample K parameters (uniformly, or balanced across layers);
2. |Pearson correlation| over time among the sample (a constant parameter has
   correlation 0 with everything);
3. agglomerative clustering of the sample (scipy, average linkage, distance
   ``1 - |corr|``) into M clusters; the reference of a cluster is the member with
   the highest mean |corr| to its cluster;
4. every parameter joins the mode whose reference it correlates with most (|corr|);
5. closed-form least squares for ``(a_i, b_i)``.

With ``n_modes=None`` M is the smallest value in ``1..min(K, 50)`` whose relative
reconstruction error ``||W - W_hat||_F / ||W||_F`` is below ``tolerance``.  The
error-vs-M curve is exact and cheap: clusterings for different M are cuts of one
dendrogram, so at most ``2*M - 1`` distinct references exist for M = 1..M, and the
least-squares residual of parameter ``i`` against reference ``r`` is
``||w_i - mean(w_i)||^2 * (1 - corr(w_i, r)^2)``.  M is searched upwards in blocks
(1..8, 9..16, 17..32, 33..50), one pass over the weights per block, stopping after
the first block that reaches the tolerance.

Online CMD (:class:`OnlineCMD`) fixes modes, assignment and reference parameters on a
warm-up window and afterwards keeps only O(N) running sums, from which ``(a, b)`` over
all steps seen follow in closed form.

Memory: ``weights`` may be a float32 ``(N, T)`` array (or memmap) with N ~ 1e6; it is
never converted to float64 as a whole, every pass works on row chunks of about
``2**23`` elements (64 MiB of float64).

Pure math: no Ray, no files, no plotting.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.spatial.distance import squareform

__all__ = [
    "CMDResult",
    "OnlineCMD",
    "decompose",
    "fit_fixed_modes",
    "reconstruction_trajectory",
    "evaluate_reconstruction",
]

#: Largest number of modes the automatic choice (``n_modes=None``) considers.
MAX_AUTO_MODES = 50
#: Elements (rows * T) per chunk of float64 work: 2**23 elements = 64 MiB.
_CHUNK_ELEMENTS = 1 << 23

_SAMPLINGS = ("balanced", "uniform")


# --------------------------------------------------------------------------- result


@dataclass(frozen=True, eq=False)
class CMDResult:
    """A fitted CMD model of a weight trajectory of N parameters over T recorded steps.

    Attributes
    ----------
    references : (M, T) float64
        Reference trajectory of every mode (the recorded trajectory of parameter
        ``reference_index[m]``), in the units of the weights.
    reference_index : (M,) int64
        Flat parameter index of each mode's reference parameter.
    assignment : (N,) int64
        Mode of every parameter, in ``0..M-1``.
    a, b : (N,) float64
        Affine coefficients: ``w_i(t) ~= a_i * references[assignment[i], t] + b_i``.
        A constant parameter has ``a_i = 0`` and ``b_i`` equal to its value.
    error : float
        Relative reconstruction error ``||W - W_hat||_F / ||W||_F`` over all N x T
        entries (0 if ``W`` is all zeros).
    layer_errors : dict[str, float]
        The same relative error restricted to each layer's rows, keyed by layer name.
    error_curve_modes, error_curve : (L,) int64, (L,) float64
        Relative error for each number of modes that was evaluated (``1..M_max`` for
        the automatic choice; just the fitted M otherwise).
    layer_index : (N,) int32
        Layer of every parameter as an index into ``layer_names``.
    layer_names : tuple[str, ...]
        Layer names (``("all",)`` when no layers were given).
    sample_index : (K,) int64
        Parameters that were sampled for the clustering (empty if none was done).
    """

    references: np.ndarray
    reference_index: np.ndarray
    assignment: np.ndarray
    a: np.ndarray
    b: np.ndarray
    error: float
    layer_errors: dict[str, float]
    error_curve_modes: np.ndarray
    error_curve: np.ndarray
    layer_index: np.ndarray
    layer_names: tuple[str, ...]
    sample_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_modes(self) -> int:
        """Number of modes M."""
        return int(self.references.shape[0])

    @property
    def n_params(self) -> int:
        """Number of parameters N."""
        return int(self.a.shape[0])

    @property
    def n_steps(self) -> int:
        """Number of recorded steps T."""
        return int(self.references.shape[1])

    def reconstruct(self, steps: Sequence[int] | np.ndarray | slice | None = None,
                    dtype: Any = np.float64) -> np.ndarray:
        """Reconstructed weights ``W_hat`` at the given recorded-step indices.

        Parameters
        ----------
        steps : indices into ``0..T-1`` (negative allowed), a slice, or None for all T.
        dtype : dtype of the output (float64 default; float32 halves the memory).

        Returns
        -------
        (N, S) array, S = number of selected steps.  Memory is N * S * itemsize.
        """
        if steps is None:
            steps = slice(None)
        refs = self.references[:, steps]
        if refs.ndim == 1:  # a single integer index
            refs = refs[:, None]
        out = refs[self.assignment].astype(dtype, copy=False)
        out *= self.a[:, None].astype(dtype, copy=False)
        out += self.b[:, None].astype(dtype, copy=False)
        return out

    def reconstruct_at(self, t_index: int) -> np.ndarray:
        """Reconstructed flat weight vector ``(N,)`` float64 at recorded step ``t_index``."""
        t = _check_step_index(t_index, self.n_steps)
        return self.a * self.references[self.assignment, t] + self.b

    def layer_mode_fractions(self) -> np.ndarray:
        """``(L, M)`` fraction of each layer's parameters that belong to each mode (rows sum to 1)."""
        n_layers = len(self.layer_names)
        counts = np.zeros((n_layers, self.n_modes), dtype=np.float64)
        np.add.at(counts, (self.layer_index, self.assignment), 1.0)
        sizes = counts.sum(axis=1, keepdims=True)
        return np.divide(counts, sizes, out=np.zeros_like(counts), where=sizes > 0)


# ----------------------------------------------------------------------- validation


def _check_step_index(t_index: int, n_steps: int) -> int:
    if isinstance(t_index, bool) or not isinstance(t_index, (int, np.integer)):
        raise ValueError(f"t_index must be an integer step index, got {t_index!r}")
    t = int(t_index)
    if not -n_steps <= t < n_steps:
        raise ValueError(f"t_index={t} is out of range for T={n_steps} recorded steps")
    return t % n_steps


def _as_weights(weights: Any) -> np.ndarray:
    """Validate the (N, T) weight array without copying it."""
    w = weights if isinstance(weights, np.ndarray) else np.asarray(weights)
    if w.ndim != 2:
        raise ValueError(
            f"weights must be a 2-D array (N parameters, T recorded steps), got shape {w.shape}"
        )
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"weights must be real-valued (float or int), got dtype {w.dtype}")
    n, t = w.shape
    if n < 1:
        raise ValueError("weights has no parameters (N=0 rows)")
    if t < 3:
        raise ValueError(f"weights needs at least T=3 recorded steps (columns), got T={t}")
    return w


def _check_n_modes(n_modes: Any) -> int | None:
    if n_modes is None:
        return None
    if isinstance(n_modes, bool) or not isinstance(n_modes, (int, np.integer)) or n_modes < 1:
        raise ValueError(f"n_modes must be None (automatic) or a positive integer, got {n_modes!r}")
    return int(n_modes)


def _check_tolerance(tolerance: Any) -> float:
    try:
        tol = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance must be a number in (0, 1], got {tolerance!r}") from None
    if not 0.0 < tol <= 1.0:
        raise ValueError(f"tolerance must be in (0, 1] (a relative Frobenius error), got {tol}")
    return tol


def _check_n_samples(n_samples: Any) -> int:
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    return int(n_samples)


def _check_sampling(sampling: Any) -> str:
    if sampling not in _SAMPLINGS:
        raise ValueError(f"sampling must be one of {_SAMPLINGS}, got {sampling!r}")
    return str(sampling)


def _parse_layers(layers: Any, n: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """``layers`` -> ``(layer_index (N,) int32, layer_names)``.

    Accepts None (one layer "all"), an (N,) integer array of layer labels (names are
    ``str(label)``, in sorted label order), or a list of ``(name, start, stop)``
    slices that cover ``0..N`` exactly without overlap.
    """
    if layers is None:
        return np.zeros(n, dtype=np.int32), ("all",)
    if isinstance(layers, np.ndarray) or (
        isinstance(layers, Sequence) and len(layers) > 0
        and not isinstance(layers[0], (tuple, list))
    ):
        lab = np.asarray(layers)
        if lab.shape != (n,) or not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(
                f"layers as an array must be an (N,)=({n},) integer array of layer labels, "
                f"got shape {lab.shape} dtype {lab.dtype}"
            )
        uniq, inv = np.unique(lab, return_inverse=True)
        return inv.astype(np.int32), tuple(str(int(u)) for u in uniq)
    if not isinstance(layers, Sequence) or len(layers) == 0:
        raise ValueError(
            "layers must be None, an (N,) integer array, or a non-empty list of "
            f"(name, start, stop) slices; got {type(layers).__name__}"
        )
    spans = []
    for k, item in enumerate(layers):
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise ValueError(f"layers[{k}] must be a (name, start, stop) triple, got {item!r}")
        name, start, stop = item
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (start, stop)):
            raise ValueError(f"layers[{k}] start/stop must be integers, got {item!r}")
        if not 0 <= start < stop <= n:
            raise ValueError(f"layers[{k}]={item!r}: need 0 <= start < stop <= N={n}")
        spans.append((int(start), int(stop), str(name), k))
    spans.sort()
    names = [s[2] for s in spans]
    if len(set(names)) != len(names):
        raise ValueError(f"layers has duplicate names: {sorted(names)}")
    pos = 0
    codes = np.empty(n, dtype=np.int32)
    for code, (start, stop, name, k) in enumerate(spans):
        if start != pos:
            what = "overlaps the previous layer" if start < pos else f"leaves a gap [{pos}, {start})"
            raise ValueError(f"layers[{k}]=({name!r}, {start}, {stop}) {what}; slices must tile 0..N")
        codes[start:stop] = code
        pos = stop
    if pos != n:
        raise ValueError(f"layers cover parameters 0..{pos} but N={n}; slices must tile 0..N")
    return codes, tuple(names)


def _rng(random_state: Any) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or (isinstance(random_state, (int, np.integer)) and not isinstance(random_state, bool)):
        return np.random.default_rng(random_state)
    raise ValueError(f"random_state must be None, an int or a numpy Generator, got {random_state!r}")


# ------------------------------------------------------------------- chunked passes


def _chunks(n: int, t: int) -> Iterator[tuple[int, int]]:
    rows = max(1, _CHUNK_ELEMENTS // max(t, 1))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


@dataclass
class _RowStats:
    mean: np.ndarray  # (N,) float64
    css: np.ndarray  # (N,) centred sum of squares over time
    sumsq: np.ndarray  # (N,) uncentred sum of squares
    const: np.ndarray  # (N,) bool, exactly constant rows


def _row_stats(w: np.ndarray) -> _RowStats:
    """One chunked pass: finiteness check, per-row mean / centred & raw sums of squares."""
    n, t = w.shape
    mean = np.empty(n)
    css = np.empty(n)
    sumsq = np.empty(n)
    const = np.empty(n, dtype=bool)
    for s, e in _chunks(n, t):
        x = np.asarray(w[s:e], dtype=np.float64)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = s + int(np.argmin(finite))
            raise ValueError(
                f"weights row {bad} (first offending parameter) contains NaN or inf"
            )
        m = x.mean(axis=1)
        xc = x - m[:, None]
        is_const = (x == x[:, :1]).all(axis=1)
        m[is_const] = x[is_const, 0]  # exact value, not a rounded mean: b is then exact
        mean[s:e] = m
        css[s:e] = np.einsum("ij,ij->i", xc, xc)
        sumsq[s:e] = np.einsum("ij,ij->i", x, x)
        const[s:e] = is_const
    css[const] = 0.0
    return _RowStats(mean, css, sumsq, const)


def _inv_norm(css: np.ndarray, const: np.ndarray) -> np.ndarray:
    """``1 / ||x_c||`` per row; 0 for constant rows (their correlation is 0, never NaN)."""
    scale = np.zeros_like(css)
    ok = ~const & (css > 0)
    scale[ok] = 1.0 / np.sqrt(css[ok])
    return scale


def _centred(w: np.ndarray, s: int, e: int, mean: np.ndarray) -> np.ndarray:
    """Rows ``s:e`` as a fresh float64 array, centred in place (one allocation)."""
    xc = np.array(w[s:e], dtype=np.float64)
    xc -= mean[s:e, None]
    return xc


def _normalise(x: np.ndarray, mean: np.ndarray, css: np.ndarray, const: np.ndarray) -> np.ndarray:
    """Rows centred and scaled to unit norm, so that ``Z @ Z.T`` is the Pearson correlation.

    Constant rows become exactly zero (correlation 0 with everything, never NaN).
    """
    z = x - mean[:, None]
    z *= _inv_norm(css, const)[:, None]
    return z


# ------------------------------------------------------------------------- sampling


def _sample(layer_index: np.ndarray, n_layers: int, eligible: np.ndarray, k: int,
            sampling: str, rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of at most ``k`` eligible parameters.

    "uniform": uniformly without replacement.  "balanced" (the paper's U_B scheme):
    half of the budget is split equally over the layers (capped by layer size), half
    in proportion to layer size, and what is left goes to layers with room to spare,
    so that small layers (biases) are represented.
    """
    pool = np.flatnonzero(eligible)
    if k >= pool.size:
        return pool
    if sampling == "uniform" or n_layers == 1:
        return np.sort(rng.choice(pool, size=k, replace=False))
    avail = np.bincount(layer_index[pool], minlength=n_layers).astype(np.int64)
    nonempty = int((avail > 0).sum())
    take = np.minimum(avail, k // (2 * nonempty))
    prop = np.floor(avail / avail.sum() * (k / 2)).astype(np.int64)
    take = take + np.minimum(prop, avail - take)
    left = k - int(take.sum())
    while left > 0:  # hand out the rest one by one to the layers with most room
        room = avail - take
        order = np.argsort(-room, kind="stable")
        for layer in order:
            if left == 0 or room[layer] == 0:
                break
            take[layer] += 1
            left -= 1
    chosen = []
    for layer in range(n_layers):
        if take[layer]:
            members = pool[layer_index[pool] == layer]
            chosen.append(rng.choice(members, size=int(take[layer]), replace=False))
    return np.sort(np.concatenate(chosen))


# ----------------------------------------------------------------------- clustering


def _cluster_candidates(z_sample: np.ndarray, max_modes: int
                        ) -> tuple[list[list[int]], np.ndarray]:
    """Cut the average-linkage dendrogram of the sample into 1..max_modes clusters.

    Returns ``(modes_for_m, candidate_ref)``: ``modes_for_m[M-1]`` lists, for the cut
    into M clusters, the candidate id of each mode (modes ordered by cluster size,
    largest first); ``candidate_ref[c]`` is the position in the sample of candidate
    ``c``'s reference (member with the highest mean |corr| to its cluster).
    """
    k = z_sample.shape[0]
    abs_corr = np.abs(z_sample @ z_sample.T)
    np.fill_diagonal(abs_corr, 1.0)
    if k == 1:
        return [[0]], np.zeros(1, dtype=np.int64)
    dist = np.clip(1.0 - abs_corr, 0.0, 1.0)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    tree = linkage(squareform(dist, checks=False), method="average")
    # (K, max_modes). The cut into K clusters (every member alone) is written by hand: scipy 1.17's
    # cut_tree, asked for a list of cuts that includes K, returns all zeros for that one
    upto = min(max_modes, k - 1)
    cuts = cut_tree(tree, n_clusters=list(range(1, upto + 1))) if upto >= 1 else np.zeros((k, 0), dtype=np.int64)
    if max_modes >= k:
        cuts = np.concatenate([cuts, np.arange(k)[:, None]], axis=1)
    cand_of_members: dict[bytes, int] = {}
    cand_ref: list[int] = []
    modes_for_m: list[list[int]] = []
    for m in range(1, max_modes + 1):
        labels = cuts[:, m - 1]
        groups = [np.flatnonzero(labels == lab) for lab in np.unique(labels)]
        if len(groups) != m:  # cut_tree guarantees this for monotone linkages
            raise RuntimeError(f"dendrogram cut gave {len(groups)} clusters instead of {m}")
        groups.sort(key=lambda g: (-g.size, int(g[0])))
        ids = []
        for g in groups:
            key = g.tobytes()
            if key not in cand_of_members:
                within = abs_corr[np.ix_(g, g)].mean(axis=1)
                cand_of_members[key] = len(cand_ref)
                cand_ref.append(int(g[int(np.argmax(within))]))
            ids.append(cand_of_members[key])
        modes_for_m.append(ids)
    return modes_for_m, np.asarray(cand_ref, dtype=np.int64)


def _ref_rows(w: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.asarray(w[np.asarray(idx, dtype=np.int64)], dtype=np.float64)


def _error_curve(w: np.ndarray, stats: _RowStats, z_cand: np.ndarray,
                 modes_for_m: list[list[int]], m_lo: int, m_hi: int) -> np.ndarray:
    """Exact relative error for M = m_lo..m_hi from correlations with candidate references.

    The residual of row i fitted to reference r is ``css_i * (1 - corr(i, r)^2)``, so the
    error for M modes needs only ``max_{r in S_M} |corr(i, r)|``.  Consecutive cuts of a
    dendrogram differ by one split (S_{M+1} = S_M - {parent} + {children}), so the
    running maximum is updated with the children, and recomputed over S_{M+1} only for
    the rows whose best reference was the removed parent.  One chunked pass over W;
    correlations only with the candidates used by some M in the range.
    """
    n, t = w.shape
    sets = modes_for_m[m_lo - 1:m_hi]
    used = sorted({c for cur in sets for c in cur})
    col = {c: j for j, c in enumerate(used)}  # candidate id -> row of corr
    sets = [np.asarray([col[c] for c in cur]) for cur in sets]
    z_used = z_cand[used]
    sse = np.zeros(len(sets))
    for s, e in _chunks(n, t):
        z = _centred(w, s, e, stats.mean)
        z *= _inv_norm(stats.css[s:e], stats.const[s:e])[:, None]
        corr = np.abs(z_used @ z.T)  # (n_used, rows), contiguous per candidate
        del z
        css = stats.css[s:e]
        prev = sets[0]
        best = corr[prev].max(axis=0)
        arg = prev[corr[prev].argmax(axis=0)]
        sse[0] += float(np.dot(css, np.clip(1.0 - best * best, 0.0, None)))
        for m in range(1, len(sets)):
            cur = sets[m]
            removed = np.setdiff1d(prev, cur)
            added = np.setdiff1d(cur, prev)
            if removed.size:
                rows = np.flatnonzero(np.isin(arg, removed))
                if rows.size:
                    sub = corr[np.ix_(cur, rows)]
                    j = sub.argmax(axis=0)
                    best[rows] = sub[j, np.arange(rows.size)]
                    arg[rows] = cur[j]
            for c in added:
                better = corr[c] > best
                np.copyto(arg, c, where=better)
                np.maximum(best, corr[c], out=best)
            sse[m] += float(np.dot(css, np.clip(1.0 - best * best, 0.0, None)))
            prev = cur
    total = float(stats.sumsq.sum())
    return np.sqrt(sse / total) if total > 0 else np.zeros_like(sse)


def _fit(w: np.ndarray, stats: _RowStats, reference_index: np.ndarray,
         assignment: np.ndarray | None, layer_index: np.ndarray,
         layer_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                 float, dict[str, float]]:
    """Assign (if needed), fit (a, b) in closed form, and measure the error directly."""
    n, t = w.shape
    refs = _ref_rows(w, reference_index)  # (M, T)
    r_mean = refs.mean(axis=1)
    rc = refs - r_mean[:, None]
    r_css = np.einsum("ij,ij->i", rc, rc)
    r_const = (refs == refs[:, :1]).all(axis=1)
    r_css[r_const] = 0.0
    z_ref = _normalise(refs, r_mean, r_css, r_const)
    r_norm = np.sqrt(r_css)

    out_assign = np.empty(n, dtype=np.int64) if assignment is None else assignment
    a = np.empty(n)
    b = np.empty(n)
    layer_sse = np.zeros(len(layer_names))
    for s, e in _chunks(n, t):
        xc = _centred(w, s, e, stats.mean)
        inv = _inv_norm(stats.css[s:e], stats.const[s:e])
        corr = (xc @ z_ref.T) * inv[:, None]  # (rows, M) Pearson correlations
        if assignment is None:
            out_assign[s:e] = np.argmax(np.abs(corr), axis=1)
        mode = out_assign[s:e]
        rho = corr[np.arange(e - s), mode]
        # a = <x_c, r_c> / ||r_c||^2 = rho * ||x_c|| / ||r_c||; 0 for a constant reference.
        rn = r_norm[mode]
        ai = np.divide(rho * np.sqrt(stats.css[s:e]), rn, out=np.zeros(e - s), where=rn > 0)
        a[s:e] = ai
        b[s:e] = stats.mean[s:e] - ai * r_mean[mode]
        # residual x - (a r + b) = x_c - a r_c, formed in place in xc
        fitted = rc[mode]
        fitted *= ai[:, None]
        xc -= fitted
        del fitted
        row_sse = np.einsum("ij,ij->i", xc, xc)
        layer_sse += np.bincount(layer_index[s:e], weights=row_sse, minlength=len(layer_names))
    layer_sq = np.bincount(layer_index, weights=stats.sumsq, minlength=len(layer_names))
    total_sq = float(layer_sq.sum())
    error = float(np.sqrt(layer_sse.sum() / total_sq)) if total_sq > 0 else 0.0
    layer_errors = {
        name: (float(np.sqrt(layer_sse[k] / layer_sq[k])) if layer_sq[k] > 0 else 0.0)
        for k, name in enumerate(layer_names)
    }
    return refs, out_assign, a, b, error, layer_errors


# ------------------------------------------------------------------------ post-hoc


def decompose(weights: np.ndarray, n_modes: int | None = None, tolerance: float = 0.01,
              n_samples: int = 1000, random_state: int | np.random.Generator | None = None,
              *, layers: Any = None, sampling: str = "balanced") -> CMDResult:
    """Post-hoc Correlation Mode Decomposition of a recorded weight trajectory.

    Parameters
    ----------
    weights : (N, T) array, float32 or float64
        Parameter ``i`` at recorded step ``t`` (e.g. ``parameters_to_vector`` of the
        model at each recorded step, as columns).  Never copied whole: the work is done
        in float64 row chunks of ~64 MiB.
    n_modes : int or None
        Number of modes M; None chooses the smallest M in ``1..min(K, 50)`` whose
        relative error is below ``tolerance`` (the exact error for every M searched --
        up to the end of the block of M values where the tolerance was first met, see
        the module docstring -- is recorded in ``error_curve``; if no M reaches it, the
        M with the smallest error is used and a ``RuntimeWarning`` is issued).
    tolerance : float in (0, 1]
        Target relative Frobenius error ``||W - W_hat|| / ||W||`` for the automatic choice.
    n_samples : int
        K, the number of parameters sampled for the clustering.  Only non-constant
        parameters are sampled (a constant parameter is reproduced exactly by any mode).
    random_state : None, int or numpy Generator
        Seed of the sampling.
    layers : None, (N,) int array of layer labels, or list of (name, start, stop)
        Layer of each parameter: used for layer-balanced sampling and ``layer_errors``.
    sampling : "balanced" or "uniform"
        How the K parameters are drawn ("balanced" equals "uniform" with one layer).

    Returns
    -------
    CMDResult

    Notes
    -----
    Cost: two or three chunked passes over ``weights`` (statistics; the error curve,
    one pass per block of M; the final fit), each O(N * T * R) with R the number of
    references involved (<= 2M - 1), plus O(K^2) memory and time for the clustering.
    The error is relative to ``||W||_F``, which includes the weights' static part; for
    weights far from zero even M = 1 can give a small error.
    """
    w = _as_weights(weights)
    n_modes = _check_n_modes(n_modes)
    tol = _check_tolerance(tolerance)
    k = _check_n_samples(n_samples)
    sampling = _check_sampling(sampling)
    rng = _rng(random_state)
    layer_index, layer_names = _parse_layers(layers, w.shape[0])

    stats = _row_stats(w)
    sample = _sample(layer_index, len(layer_names), ~stats.const, k, sampling, rng)

    if sample.size == 0:  # every parameter is constant: one (constant) mode reproduces W exactly
        if n_modes not in (None, 1):
            raise ValueError(f"n_modes={n_modes} but all parameters are constant: only 1 mode exists")
        ref_index = np.zeros(1, dtype=np.int64)
        refs, assign, a, b, err, lerr = _fit(w, stats, ref_index, None, layer_index, layer_names)
        return CMDResult(refs, ref_index, assign, a, b, err, lerr, np.array([1]), np.array([err]),
                         layer_index, layer_names, sample)

    if n_modes is not None and n_modes > sample.size:
        raise ValueError(
            f"n_modes={n_modes} exceeds the {sample.size} sampled non-constant parameters; "
            "raise n_samples or lower n_modes"
        )
    max_modes = n_modes if n_modes is not None else min(sample.size, MAX_AUTO_MODES)
    x_sample = _ref_rows(w, sample)
    z_sample = _normalise(x_sample, stats.mean[sample], stats.css[sample], stats.const[sample])
    modes_for_m, cand_ref = _cluster_candidates(z_sample, max_modes)

    if n_modes is None:
        cand_index = sample[cand_ref]
        z_cand = _normalise(_ref_rows(w, cand_index), stats.mean[cand_index],
                            stats.css[cand_index], stats.const[cand_index])
        # Increasing search in blocks of M (1..8, 9..16, 17..32, 33..50): one pass over W
        # per block, stopping at the first block that reaches the tolerance.
        curve = np.zeros(0)
        lo = 1
        while lo <= max_modes:
            hi = min(max_modes, max(8, 2 * (lo - 1)))
            curve = np.concatenate([curve, _error_curve(w, stats, z_cand, modes_for_m, lo, hi)])
            if (curve < tol).any():
                break
            lo = hi + 1
        curve_modes = np.arange(1, curve.size + 1)
        below = np.flatnonzero(curve < tol)
        if below.size:
            chosen = int(below[0]) + 1
        else:
            chosen = int(np.argmin(curve)) + 1
            warnings.warn(
                f"CMD: no number of modes in 1..{max_modes} reaches tolerance={tol:g} "
                f"(best error {curve.min():.3g} at M={chosen}); using M={chosen}",
                RuntimeWarning, stacklevel=2)
    else:
        chosen = n_modes
    ref_index = sample[cand_ref[modes_for_m[chosen - 1]]]
    refs, assign, a, b, err, lerr = _fit(w, stats, ref_index, None, layer_index, layer_names)
    if n_modes is not None:
        curve_modes, curve = np.array([chosen]), np.array([err])
    return CMDResult(refs, ref_index.astype(np.int64), assign, a, b, err, lerr,
                     curve_modes.astype(np.int64), np.asarray(curve, dtype=np.float64),
                     layer_index, layer_names, sample.astype(np.int64))


def fit_fixed_modes(weights: np.ndarray, reference_index: Sequence[int] | np.ndarray,
                    assignment: Sequence[int] | np.ndarray | None = None, *,
                    layers: Any = None) -> CMDResult:
    """CMD with given reference parameters (and optionally a given assignment).

    Parameters
    ----------
    weights : (N, T) array
    reference_index : (M,) flat indices of the reference parameters.
    assignment : (N,) modes in ``0..M-1``, or None to assign by highest |corr|.
    layers : as in :func:`decompose`.

    This is the post-hoc counterpart of :class:`OnlineCMD`: with the online object's
    ``reference_index_`` and ``assignment_`` it gives the same result.
    """
    w = _as_weights(weights)
    n = w.shape[0]
    ref_index = np.asarray(reference_index)
    if ref_index.ndim != 1 or ref_index.size == 0 or not np.issubdtype(ref_index.dtype, np.integer):
        raise ValueError(f"reference_index must be a non-empty 1-D integer array, got {reference_index!r}")
    if ref_index.min() < 0 or ref_index.max() >= n:
        raise ValueError(f"reference_index entries must lie in 0..{n - 1}, got {ref_index.tolist()}")
    ref_index = ref_index.astype(np.int64)
    if assignment is not None:
        assign = np.asarray(assignment)
        if assign.shape != (n,) or not np.issubdtype(assign.dtype, np.integer):
            raise ValueError(f"assignment must be an (N,)=({n},) integer array, got shape {assign.shape}")
        if assign.min() < 0 or assign.max() >= ref_index.size:
            raise ValueError(f"assignment entries must lie in 0..{ref_index.size - 1}")
        assign = assign.astype(np.int64)
    else:
        assign = None
    layer_index, layer_names = _parse_layers(layers, n)
    stats = _row_stats(w)
    refs, assign, a, b, err, lerr = _fit(w, stats, ref_index, assign, layer_index, layer_names)
    return CMDResult(refs, ref_index, assign, a, b, err, lerr, np.array([ref_index.size]),
                     np.array([err]), layer_index, layer_names)


# -------------------------------------------------------------------------- online


class OnlineCMD:
    """Online CMD: modes from a warm-up window, then O(N) running least squares.

    Call :meth:`update` with the flat ``(N,)`` weight vector at every recorded step.
    The first ``warmup`` vectors are buffered (O(N * warmup) memory, released
    afterwards); then post-hoc :func:`decompose` on that window fixes the modes, the
    assignment and the reference parameters.  From then on the object keeps only

    * per parameter: the shift ``c_i`` (its first recorded value) and the running sums
      ``S_x, S_xx, S_xy`` of ``x = w_i - c_i`` and ``y = r_m - c_ref`` (O(N), fixed);
    * per mode: ``S_y, S_yy`` and the reference trajectory ``r_m(t)`` -- the current
      value of the reference parameter, appended at every step.  These M trajectories,
      O(M * T), are the only state that grows with the number of steps.

    :meth:`result` solves the 2x2 normal equations of every parameter in closed form
    and equals :func:`fit_fixed_modes` with ``reference_index_`` and ``assignment_`` on
    the full trajectory (up to float64 rounding).

    Parameters are those of :func:`decompose`; ``warmup`` (>= 3) is the number of
    recorded steps used to find the modes.

    Fitted attributes (after warm-up): ``n_modes_``, ``reference_index_`` (M,),
    ``assignment_`` (N,), ``warmup_result_`` (the :class:`CMDResult` of the warm-up
    window), ``n_steps_`` (records seen).
    """

    def __init__(self, n_modes: int | None = None, tolerance: float = 0.01, warmup: int = 20,
                 n_samples: int = 1000, random_state: int | np.random.Generator | None = None,
                 *, layers: Any = None, sampling: str = "balanced") -> None:
        self.n_modes = n_modes
        self.tolerance = tolerance
        self.warmup = warmup
        self.n_samples = n_samples
        self.random_state = random_state
        self.layers = layers
        self.sampling = sampling
        self.n_steps_ = 0
        self._buffer: list[np.ndarray] | None = []
        self._n_params: int | None = None

    # -- state ---------------------------------------------------------------
    @property
    def is_warm(self) -> bool:
        """True once the warm-up window has been decomposed."""
        return self._buffer is None

    def _check_params(self) -> None:
        _check_n_modes(self.n_modes)
        _check_tolerance(self.tolerance)
        _check_n_samples(self.n_samples)
        _check_sampling(self.sampling)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, np.integer)) or self.warmup < 3:
            raise ValueError(f"warmup must be an integer >= 3 (recorded steps), got {self.warmup!r}")

    def update(self, w: Any) -> OnlineCMD:
        """Record the flat weight vector ``w`` (N,) of the next recorded step; returns self."""
        if self.n_steps_ == 0:
            self._check_params()
        vec = np.asarray(w)
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(f"update expects a flat (N,) weight vector, got shape {vec.shape}")
        if self._n_params is None:
            self._n_params = vec.shape[0]
        elif vec.shape[0] != self._n_params:
            raise ValueError(
                f"update got {vec.shape[0]} parameters at record {self.n_steps_}, "
                f"expected N={self._n_params} as before"
            )
        finite = np.isfinite(vec)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise ValueError(f"weight vector at record {self.n_steps_} has NaN or inf at parameter {bad}")
        self.n_steps_ += 1
        if self._buffer is not None:
            self._buffer.append(np.array(vec, copy=True))
            if len(self._buffer) == int(self.warmup):
                self._start()
        else:
            self._accumulate(vec)
        return self

    def _start(self) -> None:
        window = np.stack(self._buffer, axis=1)  # (N, warmup)
        self._buffer = None
        res = decompose(window, self.n_modes, self.tolerance, self.n_samples, self.random_state,
                        layers=self.layers, sampling=self.sampling)
        self.warmup_result_ = res
        self.n_modes_ = res.n_modes
        self.reference_index_ = res.reference_index
        self.assignment_ = res.assignment
        self._layer_index, self._layer_names = res.layer_index, res.layer_names
        n = window.shape[0]
        m = res.n_modes
        self._shift = np.asarray(window[:, 0], dtype=np.float64).copy()  # c_i
        self._ref_shift = self._shift[self.reference_index_]
        self._sx = np.zeros(n)
        self._sxx = np.zeros(n)
        self._sxy = np.zeros(n)
        self._sy = np.zeros(m)
        self._syy = np.zeros(m)
        self._count = 0
        self._refs: list[np.ndarray] = []
        for t in range(window.shape[1]):
            self._accumulate(window[:, t])
        del window

    def _accumulate(self, w: np.ndarray) -> None:
        r = np.asarray(w[self.reference_index_], dtype=np.float64)  # (M,) current references
        self._refs.append(r)
        y = r - self._ref_shift
        x = np.asarray(w, dtype=np.float64) - self._shift
        self._sx += x
        self._sxx += x * x
        self._sxy += x * y[self.assignment_]
        self._sy += y
        self._syy += y * y
        self._count += 1

    # -- output --------------------------------------------------------------
    def result(self) -> CMDResult:
        """CMD over all recorded steps with the warm-up modes/assignment (closed form)."""
        if not self.is_warm:
            raise RuntimeError(
                f"OnlineCMD.result() needs the warm-up to finish: {self.n_steps_} of "
                f"warmup={self.warmup} records seen"
            )
        n_t = float(self._count)
        mode = self.assignment_
        sy, syy = self._sy[mode], self._syy[mode]
        sxx_c = np.clip(self._sxx - self._sx ** 2 / n_t, 0.0, None)
        sxy_c = self._sxy - self._sx * sy / n_t
        syy_c_mode = np.clip(self._syy - self._sy ** 2 / n_t, 0.0, None)
        refs = np.stack(self._refs, axis=1)  # (M, T)
        r_const = (refs == refs[:, :1]).all(axis=1)
        syy_c_mode[r_const] = 0.0
        syy_c = syy_c_mode[mode]
        a = np.divide(sxy_c, syy_c, out=np.zeros_like(sxy_c), where=syy_c > 0)
        # w = c + x,  x ~= a*y + b',  y = r - c_ref   =>   w ~= a*r + (c + b' - a*c_ref)
        b_shifted = (self._sx - a * sy) / n_t
        b = self._shift + b_shifted - a * self._ref_shift[mode]
        sse = np.clip(sxx_c - a * sxy_c, 0.0, None)
        sq = self._sxx + 2.0 * self._shift * self._sx + n_t * self._shift ** 2
        n_layers = len(self._layer_names)
        layer_sse = np.bincount(self._layer_index, weights=sse, minlength=n_layers)
        layer_sq = np.bincount(self._layer_index, weights=sq, minlength=n_layers)
        total_sq = float(layer_sq.sum())
        error = float(np.sqrt(layer_sse.sum() / total_sq)) if total_sq > 0 else 0.0
        layer_errors = {
            name: (float(np.sqrt(layer_sse[k] / layer_sq[k])) if layer_sq[k] > 0 else 0.0)
            for k, name in enumerate(self._layer_names)
        }
        return CMDResult(refs, self.reference_index_.copy(), self.assignment_.copy(), a, b, error,
                         layer_errors, np.array([self.n_modes_]), np.array([error]),
                         self._layer_index, self._layer_names,
                         self.warmup_result_.sample_index)


# ---------------------------------------------------------------------- evaluation


def reconstruction_trajectory(result: CMDResult, t_indices: Iterable[int],
                              dtype: Any = np.float64) -> Iterator[np.ndarray]:
    """Yield the reconstructed flat weight vector ``(N,)`` at each recorded-step index."""
    for t in t_indices:
        yield result.reconstruct_at(t).astype(dtype, copy=False)


def evaluate_reconstruction(model: Any, result: CMDResult, X_test: Any, y_test: Any,
                            loss_fn: Callable[[Any, Any], Any],
                            t_indices: Iterable[int]) -> dict[str, np.ndarray]:
    """Evaluate a torch model with CMD-reconstructed weights at each recorded step.

    The flat vector order must be that of ``torch.nn.utils.parameters_to_vector(
    model.parameters())`` (the recorder must record exactly that; buffers such as
    batch-norm statistics are not part of it and keep their current values).  The
    model's own parameters are restored afterwards.

    Returns ``{"t_index": (S,), "loss": (S,), "accuracy": (S,)}``; ``loss`` is
    ``loss_fn(model(X_test), y_test)``; ``accuracy`` is the fraction of argmax
    predictions equal to ``y_test`` (NaN unless ``y_test`` is integer class labels
    and the output is 2-D).
    """
    import torch
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    params = list(model.parameters())
    if not params:
        raise ValueError("model has no parameters")
    n_model = sum(p.numel() for p in params)
    if n_model != result.n_params:
        raise ValueError(f"model has {n_model} parameters but the CMD result has N={result.n_params}")
    saved = parameters_to_vector(params).detach().clone()
    was_training = model.training
    x = torch.as_tensor(X_test)
    y = torch.as_tensor(y_test)
    dev, dt = params[0].device, params[0].dtype
    t_list = [int(t) for t in t_indices]
    losses = np.empty(len(t_list))
    accs = np.full(len(t_list), np.nan)
    classify = not (y.is_floating_point() or y.is_complex())
    try:
        model.eval()
        with torch.no_grad():
            for j, vec in enumerate(reconstruction_trajectory(result, t_list)):
                vector_to_parameters(torch.as_tensor(vec, dtype=dt, device=dev), params)
                out = model(x)
                losses[j] = float(loss_fn(out, y))
                if classify and out.ndim == 2:
                    accs[j] = float((out.argmax(dim=1) == y).double().mean())
    finally:
        vector_to_parameters(saved, params)
        model.train(was_training)
    return {"t_index": np.asarray(t_list, dtype=np.int64), "loss": losses, "accuracy": accs}
