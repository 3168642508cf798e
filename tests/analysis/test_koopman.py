"""Koopman spectra, Wasserstein distances, permutation test, clustering, plots.

Synthetic data with known answers: linear systems with prescribed eigenvalues,
brute-force and LP references for optimal transport, PyDMD for exact DMD.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings

import numpy as np
import pytest
from scipy import stats
from scipy.linalg import expm
from scipy.optimize import linear_sum_assignment, linprog

from raydyn.analysis.koopman import distances as K
from raydyn.analysis.koopman import (
    conjugacy_classes,
    conjugacy_test,
    fit_dmd,
    gavish_donoho_omega,
    hankel_snapshots,
    pairwise_wasserstein,
    seed_threshold,
    spectrum,
    wasserstein,
    wasserstein_block,
)

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "20240601"))
print(f"test_koopman seed: {SEED} (set RAYDYN_TEST_SEED to replay)")


@pytest.fixture
def rng():
    return np.random.default_rng(SEED)


# --------------------------------------------------------------------------- helpers


def rot(r: float, th: float) -> np.ndarray:
    return r * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])


def system_with(eigs: list[complex], rng) -> np.ndarray:
    """Real matrix with exactly these eigenvalues (complex ones given once, conjugate implied)."""
    blocks = []
    for e in eigs:
        if abs(np.imag(e)) > 0:
            blocks.append(rot(abs(e), np.angle(e)))
        else:
            blocks.append(np.array([[np.real(e)]]))
    n = sum(b.shape[0] for b in blocks)
    a = np.zeros((n, n))
    k = 0
    for b in blocks:
        a[k : k + b.shape[0], k : k + b.shape[0]] = b
        k += b.shape[0]
    p = rng.normal(size=(n, n)) + 2 * np.eye(n)
    return p @ a @ np.linalg.inv(p)


def full_spectrum(eigs: list[complex]) -> np.ndarray:
    out = []
    for e in eigs:
        out.append(complex(e))
        if abs(np.imag(e)) > 0:
            out.append(np.conj(complex(e)))
    return np.array(out)


def run(a: np.ndarray, x0: np.ndarray, t: int) -> np.ndarray:
    xs = [x0]
    for _ in range(t - 1):
        xs.append(a @ xs[-1])
    return np.array(xs)


def max_matched_error(e1: np.ndarray, e2: np.ndarray) -> float:
    assert e1.shape == e2.shape, (e1, e2)
    c = np.abs(e1[:, None] - e2[None, :])
    r, k = linear_sum_assignment(c)
    return float(c[r, k].max())


EIG_SETS = [
    [0.9 * np.exp(0.3j), 0.5, -0.7],
    [0.95 * np.exp(1.1j), 0.8 * np.exp(0.2j), 0.3],
    [1.0 * np.exp(0.05j), 0.6 * np.exp(2.5j)],
]


# --------------------------------------------------------------------------- DMD


@pytest.mark.parametrize("eigs", EIG_SETS)
def test_linear_recovery_full_state(eigs, rng):
    a = system_with(eigs, rng)
    truth = full_spectrum(eigs)
    traj = run(a, rng.normal(size=a.shape[0]), 40)
    got = spectrum(traj, 0)
    assert got.size == truth.size
    assert max_matched_error(got, truth) < 1e-8


@pytest.mark.parametrize("eigs", EIG_SETS)
def test_linear_recovery_scalar_observable_with_delays_several_inits(eigs, rng):
    """Only y = c.x is observed: the delays are what makes the spectrum identifiable."""
    a = system_with(eigs, rng)
    truth = full_spectrum(eigs)
    c = rng.normal(size=a.shape[0])
    trajs = [run(a, rng.normal(size=a.shape[0]), t) @ c for t in (25, 31, 40)]  # unequal T
    d = truth.size - 1
    got = spectrum([y[:, None] for y in trajs], d)
    assert got.size == truth.size
    assert max_matched_error(got, truth) < 1e-8
    # more delays than needed: the extra directions have zero singular values and are cut
    got2 = spectrum([y[:, None] for y in trajs], d + 3)
    assert got2.size == truth.size
    assert max_matched_error(got2, truth) < 1e-8


def test_pairs_never_straddle_trajectories(rng):
    """Two trajectories of the same linear system, one shifted far away: concatenating them
    into one series would create a bogus pair; kept apart the spectrum stays exact."""
    a = system_with(EIG_SETS[0], rng)
    t1, t2 = run(a, rng.normal(size=4), 30), run(a, 50 * rng.normal(size=4), 30)
    x, y = hankel_snapshots([t1, t2], 2)
    assert x.shape == (12, (30 - 3) * 2)
    # no pair maps the end of t1 to the start of t2
    last_of_t1 = np.concatenate([t1[-3], t1[-2], t1[-1]])
    assert not np.any(np.all(np.isclose(x.T, last_of_t1), axis=1))
    assert max_matched_error(spectrum([t1, t2], 2), full_spectrum(EIG_SETS[0])) < 1e-8
    assert max_matched_error(spectrum(np.stack([t1, t2]), 2), full_spectrum(EIG_SETS[0])) < 1e-8


def _nonlinear(x0: np.ndarray, t: int) -> np.ndarray:
    xs = [x0]
    for _ in range(t - 1):
        x = xs[-1]
        xs.append(np.array([0.9 * x[0] + 0.1 * np.sin(x[1]), 0.8 * x[1] - 0.2 * x[0] * x[2], 0.7 * x[2] + 0.3 * x[0] ** 2]))
    return np.array(xs)


@pytest.mark.parametrize("n_delays", [0, 2])
def test_invariant_under_linear_change_of_coordinates(n_delays, rng):
    trajs = [_nonlinear(rng.uniform(-1, 1, 3), 80) for _ in range(4)]
    p = rng.normal(size=(3, 3)) + 2 * np.eye(3)
    e1 = spectrum(trajs, n_delays)
    e2 = spectrum([t @ p.T for t in trajs], n_delays)
    assert e1.size == 3 * (n_delays + 1)
    assert max_matched_error(e1, e2) < 1e-8


def test_matches_pydmd(rng):
    pydmd = pytest.importorskip("pydmd")
    trajs = [_nonlinear(rng.uniform(-1, 1, 3), 60) for _ in range(3)]
    for d in (0, 3):
        x, y = hankel_snapshots(trajs, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = pydmd.DMD(svd_rank=-1, exact=True).fit(x, y).eigs
        ours = spectrum(trajs, d)
        assert max_matched_error(ours, np.asarray(ref)) < 1e-9
    # energy truncation and a single trajectory fitted from snapshots only
    single = trajs[0].T
    for rank in (0.999, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = pydmd.DMD(svd_rank=rank, exact=True).fit(single).eigs
        ours = spectrum(trajs[0], 0, rank=rank)
        assert max_matched_error(ours, np.asarray(ref)) < 1e-9


def test_gavish_donoho_threshold(rng):
    assert gavish_donoho_omega(1.0) == pytest.approx(2.858, abs=1e-3)  # published omega(1)
    # cubic fit of Gavish & Donoho (2014) is within ~0.02 of the exact value
    for beta in (0.1, 0.3, 0.5, 0.8):
        fit = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert gavish_donoho_omega(beta) == pytest.approx(fit, abs=0.02)
    # noisy observations of a rank-4 linear system in D = 30: the optimal rank is 4
    a = system_with(EIG_SETS[1][:2], rng)  # 4 x 4 with two complex pairs
    mix = rng.normal(size=(30, 4))
    trajs = [run(a, rng.normal(size=4), 200) @ mix.T + 1e-3 * rng.normal(size=(200, 30)) for _ in range(2)]
    res = fit_dmd(trajs, 0, rank="optimal")
    assert res.rank == 4
    assert max_matched_error(res.eigenvalues, full_spectrum(EIG_SETS[1][:2])) < 1e-2
    assert fit_dmd(trajs, 0, rank=None).rank == 30  # noise fills the numerical rank
    assert fit_dmd(trajs, 0, rank=3).rank == 3


def test_large_dimension_uses_exact_reduction(rng):
    """D > number of states: QR reduction, same eigenvalues as the dense route."""
    walks = list(np.cumsum(rng.normal(size=(3, 40, 400)), axis=1))
    for rank in (8, None):
        res = fit_dmd(walks, 1, rank=rank)
        assert res.reduced == "qr"
        x, y = hankel_snapshots(walks, 1)
        u, s, vh = np.linalg.svd(x, full_matrices=False)
        r = res.rank
        dense = np.linalg.eigvals(u[:, :r].T @ y @ vh[:r].T / s[:r])
        assert max_matched_error(res.eigenvalues, dense) < 1e-8


def test_pca_recovers_subspace_dynamics(rng):
    a = system_with(EIG_SETS[0], rng)  # 4 x 4
    q = np.linalg.qr(rng.normal(size=(50, 4)))[0]
    trajs = [run(a, rng.normal(size=4), 30) @ q.T for _ in range(3)]
    res = fit_dmd(trajs, 0, pca=4)
    assert res.reduced == "pca"
    assert max_matched_error(res.eigenvalues, full_spectrum(EIG_SETS[0])) < 1e-8


def test_continuous_time_eigenvalues_do_not_depend_on_dt(rng):
    b = np.array([[-0.1, 2.0, 0.0], [-2.0, -0.1, 0.0], [0.0, 0.0, -0.5]])
    truth = np.linalg.eigvals(b)
    got = []
    for dt in (0.01, 0.05):
        a = expm(b * dt)
        traj = run(a, rng.normal(size=3), 60)
        lam = spectrum(traj, 0, dt=dt, continuous=True)
        assert max_matched_error(lam, truth) < 1e-8
        got.append(lam)
    assert wasserstein(*got) < 1e-8
    # the discrete spectra of the same two recordings are far apart
    assert wasserstein(spectrum(run(expm(b * 0.01), np.ones(3), 60), 0), spectrum(run(expm(b * 0.05), np.ones(3), 60), 0)) > 0.01


def test_spectrum_validation(rng):
    x = rng.normal(size=(10, 3))
    with pytest.raises(ValueError, match="trajectory 0 has T=10"):
        spectrum(x, 9)
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"trajectory 1 contains NaN.*time step 4, feature 1"):
        spectrum([x, bad], 1)
    with pytest.raises(ValueError, match="trajectory 1 has D=2"):
        spectrum([x, x[:, :2]], 1)
    with pytest.raises(ValueError, match="n_delays"):
        spectrum(x, -1)
    for rank in (0, -1, 1.5, "best", True):
        with pytest.raises(ValueError, match="rank"):
            spectrum(x, 1, rank=rank)
    with pytest.raises(ValueError, match="dt"):
        spectrum(x, 1, dt=0.0)
    with pytest.raises(ValueError, match="pca"):
        spectrum(x, 1, pca=4)
    with pytest.raises(ValueError, match="identically zero"):
        spectrum(np.zeros((10, 2)), 1)
    with pytest.raises(ValueError, match="empty"):
        spectrum([], 1)


# --------------------------------------------------------------------------- Wasserstein


def brute_force(a: np.ndarray, b: np.ndarray, p: float) -> float:
    best = min(np.mean(np.abs(a - b[list(perm)]) ** p) for perm in itertools.permutations(range(a.size)))
    return best ** (1 / p)


def lp_reference(a: np.ndarray, b: np.ndarray, p: float) -> float:
    """Dense transport LP written independently of the module."""
    n, m = a.size, b.size
    c = (np.abs(a[:, None] - b[None, :]) ** p).ravel()
    a_eq = np.zeros((n + m, n * m))
    for i in range(n):
        a_eq[i, i * m : (i + 1) * m] = 1
    for j in range(m):
        a_eq[n + j, j::m] = 1
    b_eq = np.r_[np.full(n, 1 / n), np.full(m, 1 / m)]
    res = linprog(c, A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun ** (1 / p)


def cplx(rng, n):
    return rng.normal(size=n) + 1j * rng.normal(size=n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
@pytest.mark.parametrize("p", [1, 2, 1.5])
def test_wasserstein_equals_brute_force(n, p, rng):
    for _ in range(5):
        a, b = cplx(rng, n), cplx(rng, n)
        assert wasserstein(a, b, p) == pytest.approx(brute_force(a, b, p), abs=1e-12)


@pytest.mark.parametrize("n,m", [(3, 2), (7, 5), (10, 4), (17, 19), (1, 6)])
@pytest.mark.parametrize("p", [1, 2])
def test_wasserstein_unequal_counts_equals_lp(n, m, p, rng):
    a, b = cplx(rng, n), cplx(rng, m)
    assert wasserstein(a, b, p) == pytest.approx(lp_reference(a, b, p), abs=1e-9)
    assert wasserstein(b, a, p) == pytest.approx(lp_reference(a, b, p), abs=1e-9)


def test_wasserstein_unequal_is_full_transport_not_partial_matching():
    # b holds a's single point plus a far one: a partial matching would say 0
    a = np.array([0.0 + 0j])
    b = np.array([0.0 + 0j, 3.0 + 4j])
    assert wasserstein(a, b) == pytest.approx(2.5)  # half the mass travels 5


def test_wasserstein_metric_properties(rng):
    a, b, c = cplx(rng, 6), cplx(rng, 6), cplx(rng, 6)
    assert wasserstein(a, a) == 0
    assert wasserstein(a, b) == pytest.approx(wasserstein(b, a), abs=1e-14)
    assert wasserstein(a, c) <= wasserstein(a, b) + wasserstein(b, c) + 1e-12
    assert wasserstein(a, a + 0.5) == pytest.approx(0.5)  # translation by 0.5
    # the reference's wass_dist (mean of assigned distances) is W1 for equal counts
    d = np.abs(a[:, None] - b[None, :])
    r, k = linear_sum_assignment(d)
    assert wasserstein(a, b) == pytest.approx(d[r, k].mean(), abs=1e-14)


def test_wasserstein_validation():
    with pytest.raises(ValueError, match="eigs_a is empty"):
        wasserstein([], [1.0])
    with pytest.raises(ValueError, match="eigs_b contains NaN"):
        wasserstein([1.0], [np.nan])
    with pytest.raises(ValueError, match="p must be"):
        wasserstein([1.0], [2.0], p=0.5)


def _per_pair(spectra, p=1):
    n = len(spectra)
    return np.array([[wasserstein(spectra[i], spectra[j], p) if i != j else 0.0 for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("n", [1, 3, 4, 6, 10])
def test_pairwise_kernel_equals_per_pair_calls(n, rng):
    spectra = [cplx(rng, n) for _ in range(25)]
    # ties and conjugate pairs, as real spectra have
    spectra.append(np.repeat(spectra[0][:1], n))
    half = cplx(rng, (n + 1) // 2)
    spectra.append(np.concatenate([half, half.conj()])[:n])
    spectra.append(spectra[3] + 1e-9)  # nearly identical to another one (fast path)
    for p in (1, 2):
        got = pairwise_wasserstein(spectra, p)
        ref = _per_pair(spectra, p)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
        assert np.array_equal(got, got.T)
        assert np.all(np.diag(got) == 0)


def test_pairwise_and_block_with_mixed_sizes(rng):
    sizes = [2, 5, 10, 10, 3, 7, 10, 1, 23, 10, 4]
    spectra = [cplx(rng, s) for s in sizes]
    got = pairwise_wasserstein(spectra)
    np.testing.assert_allclose(got, _per_pair(spectra), rtol=0, atol=1e-10)
    block = wasserstein_block(spectra[:4], spectra[4:])
    np.testing.assert_allclose(block, got[:4, 4:], rtol=0, atol=1e-10)
    assert block.shape == (4, len(sizes) - 4)
    # an (N, n) array is accepted as N spectra
    arr = cplx(rng, 40).reshape(8, 5)
    np.testing.assert_allclose(pairwise_wasserstein(arr), _per_pair(list(arr)), atol=1e-12)


def test_batch_solver_path_mixes_easy_and_hard_problems(rng):
    """Problems settled by the row-minimum shortcut and by the solver, in one batch."""
    a = cplx(rng, 500 * 8).reshape(-1, 8)
    b = cplx(rng, a.size).reshape(a.shape)
    b[:200] = a[:200, ::-1] + 1e-3 * cplx(rng, 200 * 8).reshape(200, 8)  # near-permutations: easy
    cost = K._cost(a, b, 1.0)
    easy = np.all(np.sort(cost.argmin(axis=2), axis=1) == np.arange(8), axis=1)
    assert easy[:200].all() and easy[200:].mean() < 0.2
    got = K._w_equal_batch(a, b, 1.0)
    ref = np.array([wasserstein(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 10, 17])
def test_compiled_batch_solver_equals_scipy(n, rng):
    """raydyn/_ext/assignment.c against scipy's linear_sum_assignment: random costs, integer costs with
    many ties, all-equal costs, and one problem with a zero-cost perfect matching."""
    if K._batched_assignment is None:
        pytest.skip("the C extension was not built (no compiler at install); scipy is used instead")
    cost = rng.random((300, n, n))
    cost[100:200] = np.round(cost[100:200] * 3)
    cost[200] = 1.0
    cost[201] = 1.0 + rng.random((n, n))
    cost[201][np.arange(n), rng.permutation(n)] = 0.0
    out = np.empty(len(cost))
    K._batched_assignment(cost, out, n)
    ref = np.array([c[linear_sum_assignment(c)].sum() for c in cost])
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)
    assert out[201] == 0.0
    with pytest.raises(TypeError, match="float64"):
        K._batched_assignment(cost.astype(np.float32), out, n)
    with pytest.raises(ValueError, match="len\\(out\\) \\* n \\* n"):
        K._batched_assignment(cost, np.empty(3), n)


def test_scipy_fallback_gives_the_same_distances(rng, monkeypatch):
    a = cplx(rng, 400 * 10).reshape(-1, 10)
    b = cplx(rng, a.size).reshape(a.shape)
    fast = K._w_equal_batch(a, b, 1.0)
    monkeypatch.setattr(K, "_batched_assignment", None)
    slow = K._w_equal_batch(a, b, 1.0)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- permutation test


def noisy_spectra(eigs, n_seeds, rng, noise=0.02, t=60):
    """One spectrum per seed: DMD of a noisy trajectory of the linear system."""
    a = system_with(eigs, rng)
    out = []
    for _ in range(n_seeds):
        traj = run(a, rng.normal(size=a.shape[0]), t)
        out.append(spectrum(traj + noise * rng.normal(size=traj.shape), 0))
    return out


def test_permutation_test_detects_different_systems(rng):
    sa = noisy_spectra([0.9 * np.exp(0.3j), 0.5], 6, rng)
    sb = noisy_spectra([0.9 * np.exp(0.6j), 0.5], 6, rng)
    res = conjugacy_test(sa, sb, n_permutations=2000, random_state=1)
    print(f"different systems: stat={res.statistic:.4f} effect={res.effect_size:.2f} p={res.p_value:.4g}")
    assert res.exact  # C(12, 6) = 924 <= 2000 relabellings, all enumerated
    assert res.p_value <= 2 / 924 + 1e-12  # observed labelling and its mirror are the extremes
    assert res.statistic > 0 and res.effect_size > 1
    assert res.mean_cross > res.mean_within
    assert res.within_a.size == 15 and res.within_b.size == 15 and res.cross.size == 36
    # random relabellings with the +1 correction
    res2 = conjugacy_test(sa, sb, n_permutations=300, random_state=2)
    assert not res2.exact and res2.p_value == pytest.approx(1 / 301)


def test_permutation_test_same_system_p_values_are_not_small(rng):
    eigs = [0.9 * np.exp(0.3j), 0.5]
    pvals = []
    for _ in range(40):
        sa = noisy_spectra(eigs, 5, rng)
        sb = noisy_spectra(eigs, 5, rng)
        pvals.append(conjugacy_test(sa, sb, n_permutations=1000, random_state=rng).p_value)
    pvals = np.array(pvals)
    ks = stats.kstest(pvals, "uniform")
    print(f"same system: mean p={pvals.mean():.3f}, frac p<0.05={np.mean(pvals < 0.05):.3f}, KS p={ks.pvalue:.3f}")
    assert ks.pvalue > 0.01
    assert np.mean(pvals < 0.05) <= 0.15
    assert 0.3 < pvals.mean() < 0.7


def test_permutation_test_validation(rng):
    s = [cplx(rng, 3) for _ in range(3)]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        conjugacy_test(s[:1], s)
    with pytest.raises(ValueError, match="n_permutations"):
        conjugacy_test(s, s, n_permutations=0)


# --------------------------------------------------------------------------- classes


def test_conjugacy_classes(rng):
    groups = [noisy_spectra(e, 5, rng, noise=0.005) for e in ([0.9, 0.6], [0.9 * np.exp(1.5j)], [-0.8, -0.6])]
    spectra = [s for g in groups for s in g]
    truth = np.repeat([0, 1, 2], 5)
    d = pairwise_wasserstein(spectra)
    within = np.concatenate([d[np.ix_(truth == k, truth == k)][np.triu_indices(5, 1)] for k in range(3)])
    for labels in (
        conjugacy_classes(d, threshold="gap"),  # largest gap, on request
        conjugacy_classes(d, n_classes=3),
        conjugacy_classes(d, within_distances=within),
        conjugacy_classes(d, threshold=float(within.max()) * 1.5, method="complete"),
    ):
        assert np.array_equal(labels, truth)
    assert np.array_equal(conjugacy_classes(d, n_classes=1), np.zeros(15, dtype=int))
    with pytest.raises(ValueError, match="method"):
        conjugacy_classes(d, method="ward")
    with pytest.raises(ValueError, match="symmetric"):
        conjugacy_classes(d + np.triu(np.ones_like(d), 1))
    with pytest.raises(ValueError, match="not both"):
        conjugacy_classes(d, threshold=1.0, n_classes=2)


# --------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path, rng):
    from raydyn.plots.koopman import distance_matrix_order, plot_distance_matrix, plot_spectra

    groups = {"A": noisy_spectra([0.9 * np.exp(0.3j)], 3, rng), "B": spectrum(run(np.diag([0.5, -0.4]), np.ones(2), 10), 0)}
    f1 = tmp_path / "spectra.png"
    plot_spectra(groups, path=f1, title="spectra")
    spectra = groups["A"] + [groups["B"]]
    d = pairwise_wasserstein(spectra)
    f2 = tmp_path / "dist.png"
    plot_distance_matrix(d, labels=["a1", "a2", "a3", "b"], groups=["A", "A", "A", "B"], path=f2)
    for f in (f1, f2):
        assert f.stat().st_size > 5000
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    order, _ = distance_matrix_order(d)
    assert sorted(order) == [0, 1, 2, 3]
    assert order[0] == 3 or order[-1] == 3  # the odd one out sits at an end of the dendrogram
    # spread-out spectra: one panel; eigenvalues clustered near 1 get a second, zoomed panel framing them
    assert len(plot_spectra(groups).axes) == 1
    near_one = {"A": np.array([1.01 + 0.02j, 1.01 - 0.02j, 0.99]), "B": np.array([1.03, 0.995 + 0.01j, 0.995 - 0.01j])}
    fig = plot_spectra(near_one)
    assert len(fig.axes) == 2
    (x0, x1), (y0, y1) = fig.axes[1].get_xlim(), fig.axes[1].get_ylim()
    assert 0.98 < x0 < 0.99 and 1.03 < x1 < 1.05 and -0.04 < y0 < -0.02 and 0.02 < y1 < 0.04


# --------------------------------------------------------------------------- issue 15


def _rank4_in_30(rng, n_traj: int = 5, t: int = 100) -> tuple[list[np.ndarray], np.ndarray]:
    """A rank-4 linear system (eigenvalues 0.99, 0.95, 0.9 e^{+-0.3i}) seen through an isometric 30-D embedding."""
    eigs = np.array([0.99, 0.95, 0.9 * np.exp(0.3j), 0.9 * np.exp(-0.3j)])
    a = np.zeros((4, 4))
    a[0, 0], a[1, 1] = 0.99, 0.95
    a[2:, 2:] = rot(0.9, 0.3)
    q = np.linalg.qr(rng.normal(size=(30, 4)))[0]
    return [3.0 * run(a, rng.normal(size=4), t) @ q.T for _ in range(n_traj)], eigs


def test_float32_snapshots_get_float32_rank_cutoff(rng):
    # float32 rounding noise used to count as dynamics: numerical rank 90 of 90 (2 delays x 30
    # dims) and W = 0.96 to the true spectrum; the cutoff now follows the snapshots' precision.
    trajs, truth = _rank4_in_30(rng)
    f64 = fit_dmd(trajs, 2)
    f32 = fit_dmd([x.astype(np.float32) for x in trajs], 2)
    forced = fit_dmd([x.astype(np.float32).astype(np.float64) for x in trajs], 2)  # cast first: float64 cutoff
    print(f"rank float64 {f64.numerical_rank}, float32 {f32.numerical_rank}, cast-then-fit {forced.numerical_rank}; "
          f"W float32 {wasserstein(f32.eigenvalues, truth):.2e}, cast {wasserstein(forced.eigenvalues, truth):.2f}")
    assert f64.numerical_rank == 4 and wasserstein(f64.eigenvalues, truth) < 1e-10
    assert f32.numerical_rank == 4 and f32.eps == np.finfo(np.float32).eps
    assert wasserstein(f32.eigenvalues, truth) < 1e-5
    assert forced.numerical_rank > 80  # what casting before the fit does
    # precision= overrides the dtype: float64 arrays that hold float32 values
    again = fit_dmd([x.astype(np.float32).astype(np.float64) for x in trajs], 2, precision="float32")
    assert again.numerical_rank == 4
    np.testing.assert_allclose(np.sort_complex(spectrum([x.astype(np.float32) for x in trajs], 2)),
                               np.sort_complex(again.eigenvalues), atol=1e-12)
    assert fit_dmd(trajs, 2, precision=1e-7).numerical_rank == 4
    for bad in ("int8", 2.0, True):
        with pytest.raises(ValueError, match="precision"):
            fit_dmd(trajs, 2, precision=bad)


def test_continuous_distance_wraps_imaginary_parts():
    # lambda = -0.5 +- 1e-7 i against two reals at -0.5: discretely 1e-7 apart; log lambda puts
    # them on either side of the branch cut, 2 pi apart in the imaginary part, and the plain
    # continuous W was pi. Wrapped into (-pi/dt, pi/dt] they are 2e-7 apart (d log = d lambda / lambda).
    a = np.array([-0.5 + 1e-7j, -0.5 - 1e-7j])
    b = np.array([-0.5 + 0j, -0.5 + 0j])
    dt = 10.0
    ca, cb = np.log(a) / dt, np.log(b.astype(complex)) / dt
    assert wasserstein(a, b) == pytest.approx(1e-7, rel=1e-6)
    assert wasserstein(ca, cb) == pytest.approx(np.pi / dt, rel=1e-6)  # unwrapped: the old value
    period = 2 * np.pi / dt
    assert wasserstein(ca, cb, imag_period=period) == pytest.approx(2e-7 / dt, rel=1e-5)
    d = pairwise_wasserstein([ca, cb, ca], imag_period=period)
    assert d[0, 1] == pytest.approx(2e-7 / dt, rel=1e-5) and d[0, 2] == 0
    blk = wasserstein_block([ca], [cb, ca], imag_period=period)
    np.testing.assert_allclose(blk, d[:1, 1:], rtol=1e-12)
    # per-spectrum periods: a pair is wrapped with the smaller one (the coarser sampling)
    d2 = pairwise_wasserstein([ca, cb], imag_period=[period, np.inf])
    assert d2[0, 1] == pytest.approx(2e-7 / dt, rel=1e-5)
    assert pairwise_wasserstein([ca, cb], imag_period=[np.inf, np.inf])[0, 1] == pytest.approx(np.pi / dt)
    # far from the cut nothing changes
    x, y = np.log(np.array([0.9 * np.exp(0.3j)])), np.log(np.array([0.8 * np.exp(-0.2j)]))
    assert wasserstein(x, y, imag_period=2 * np.pi) == pytest.approx(wasserstein(x, y), rel=1e-12)
    with pytest.raises(ValueError, match="imag_period"):
        wasserstein(ca, cb, imag_period=-1.0)
    with pytest.raises(ValueError, match="2 periods but there are 3 spectra"):
        pairwise_wasserstein([ca, cb, ca], imag_period=[1.0, 2.0])


def test_one_system_is_one_class_by_default(rng):
    # Six seed-groups of one system, pairwise W 2e-4 to 1e-3: the largest-gap cut used to split
    # them into classes [0 1 2 0 1 1]; without a scale to compare against they are one class.
    base = full_spectrum([0.9 * np.exp(0.3j), 0.5, 0.2])
    spectra = [base + 4e-4 * (rng.normal(size=4) + 1j * rng.normal(size=4)) for _ in range(6)]
    d = pairwise_wasserstein(spectra)
    off = d[np.triu_indices(6, 1)]
    print(f"one system: W {off.min():.1e}..{off.max():.1e}; gap cut {conjugacy_classes(d, threshold='gap')}")
    assert len(set(conjugacy_classes(d, threshold="gap").tolist())) >= 2  # what the old default did
    assert conjugacy_classes(d).tolist() == [0] * 6
    # seed-to-seed distances as the scale: mean + 3 SD keeps one system together ...
    assert conjugacy_classes(d, within_distances=off).tolist() == [0] * 6
    assert seed_threshold(off) == pytest.approx(off.mean() + 3 * off.std(ddof=1))
    # ... and separates a different one
    shifted = full_spectrum([0.9 * np.exp(0.32j), 0.5, 0.2])  # 0.018 from the first
    other = [shifted + 4e-4 * (rng.normal(size=4) + 1j * rng.normal(size=4)) for _ in range(3)]
    d2 = pairwise_wasserstein(spectra + other)
    labels = conjugacy_classes(d2, within_distances=off)
    assert labels[:6].tolist() == [0] * 6 and 0 not in labels[6:]
    with pytest.raises(ValueError, match="at least 2 finite seed-to-seed distances"):
        conjugacy_classes(d, within_distances=off[:1])
    with pytest.raises(ValueError, match="'gap'"):
        conjugacy_classes(d, threshold="largest")


def test_permutation_test_reports_its_floor(rng):
    sa = noisy_spectra([0.9 * np.exp(0.3j), 0.5], 2, rng)
    sb = noisy_spectra([0.5 * np.exp(1.3j), -0.5], 2, rng)  # very different systems, 2 seeds each
    with pytest.warns(UserWarning, match=r"smallest attainable p-value is 0.333 .*n = 4 each reaches 0.05"):
        res = conjugacy_test(sa, sb)
    assert res.p_floor == pytest.approx(2 / math.comb(4, 2)) and res.p_value == pytest.approx(1 / 3)
    for n, floor in ((3, 0.1), (4, 2 / 70), (5, 2 / 252)):
        a = noisy_spectra([0.9 * np.exp(0.3j), 0.5], n, rng)
        b = noisy_spectra([0.5 * np.exp(1.3j), -0.5], n, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("error" if floor <= 0.05 else "ignore")
            r = conjugacy_test(a, b)
        assert r.p_floor == pytest.approx(floor) and r.p_value == pytest.approx(floor)
    a3 = noisy_spectra([0.9 * np.exp(0.3j), 0.5], 3, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = conjugacy_test(a3, noisy_spectra([0.5 * np.exp(1.3j), -0.5], 4, rng))
    assert r.p_floor == pytest.approx(1 / math.comb(7, 3))  # unequal sizes: no mirror labelling
    a4 = noisy_spectra([0.9 * np.exp(0.3j), 0.5], 4, rng)
    with pytest.warns(UserWarning, match="0.0909"):
        r = conjugacy_test(a4, a4, n_permutations=10, random_state=0)  # random relabellings: 1 / (1 + n)
    assert not r.exact and r.p_floor == pytest.approx(1 / 11)
