"""Latent-state (HMM) models of training dynamics, after Hu et al. (TMLR 2023).

Each training run is a sequence of feature vectors (for instance the weight statistics of
:mod:`raydyn.analysis.weight_stats`, one row per checkpoint). A Gaussian HMM fitted to
many runs gives a small discrete "training map": latent states, the transitions between
them that runs actually take, and which features move on each transition. Correlating
"did a run visit state s" with its convergence time finds *detour* states, whose visit
slows training down.

The pipeline, split so that the expensive part can be fanned out (e.g. as Ray tasks):

1. :func:`prepare` -- validate, split **runs** (not time points) into train / held-out,
   z-score every feature with one mean/std pooled over the *training* runs (default; or
   per run, as Hu et al.).
2. :func:`fit_plan` -- the list of independent ``(k, seed)`` jobs.
3. :func:`fit_one` -- one EM fit (hmmlearn ``GaussianHMM``) for one ``(k, seed)``; a pure
   function of its arguments, returns an :class:`HMMFit` of plain arrays.
4. :func:`select` -- keep the best restart per ``k`` (train log-likelihood), choose ``k`` by
   BIC (or, as Hu et al., the best restart by held-out score and ``k`` by held-out BIC),
   score held-out runs, Viterbi-decode every run, relabel states canonically.

:func:`fit_hmm` runs all four in a loop. :func:`training_map`, :func:`convergence_steps`
and :func:`detour_analysis` interpret the result.

Units: features are in "z-units" after :func:`prepare` (standard deviations pooled over the
training runs by default; per-run ones with ``standardize="run"``, as in the paper: see
:func:`zscore_runs` for why that is not the default);
log-likelihoods are natural logs of densities of those z-scored observations; time is the
row index of a sequence unless step numbers are given.

Reference: Hu, Chen, Saphra, Cho, "Latent State Models of Training Dynamics", TMLR 2023;
their code is github.com/michahu/modeling-training (read, not copied).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raydyn.analysis._checks import check_trajectories

__all__ = [
    "COVARIANCE_TYPES",
    "STANDARDIZE",
    "HMMData",
    "HMMFit",
    "HMMResult",
    "TrainingMap",
    "MapNode",
    "MapEdge",
    "DetourResult",
    "zscore_runs",
    "prepare",
    "fit_plan",
    "fit_one",
    "n_free_parameters",
    "select",
    "fit_hmm",
    "training_map",
    "convergence_steps",
    "detour_analysis",
    "adjust_pvalues",
    "CORRECTIONS",
    "SELECTIONS",
]

COVARIANCE_TYPES: tuple[str, ...] = ("full", "diag")
"""Covariance types accepted by :func:`fit_one` / :func:`fit_hmm`."""

_COVARS_PRIOR = 1e-2
"""Ridge added to the covariance numerator in EM, as a fraction of each feature's pooled variance
over the training time points (hmmlearn's default size, 1e-2, on z-scored features)."""
_MIN_COVAR = 1e-3
"""hmmlearn's ``min_covar`` (added to the initial covariance), likewise relative to the variance."""


# --------------------------------------------------------------------------- validation


def _check_sequences(sequences: Sequence, name: str = "sequences") -> list[np.ndarray]:
    """Validate a list of ``(T_i, F)`` arrays; return float64 arrays."""
    return check_trajectories(sequences, name=name, dim="F", min_length=2, time="time")


def _check_covariance_type(covariance_type: str) -> None:
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type={covariance_type!r}; allowed values are {COVARIANCE_TYPES}")


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}; must be an integer >= 1")
    return int(value)


# --------------------------------------------------------------------------- preparation


STANDARDIZE: tuple[str, ...] = ("global", "run", "none")
"""How :func:`prepare` scales features: pooled over the training runs (default), per run (Hu et
al.), or not at all."""


def _zscore(a: np.ndarray, mean: np.ndarray, std: np.ndarray, constant: np.ndarray) -> np.ndarray:
    z = (a - mean) / np.where(constant, 1.0, std)
    z[:, constant] = 0.0
    return z


def zscore_runs(
    sequences: Sequence[np.ndarray], standardize: str = "global", fit_index: Sequence[int] | None = None
) -> list[np.ndarray]:
    """Z-score features over time (population std, ``ddof=0``).

    Args:
        sequences: list of ``(T_i, F)`` arrays.
        standardize: ``"global"`` (default) -- one mean/std per feature pooled over the runs in
            ``fit_index`` (all runs when None) and applied to every run: an affine map shared
            by all runs, so a Gaussian HMM stays a Gaussian HMM with the same states;
            ``"run"`` -- each run per feature over its own time steps, as Hu et al. do. Per-run
            scaling removes between-run differences in level and scale, but it also moves each
            state's mean by a different amount in each run whenever runs spend different
            fractions of time in the states, and BIC then buys extra states to absorb those
            offsets (4-state data, 30 runs x 200 steps, self-transition 0.9: ``"run"`` picks
            6 states, ``"global"`` 4 with ARI 0.99); ``"none"`` -- copy as float64.
        fit_index: runs whose time points define the pooled mean/std (``"global"`` only), e.g.
            the training runs, so held-out runs never inform the scaling of the data the model
            is fitted on.

    Returns:
        list of ``(T_i, F)`` float64 arrays. A column that is exactly constant (within the
        run for ``"run"``, over the pooled runs for ``"global"``) becomes all zeros, never NaN.
    """
    if standardize not in STANDARDIZE:
        raise ValueError(f"standardize={standardize!r}; allowed values are {STANDARDIZE}")
    seqs = _check_sequences(sequences)
    if standardize == "none":
        return seqs
    if standardize == "global":
        idx = range(len(seqs)) if fit_index is None else [int(i) for i in fit_index]
        if not len(idx):
            raise ValueError("fit_index is empty; need at least one run to pool the mean/std over")
        x = np.concatenate([seqs[i] for i in idx], axis=0)
        stats = (x.mean(axis=0), x.std(axis=0), x.max(axis=0) == x.min(axis=0))
        return [_zscore(a, *stats) for a in seqs]
    return [_zscore(a, a.mean(axis=0), a.std(axis=0), a.max(axis=0) == a.min(axis=0)) for a in seqs]


@dataclass(frozen=True)
class HMMData:
    """Z-scored runs and the run-level train/held-out split.

    Attributes:
        sequences: z-scored runs, input order; each ``(T_i, F)``.
        train_index: indices into ``sequences`` of training runs, ``(n_train,)`` int.
        heldout_index: indices of held-out runs, ``(n_heldout,)`` int (may be empty).
        feature_names: ``F`` names, or None.
    """

    sequences: tuple[np.ndarray, ...]
    train_index: np.ndarray
    heldout_index: np.ndarray
    feature_names: tuple[str, ...] | None = None

    @property
    def n_features(self) -> int:
        return self.sequences[0].shape[1]

    @property
    def train_sequences(self) -> list[np.ndarray]:
        return [self.sequences[i] for i in self.train_index]

    @property
    def heldout_sequences(self) -> list[np.ndarray]:
        return [self.sequences[i] for i in self.heldout_index]


def _seed_sequence(random_state, stream: int) -> np.random.SeedSequence:
    if random_state is None:
        raise ValueError("random_state=None must be resolved to an int before deriving streams")
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)) or random_state < 0:
        raise ValueError(f"random_state={random_state!r}; must be None or an integer >= 0")
    return np.random.SeedSequence([int(random_state), stream])


def prepare(
    sequences: Sequence[np.ndarray],
    held_out: float = 0.2,
    random_state: int | None = None,
    feature_names: Sequence[str] | None = None,
    standardize: str = "global",
) -> HMMData:
    """Validate runs, split them into train and held-out, and z-score them.

    Args:
        sequences: list of ``(T_i, F)`` arrays, one per training run.
        held_out: fraction of runs held out, in ``[0, 1)``. The held-out count is
            ``ceil(held_out * n_runs)``, capped at ``n_runs - 1`` so at least one run trains
            (so with a single run nothing is held out).
        random_state: int seed for the split; None draws fresh entropy.
        feature_names: optional ``F`` names.
        standardize: ``"global"`` (default: one mean/std per feature pooled over the
            *training* runs, applied to all runs), ``"run"`` (per run, as Hu et al.) or
            ``"none"``; see :func:`zscore_runs`.

    Raises:
        ValueError: empty list, non-2-D arrays, mismatched ``F``, non-finite values,
            ``held_out`` outside ``[0, 1)``, or ``feature_names`` of the wrong length.
    """
    if standardize not in STANDARDIZE:
        raise ValueError(f"standardize={standardize!r}; allowed values are {STANDARDIZE}")
    seqs = _check_sequences(sequences)
    if not (isinstance(held_out, (int, float, np.floating)) and 0.0 <= float(held_out) < 1.0):
        raise ValueError(f"held_out={held_out!r}; must be a fraction in [0, 1)")
    n_features = seqs[0].shape[1]
    if feature_names is not None:
        feature_names = tuple(str(n) for n in feature_names)
        if len(feature_names) != n_features:
            raise ValueError(f"feature_names has {len(feature_names)} names but sequences have F={n_features}")
    if random_state is None:
        random_state = int(np.random.SeedSequence().generate_state(1)[0])
    rng = np.random.default_rng(_seed_sequence(random_state, 0))
    n = len(seqs)
    n_test = min(math.ceil(float(held_out) * n), n - 1) if held_out > 0 else 0
    perm = rng.permutation(n)
    train_index, heldout_index = np.sort(perm[n_test:]), np.sort(perm[:n_test])
    return HMMData(
        sequences=tuple(zscore_runs(seqs, standardize, fit_index=train_index)),
        train_index=train_index,
        heldout_index=heldout_index,
        feature_names=feature_names,
    )


def fit_plan(max_states: int = 8, restarts: int = 5, random_state: int | None = None) -> list[tuple[int, int]]:
    """The independent ``(k, seed)`` jobs: ``k = 1..max_states``, ``restarts`` seeds each.

    Seeds are derived deterministically from ``random_state`` (distinct from the stream
    :func:`prepare` uses with the same ``random_state``), fit in ``[0, 2**32)`` as hmmlearn
    requires, and are ordered by ``k`` then restart.
    """
    max_states = _check_positive_int(max_states, "max_states")
    restarts = _check_positive_int(restarts, "restarts")
    if random_state is None:
        random_state = int(np.random.SeedSequence().generate_state(1)[0])
    seeds = _seed_sequence(random_state, 1).generate_state(max_states * restarts).reshape(max_states, restarts)
    return [(k, int(seeds[k - 1, r])) for k in range(1, max_states + 1) for r in range(restarts)]


# --------------------------------------------------------------------------- one fit


@dataclass(frozen=True)
class HMMFit:
    """One EM fit of a Gaussian HMM, as plain arrays (picklable, cheap to ship).

    Attributes:
        n_states: number of hidden states ``k``.
        seed: the ``random_state`` given to hmmlearn (k-means initialisation).
        covariance_type: ``"full"`` or ``"diag"``.
        startprob: ``(k,)``.
        transmat: ``(k, k)``, rows sum to 1.
        means: ``(k, F)`` in z-units.
        covars: hmmlearn's native shape: ``(k, F, F)`` for full, ``(k, F)`` for diag.
        loglik: total log-likelihood of the training runs under the fitted model (nats).
        n_obs: number of training time points (sum of ``T_i``).
        converged: whether EM met its tolerance within ``n_iter`` iterations.
        n_iter: EM iterations run.
    """

    n_states: int
    seed: int
    covariance_type: str
    startprob: np.ndarray
    transmat: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    loglik: float
    n_obs: int
    converged: bool
    n_iter: int

    def to_model(self):
        """A hmmlearn ``GaussianHMM`` carrying these parameters (for scoring/decoding)."""
        from hmmlearn.hmm import GaussianHMM

        model = GaussianHMM(n_components=self.n_states, covariance_type=self.covariance_type, init_params="")
        model.startprob_ = self.startprob
        model.transmat_ = self.transmat
        model.means_ = self.means
        model.covars_ = self.covars
        model.n_features = self.means.shape[1]
        return model


_CONTROLLER: list[Any] = []


def _blas_controller() -> Any:
    """This process's threadpoolctl controller, built once: ``threadpool_limits`` lists every loaded
    shared library on each call (1.1 ms, ~1% of a fit here); the libraries a fit uses (numpy's and
    scipy's BLAS, OpenMP) are loaded by the time the first fit imports hmmlearn."""
    if not _CONTROLLER:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0]


def fit_one(
    train_sequences: Sequence[np.ndarray],
    k: int,
    seed: int,
    covariance_type: str = "full",
    n_iter: int = 100,
    tol: float = 1e-2,
) -> HMMFit:
    """Fit one Gaussian HMM with ``k`` states by EM from one random initialisation.

    Pure: the result depends only on the arguments (hmmlearn's k-means init is seeded).
    Intended to be fanned out over ``(k, seed)`` pairs from :func:`fit_plan`.

    Args:
        train_sequences: list of ``(T_i, F)`` arrays, already z-scored (see :func:`prepare`).
        k: number of hidden states, >= 1.
        seed: integer in ``[0, 2**32)`` for hmmlearn's ``random_state``.
        covariance_type: ``"full"`` or ``"diag"``.
        n_iter: maximum EM iterations.
        tol: EM stops when the log-likelihood gain is below this (nats).

    Returns:
        :class:`HMMFit`. ``loglik`` is ``-inf`` if EM produced a non-finite likelihood or broke
        down (:func:`select` skips such restarts).

    The covariance prior (``covars_prior``) is ``1e-2`` times each feature's variance pooled
    over ``train_sequences`` (a diagonal ridge for full covariances), so the fit does not depend
    on the units of the features.

    Raises:
        ValueError: bad ``k``/``covariance_type``, invalid sequences, or fewer training
            time points than states.
    """
    from hmmlearn.hmm import GaussianHMM

    seqs = _check_sequences(train_sequences, "train_sequences")
    k = _check_positive_int(k, "k")
    _check_covariance_type(covariance_type)
    n_iter = _check_positive_int(n_iter, "n_iter")
    x = np.concatenate(seqs, axis=0)
    lengths = [len(s) for s in seqs]
    if x.shape[0] < k:
        raise ValueError(f"k={k} states but only {x.shape[0]} training time points; need at least k")
    # The prior is relative to the data: 1e-2 x each feature's pooled variance (1e-2 on z-scored
    # features, as before; a fixed 1e-2 on raw features of scale 1e-3 is 1e4 x their variance and
    # swamps them). hmmlearn adds a scalar covars_prior to *every* entry of a full covariance (a
    # rank-1 term that does not keep it positive-definite when features are constant or
    # collinear); a diagonal ridge does. For diag the vector acts per variance.
    var = _feature_scale(x)
    prior = np.diag(_COVARS_PRIOR * var) if covariance_type == "full" else _COVARS_PRIOR * var
    model = GaussianHMM(
        n_components=k,
        covariance_type=covariance_type,
        n_iter=n_iter,
        tol=tol,
        random_state=int(seed),
        covars_prior=prior,
        min_covar=_MIN_COVAR * float(var.min()),
    )
    # One BLAS thread: the matrices are tiny (F x F), so threading only adds overhead (we
    # measured 25x slowdowns on a loaded 2-core machine), and parallelism belongs one level
    # up, across (k, seed) jobs.
    with _blas_controller().limit(limits=1), np.errstate(all="ignore"):
        try:
            model.fit(x, lengths)
            loglik = float(model.score(x, lengths))
        except (ValueError, np.linalg.LinAlgError):  # EM broke down (non-finite parameters): a failed restart
            loglik = -math.inf
    if not np.isfinite(loglik):
        loglik = -math.inf
    covars = np.array(model.covars_, dtype=np.float64)  # full form (k, F, F) for every type
    return HMMFit(
        n_states=k,
        seed=int(seed),
        covariance_type=covariance_type,
        startprob=np.asarray(model.startprob_, dtype=np.float64).copy(),
        transmat=np.asarray(model.transmat_, dtype=np.float64).copy(),
        means=np.asarray(model.means_, dtype=np.float64).copy(),
        covars=covars if covariance_type == "full" else np.diagonal(covars, axis1=1, axis2=2).copy(),
        loglik=loglik,
        n_obs=int(x.shape[0]),
        converged=bool(model.monitor_.converged),
        n_iter=int(model.monitor_.iter),
    )


def _feature_scale(x: np.ndarray) -> np.ndarray:
    """``(F,)`` pooled variance of each feature, with constant features given a positive stand-in
    (the mean variance of the others, or 1 when every feature is constant)."""
    var = x.var(axis=0)
    pos = var[var > 0]
    fill = float(pos.mean()) if pos.size else 1.0
    return np.where(var > 0, var, fill)


def n_free_parameters(k: int, n_features: int, covariance_type: str) -> int:
    """Free scalar parameters of a ``k``-state Gaussian HMM over ``n_features`` features.

    ``(k-1)`` start probabilities + ``k(k-1)`` transition probabilities + ``k F`` means +
    covariances: ``k F (F+1) / 2`` (full) or ``k F`` (diag).
    """
    k = _check_positive_int(k, "k")
    f = _check_positive_int(n_features, "n_features")
    _check_covariance_type(covariance_type)
    cov = k * f * (f + 1) // 2 if covariance_type == "full" else k * f
    return (k - 1) + k * (k - 1) + k * f + cov


# --------------------------------------------------------------------------- selection

SELECTIONS: tuple[str, ...] = ("bic", "heldout")
"""How :func:`select` picks the restart per ``k`` and then ``k``: ``"bic"`` -- best training
log-likelihood, lowest training BIC; ``"heldout"`` -- as Hu et al.'s model-selection script, the
restart with the best held-out log-likelihood, then the lowest held-out BIC."""


@dataclass(frozen=True)
class HMMResult:
    """The selected HMM and every run decoded under it.

    State labels are canonical: states are ordered by the mean (over runs that visit
    them) of their first-visit time, as a fraction of the run's length; ties and
    never-visited states are ordered by their mean vectors. Relabelling is applied to
    every array below, so the same data and seeds always give the same labels.

    Attributes:
        n_states: selected ``k``.
        covariance_type: ``"full"`` or ``"diag"``.
        bic: ``k -> BIC`` of the best restart on the training runs (lower is better;
            ``-2 loglik + n_free_parameters * ln(n_obs)``); NaN if every restart failed.
        train_loglik: ``k -> total training log-likelihood`` of the best restart (nats).
        heldout_loglik: ``k -> held-out log-likelihood per time point`` (nats per step,
            comparable across data sizes) of the kept restart; empty dict if no run was held out.
        heldout_bic: ``k -> -2 (total held-out log-likelihood) + n_free_parameters ln(held-out
            time points)`` of the kept restart (Hu et al.'s held-out BIC); empty without held-out runs.
        selection: ``"bic"`` or ``"heldout"`` (see :data:`SELECTIONS`).
        states: one int array ``(T_i,)`` per input sequence, input order (Viterbi path).
        transmat: ``(k, k)``; startprob: ``(k,)``; means: ``(k, F)`` in z-units;
        covars: ``(k, F, F)`` (always full form, diagonal if ``covariance_type="diag"``).
        feature_names: ``F`` names or None.
        train_index / heldout_index: run indices of the split.
        fit: the selected :class:`HMMFit` (original hmmlearn labels).
        order: ``order[new] = old`` label map from ``fit`` to the canonical labels.
        sequences: the z-scored runs, input order.
    """

    n_states: int
    covariance_type: str
    bic: dict[int, float]
    train_loglik: dict[int, float]
    heldout_loglik: dict[int, float]
    states: list[np.ndarray]
    transmat: np.ndarray
    startprob: np.ndarray
    means: np.ndarray
    covars: np.ndarray
    feature_names: tuple[str, ...] | None
    train_index: np.ndarray
    heldout_index: np.ndarray
    fit: HMMFit
    order: np.ndarray
    sequences: tuple[np.ndarray, ...] = field(repr=False)
    heldout_bic: dict[int, float] = field(default_factory=dict)
    selection: str = "bic"

    @property
    def n_runs(self) -> int:
        return len(self.states)


def _full_covars(fit: HMMFit) -> np.ndarray:
    if fit.covariance_type == "full":
        return fit.covars.copy()
    return np.stack([np.diag(c) for c in fit.covars])


def _canonical_order(states: list[np.ndarray], means: np.ndarray) -> np.ndarray:
    """``order[new] = old``: sort by mean normalised first-visit time, then by means."""
    k = means.shape[0]
    keys = []
    for s in range(k):
        firsts = [np.flatnonzero(z == s)[0] / max(len(z) - 1, 1) for z in states if (z == s).any()]
        first = float(np.mean(firsts)) if firsts else math.inf
        keys.append((first, *np.round(means[s], 12).tolist()))
    return np.array(sorted(range(k), key=lambda s: keys[s]), dtype=int)


def select(data: HMMData, fits: Sequence[HMMFit], selection: str = "bic") -> HMMResult:
    """Combine independent fits: best restart per ``k``, ``k`` by BIC, decode all runs.

    Args:
        data: the :class:`HMMData` whose ``train_sequences`` the fits were trained on.
        fits: :class:`HMMFit` objects from :func:`fit_one`, any order, any mix of ``k``.
        selection: ``"bic"`` (default) -- per ``k`` the restart with the best training
            log-likelihood, ``k`` by training BIC; ``"heldout"`` -- per ``k`` the restart with
            the best held-out log-likelihood and ``k`` by held-out BIC, as in Hu et al.'s
            model-selection script (needs held-out runs).

    Returns:
        :class:`HMMResult`. Ties go to the smaller ``k``.

    Raises:
        ValueError: no fits, fits of mixed covariance types or feature counts not matching
            ``data``, no fit with a finite likelihood, or ``selection="heldout"`` without
            held-out runs.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; allowed values are {SELECTIONS}")
    if selection == "heldout" and len(data.heldout_index) == 0:
        raise ValueError("selection='heldout' needs held-out runs; use held_out > 0 with at least 2 runs")
    if len(fits) == 0:
        raise ValueError("fits is empty; run fit_one for at least one (k, seed)")
    cov_types = {f.covariance_type for f in fits}
    if len(cov_types) != 1:
        raise ValueError(f"fits mix covariance types {sorted(cov_types)}; select one type at a time")
    covariance_type = cov_types.pop()
    f_dim = data.n_features
    n_obs = sum(len(s) for s in data.train_sequences)
    for f in fits:
        if f.means.shape[1] != f_dim:
            raise ValueError(f"a fit with k={f.n_states} has F={f.means.shape[1]} but data has F={f_dim}")
        if f.n_obs != n_obs:
            raise ValueError(
                f"a fit with k={f.n_states}, seed={f.seed} saw {f.n_obs} training time points but "
                f"data.train_sequences has {n_obs}; fits must come from the same split"
            )

    heldout = data.heldout_sequences
    xh = np.concatenate(heldout) if heldout else None
    lh = [len(s) for s in heldout]

    def heldout_total(f: HMMFit) -> float:
        with np.errstate(all="ignore"):
            try:
                v = float(f.to_model().score(xh, lh))
            except (ValueError, np.linalg.LinAlgError):
                return -math.inf
        return v if np.isfinite(v) else -math.inf

    scored = [f for f in sorted(fits, key=lambda f: (f.n_states, f.seed)) if np.isfinite(f.loglik)]
    best: dict[int, HMMFit] = {}
    if selection == "bic":  # the best restart per k by training likelihood; only those are scored held-out
        for f in scored:
            if f.n_states not in best or f.loglik > best[f.n_states].loglik:
                best[f.n_states] = f
        ho = {id(f): heldout_total(f) for f in best.values()} if heldout else {}
    else:
        ho = {id(f): heldout_total(f) for f in scored}
        for f in scored:
            if np.isfinite(ho[id(f)]) and (f.n_states not in best or ho[id(f)] > ho[id(best[f.n_states])]):
                best[f.n_states] = f
    if not best:
        raise ValueError("no fit has a finite log-likelihood; check the data or lower max_states")

    ks = sorted({f.n_states for f in fits})
    bic = {
        k: (-2.0 * best[k].loglik + n_free_parameters(k, f_dim, covariance_type) * math.log(n_obs)) if k in best else math.nan
        for k in ks
    }
    train_loglik = {k: best[k].loglik if k in best else -math.inf for k in ks}
    heldout_loglik: dict[int, float] = {}
    heldout_bic: dict[int, float] = {}
    if heldout:
        n_ho = xh.shape[0]
        for k in ks:
            total = ho[id(best[k])] if k in best else -math.inf
            heldout_loglik[k] = total / n_ho if k in best else math.nan
            heldout_bic[k] = (-2.0 * total + n_free_parameters(k, f_dim, covariance_type) * math.log(n_ho)
                              if k in best and np.isfinite(total) else math.nan)

    criterion = bic if selection == "bic" else heldout_bic
    k_best = min(best, key=lambda k: (criterion[k] if np.isfinite(criterion[k]) else math.inf, k))
    chosen = best[k_best]
    model = chosen.to_model()
    raw_states = [np.asarray(model.predict(s), dtype=int) for s in data.sequences]
    order = _canonical_order(raw_states, chosen.means)
    relabel = np.empty(k_best, dtype=int)
    relabel[order] = np.arange(k_best)
    return HMMResult(
        n_states=k_best,
        covariance_type=covariance_type,
        bic=bic,
        train_loglik=train_loglik,
        heldout_loglik=heldout_loglik,
        states=[relabel[z] for z in raw_states],
        transmat=chosen.transmat[np.ix_(order, order)],
        startprob=chosen.startprob[order],
        means=chosen.means[order],
        covars=_full_covars(chosen)[order],
        feature_names=data.feature_names,
        train_index=data.train_index,
        heldout_index=data.heldout_index,
        fit=chosen,
        order=order,
        sequences=data.sequences,
        heldout_bic=heldout_bic,
        selection=selection,
    )


def fit_hmm(
    sequences: Sequence[np.ndarray],
    max_states: int = 8,
    restarts: int = 5,
    covariance_type: str = "full",
    held_out: float = 0.2,
    random_state: int | None = None,
    feature_names: Sequence[str] | None = None,
    n_iter: int = 100,
    standardize: str = "global",
    selection: str = "bic",
) -> HMMResult:
    """Fit Gaussian HMMs with ``1..max_states`` states to many runs and pick one by BIC.

    Sequential composition of :func:`prepare`, :func:`fit_plan`, :func:`fit_one` and
    :func:`select`; a distributed caller runs the ``fit_one`` jobs in parallel instead.

    Args:
        sequences: list of ``(T_i, F)`` arrays, one per run (rows = checkpoints in time order).
        max_states: largest ``k`` tried (>= 1).
        restarts: random initialisations per ``k`` (>= 1); the best training likelihood wins.
        covariance_type: ``"full"`` or ``"diag"``.
        held_out: fraction of runs held out for ``heldout_loglik`` (see :func:`prepare`).
        random_state: int seed for the split and all fits; None draws fresh entropy.
        feature_names: optional ``F`` names carried into the result.
        n_iter: maximum EM iterations per fit.
        standardize: ``"global"`` (default: pooled over the training runs), ``"run"``
            (per-run z-scores as Hu et al.) or ``"none"``; see :func:`zscore_runs`.
        selection: ``"bic"`` (default) or ``"heldout"`` (Hu et al.); see :func:`select`.

    Returns:
        :class:`HMMResult` (``states`` for every input run, in input order).
    """
    _check_covariance_type(covariance_type)
    max_states = _check_positive_int(max_states, "max_states")
    restarts = _check_positive_int(restarts, "restarts")
    if random_state is None:
        random_state = int(np.random.SeedSequence().generate_state(1)[0])
    data = prepare(
        sequences, held_out=held_out, random_state=random_state, feature_names=feature_names, standardize=standardize
    )
    n_obs = sum(len(s) for s in data.train_sequences)
    jobs = [(k, s) for k, s in fit_plan(max_states, restarts, random_state) if k <= n_obs]
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; allowed values are {SELECTIONS}")
    fits = [fit_one(data.train_sequences, k, s, covariance_type, n_iter=n_iter) for k, s in jobs]
    return select(data, fits, selection)


# --------------------------------------------------------------------------- training map


@dataclass(frozen=True)
class MapNode:
    """A latent state on the training map.

    Attributes:
        state: canonical state label.
        occupancy: fraction of all decoded time steps (all runs) spent in this state.
        n_steps: number of decoded time steps in this state.
        run_fraction: fraction of runs that visit the state at least once.
        start_fraction: fraction of runs whose first decoded state is this one.
    """

    state: int
    occupancy: float
    n_steps: int
    run_fraction: float
    start_fraction: float


@dataclass(frozen=True)
class MapEdge:
    """A transition ``src -> dst`` (``src != dst``) that decoded runs actually take.

    Attributes:
        src, dst: canonical state labels.
        prob: fitted transition probability ``transmat[src, dst]``.
        count: number of observed ``src -> dst`` steps across all decoded runs.
        n_runs: number of runs that take this transition at least once.
        feature_change: ``(F,)`` signed change of state means ``means[dst] - means[src]``
            (z-units), in feature order.
        ranking: ``(F,)`` feature indices sorted by ``|feature_change|``, largest first.
        ranked_features: ``(name, signed change)`` pairs in ranking order (names are
            ``"f<i>"`` when the result has no feature names).
    """

    src: int
    dst: int
    prob: float
    count: int
    n_runs: int
    feature_change: np.ndarray
    ranking: np.ndarray
    ranked_features: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class TrainingMap:
    """Nodes and directed edges of a training map (compute first, draw second)."""

    nodes: tuple[MapNode, ...]
    edges: tuple[MapEdge, ...]
    feature_names: tuple[str, ...]

    def edge(self, src: int, dst: int) -> MapEdge:
        for e in self.edges:
            if e.src == src and e.dst == dst:
                return e
        raise KeyError(f"no edge {src} -> {dst} on this training map")


def training_map(result: HMMResult, min_count: int = 1) -> TrainingMap:
    """The states and the observed transitions of an :class:`HMMResult`.

    Only transitions seen in the decoded runs at least ``min_count`` times become edges
    (the fitted ``transmat`` has small non-zero entries for transitions no run takes);
    self-loops are never edges.

    Args:
        result: from :func:`fit_hmm` / :func:`select`.
        min_count: minimum number of observed transitions for an edge (>= 1).

    Returns:
        :class:`TrainingMap` with one node per state (``0..k-1``) and edges sorted by
        ``(src, dst)``.
    """
    if not isinstance(result, HMMResult):
        raise ValueError(f"result must be an HMMResult from fit_hmm/select, got {type(result).__name__}")
    min_count = _check_positive_int(min_count, "min_count")
    k = result.n_states
    names = result.feature_names or tuple(f"f{i}" for i in range(result.means.shape[1]))
    counts = np.zeros((k, k), dtype=np.int64)
    run_counts = np.zeros((k, k), dtype=np.int64)
    steps = np.zeros(k, dtype=np.int64)
    visits = np.zeros(k, dtype=np.int64)
    starts = np.zeros(k, dtype=np.int64)
    for z in result.states:
        steps += np.bincount(z, minlength=k)
        visits[np.unique(z)] += 1
        starts[z[0]] += 1
        c = np.zeros((k, k), dtype=np.int64)
        np.add.at(c, (z[:-1], z[1:]), 1)
        counts += c
        run_counts += c > 0
    n_runs = len(result.states)
    total = int(steps.sum())
    nodes = tuple(
        MapNode(
            state=s,
            occupancy=float(steps[s] / total),
            n_steps=int(steps[s]),
            run_fraction=float(visits[s] / n_runs),
            start_fraction=float(starts[s] / n_runs),
        )
        for s in range(k)
    )
    edges = []
    for i in range(k):
        for j in range(k):
            if i == j or counts[i, j] < min_count:
                continue
            change = result.means[j] - result.means[i]
            ranking = np.argsort(-np.abs(change), kind="stable")
            edges.append(
                MapEdge(
                    src=i,
                    dst=j,
                    prob=float(result.transmat[i, j]),
                    count=int(counts[i, j]),
                    n_runs=int(run_counts[i, j]),
                    feature_change=change,
                    ranking=ranking,
                    ranked_features=tuple((names[f], float(change[f])) for f in ranking),
                )
            )
    return TrainingMap(nodes=nodes, edges=tuple(edges), feature_names=tuple(names))


# --------------------------------------------------------------------------- detours


def convergence_steps(
    metric_sequences: Sequence[np.ndarray],
    threshold: float,
    mode: str = "below",
    steps: Sequence[np.ndarray] | np.ndarray | None = None,
) -> np.ndarray:
    """First time each run's metric crosses ``threshold``.

    Args:
        metric_sequences: list of 1-D arrays ``(T_i,)``, e.g. eval loss or accuracy per
            checkpoint. NaN never counts as crossing.
        threshold: the level.
        mode: ``"below"`` (first ``metric < threshold``, e.g. loss) or ``"above"`` (first
            ``metric > threshold``, e.g. accuracy; Hu et al. use eval accuracy > 0.9 for
            sparse parities and > 0.5 for modular addition). Strict inequalities.
        steps: optional step numbers: one 1-D array shared by all runs, or one per run
            (same lengths as the metrics). Without it the result is a row index.

    Returns:
        ``(n_runs,)`` float64. A run that never crosses gets the "max length": without
        ``steps``, ``max_i T_i`` (one past the last index of the longest run, as in the
        reference code); with ``steps``, one step-spacing past the largest last step.
    """
    if mode not in ("below", "above"):
        raise ValueError(f"mode={mode!r}; allowed values are ('below', 'above')")
    if isinstance(metric_sequences, np.ndarray) and metric_sequences.ndim == 2:
        metric_sequences = list(metric_sequences)
    if not isinstance(metric_sequences, Sequence) or len(metric_sequences) == 0:
        raise ValueError("metric_sequences is empty; need one 1-D array per run")
    metrics = []
    for i, m in enumerate(metric_sequences):
        a = np.asarray(m, dtype=np.float64)
        if a.ndim != 1 or a.size == 0:
            raise ValueError(f"metric_sequences[{i}] has shape {a.shape}; expected a non-empty 1-D array")
        metrics.append(a)
    if steps is None:
        step_arrays = [np.arange(len(a), dtype=np.float64) for a in metrics]
    else:
        if isinstance(steps, np.ndarray) and steps.ndim == 1:
            step_arrays = [np.asarray(steps, dtype=np.float64)[: len(a)] for a in metrics]
            short = [i for i, a in enumerate(metrics) if len(steps) < len(a)]
        else:
            if len(steps) != len(metrics):
                raise ValueError(f"steps has {len(steps)} arrays but metric_sequences has {len(metrics)} runs")
            step_arrays = [np.asarray(s, dtype=np.float64) for s in steps]
            short = [i for i, (s, a) in enumerate(zip(step_arrays, metrics)) if s.shape != a.shape]
        if short:
            raise ValueError(f"steps do not match the lengths of metric_sequences for runs {short}")
    if steps is None:
        never = float(max(len(a) for a in metrics))
    else:
        last = max(s[-1] for s in step_arrays)
        spacing = max((float(np.median(np.diff(s))) for s in step_arrays if len(s) > 1), default=1.0)
        never = float(last + spacing)
    out = np.empty(len(metrics))
    with np.errstate(invalid="ignore"):
        for i, (a, s) in enumerate(zip(metrics, step_arrays)):
            hit = np.flatnonzero(a < threshold if mode == "below" else a > threshold)
            out[i] = s[hit[0]] if hit.size else never
    return out


CORRECTIONS: tuple[str, ...] = ("holm", "bh", "none")
"""Multiple-testing corrections of :func:`adjust_pvalues`: Holm's step-down (family-wise error
rate), Benjamini-Hochberg (false discovery rate), or none."""


def adjust_pvalues(p: np.ndarray, method: str = "holm") -> np.ndarray:
    """Adjusted p-values for testing every finite entry of ``p`` at once (NaNs stay NaN).

    ``holm``: sort the m finite p-values ascending, p_(1) <= ... <= p_(m); the adjusted value of
    p_(i) is max_{j <= i} min(1, (m - j + 1) p_(j)) (Holm 1979). ``bh``: min_{j >= i}
    min(1, m p_(j) / j) (Benjamini & Hochberg 1995). ``none``: ``p`` unchanged. Rejecting where
    the adjusted value is below alpha controls the family-wise error (holm) or the false
    discovery rate (bh) at alpha.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction={method!r}; allowed values are {CORRECTIONS}")
    p = np.asarray(p, dtype=np.float64)
    out = p.copy()
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if method == "none" or m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    ps = p[order]
    rank = np.arange(1, m + 1)
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - rank + 1) * ps))
    else:
        adj = np.minimum.accumulate(np.minimum(1.0, m * ps / rank)[::-1])[::-1]
    out[order] = adj
    return out


@dataclass(frozen=True)
class DetourResult:
    """Per-state association between visiting a state and convergence time.

    All arrays are ``(n_states,)``. ``r`` is the Pearson (point-biserial) correlation
    between the 0/1 "run visited the state" indicator and the run's convergence time;
    ``p`` its two-sided p-value (:func:`scipy.stats.pearsonr`). Where the indicator is
    constant (state visited by every run or by none) or convergence times are all equal,
    ``r`` and ``p`` are NaN and ``defined`` is False. Every defined state is one test, so
    ``p_adjusted`` corrects ``p`` for the family of the group's defined states
    (:func:`adjust_pvalues`), and detours are called on it.

    Attributes:
        visit_fraction: fraction of runs visiting each state.
        r, p: as above.
        p_adjusted: ``p`` adjusted with ``correction`` over the defined states.
        correction: ``"holm"``, ``"bh"`` or ``"none"``.
        defined: whether ``r`` is defined.
        mean_convergence_visited / mean_convergence_not_visited: mean convergence time of
            runs that do / do not visit the state (NaN if none).
        obligatory: visited by every run.
        detour: not obligatory, ``r > 0`` and ``p_adjusted < alpha``: visiting it delays
            convergence.
        alpha: the significance level used.
        n_runs: number of runs.
    """

    visit_fraction: np.ndarray
    r: np.ndarray
    p: np.ndarray
    defined: np.ndarray
    mean_convergence_visited: np.ndarray
    mean_convergence_not_visited: np.ndarray
    obligatory: np.ndarray
    detour: np.ndarray
    alpha: float
    n_runs: int
    p_adjusted: np.ndarray | None = None
    correction: str = "holm"

    @property
    def detour_states(self) -> np.ndarray:
        return np.flatnonzero(self.detour)

    @property
    def obligatory_states(self) -> np.ndarray:
        return np.flatnonzero(self.obligatory)


def detour_analysis(
    states: Sequence[np.ndarray],
    convergence: np.ndarray,
    n_states: int | None = None,
    alpha: float = 0.05,
    correction: str = "holm",
) -> DetourResult:
    """Find obligatory and detour states (Hu et al. 2023, Sec. "detour states").

    Args:
        states: decoded state sequences, one int array per run (e.g. ``HMMResult.states``).
        convergence: ``(n_runs,)`` convergence time per run, same order (e.g. from
            :func:`convergence_steps`).
        n_states: number of states; default ``max label + 1``.
        alpha: significance level for calling a detour, in ``(0, 1)``.
        correction: ``"holm"`` (default), ``"bh"`` or ``"none"``: how the p-values of the
            group's states are adjusted for testing all of them (:func:`adjust_pvalues`).

    Returns:
        :class:`DetourResult`.

    Raises:
        ValueError: empty ``states``, fewer than 3 runs, length mismatch, non-finite
            convergence times, negative labels or labels >= ``n_states``, bad ``alpha``.
    """
    from scipy.stats import pearsonr

    if isinstance(states, np.ndarray) and states.ndim == 2:
        states = list(states)
    if not isinstance(states, Sequence) or len(states) == 0:
        raise ValueError("states is empty; need one decoded state sequence per run")
    runs = [np.asarray(z) for z in states]
    for i, z in enumerate(runs):
        if z.ndim != 1 or z.size == 0 or not np.issubdtype(z.dtype, np.integer):
            raise ValueError(f"states[{i}] must be a non-empty 1-D integer array, got shape {z.shape} dtype {z.dtype}")
        if z.min() < 0:
            raise ValueError(f"states[{i}] has a negative state label {z.min()}")
    conv = np.asarray(convergence, dtype=np.float64)
    if conv.shape != (len(runs),):
        raise ValueError(f"convergence has shape {conv.shape}; expected ({len(runs)},), one value per run")
    if not np.isfinite(conv).all():
        raise ValueError("convergence has non-finite values; use convergence_steps' max-length rule for runs that never converge")
    if len(runs) < 3:
        raise ValueError(f"detour analysis needs at least 3 runs, got {len(runs)}")
    if not (0.0 < float(alpha) < 1.0):
        raise ValueError(f"alpha={alpha!r}; must be in (0, 1)")
    if correction not in CORRECTIONS:
        raise ValueError(f"correction={correction!r}; allowed values are {CORRECTIONS}")
    top = max(int(z.max()) for z in runs) + 1
    k = top if n_states is None else _check_positive_int(n_states, "n_states")
    if top > k:
        raise ValueError(f"states contain label {top - 1} but n_states={k}")

    visited = np.zeros((k, len(runs)), dtype=bool)
    for j, z in enumerate(runs):
        visited[np.unique(z), j] = True
    r = np.full(k, np.nan)
    p = np.full(k, np.nan)
    mean_v = np.full(k, np.nan)
    mean_nv = np.full(k, np.nan)
    conv_constant = bool(np.all(conv == conv[0]))
    for s in range(k):
        v = visited[s]
        if v.any():
            mean_v[s] = conv[v].mean()
        if (~v).any():
            mean_nv[s] = conv[~v].mean()
        if v.all() or not v.any() or conv_constant:
            continue
        res = pearsonr(v.astype(np.float64), conv)
        r[s], p[s] = float(res.statistic), float(res.pvalue)
    defined = np.isfinite(r)
    obligatory = visited.all(axis=1)
    p_adj = adjust_pvalues(np.where(defined, p, np.nan), correction)
    detour = ~obligatory & defined & (np.nan_to_num(r) > 0) & (np.nan_to_num(p_adj, nan=1.0) < alpha)
    return DetourResult(
        visit_fraction=visited.mean(axis=1),
        r=r,
        p=p,
        defined=defined,
        mean_convergence_visited=mean_v,
        mean_convergence_not_visited=mean_nv,
        obligatory=obligatory,
        detour=detour,
        alpha=float(alpha),
        n_runs=len(runs),
        p_adjusted=p_adj,
        correction=correction,
    )
