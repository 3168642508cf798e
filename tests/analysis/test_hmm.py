"""HMM training maps: recovery of a known HMM, BIC bookkeeping, training map, detours."""
from __future__ import annotations

import math
import os
import random

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import pytest
from hmmlearn.hmm import GaussianHMM
from scipy import stats
from sklearn.metrics import adjusted_rand_score

from raydyn.analysis.hmm import (
    HMMResult,
    convergence_steps,
    detour_analysis,
    fit_hmm,
    fit_one,
    fit_plan,
    n_free_parameters,
    prepare,
    select,
    training_map,
    zscore_runs,
)

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "0"))
print(f"test_hmm: RAYDYN_TEST_SEED={SEED}")

MEANS = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, -3.0], [0.0, 5.0, 3.0]])


def _true_hmm(stay: float) -> GaussianHMM:
    """3-state, 3-feature Gaussian HMM that always starts in state 0."""
    m = GaussianHMM(3, covariance_type="full", init_params="")
    m.startprob_ = np.array([1.0, 0.0, 0.0])
    off = (1 - stay) * np.array([[0, 0.625, 0.375], [0.375, 0, 0.625], [0.625, 0.375, 0]])
    m.transmat_ = off + stay * np.eye(3)
    m.means_ = MEANS
    m.covars_ = np.stack([np.eye(3)] * 3)
    return m


def _sample(stay: float, n_runs: int = 8, length: int = 300, seed: int = SEED):
    model = _true_hmm(stay)
    xs, zs = [], []
    for i in range(n_runs):
        x, z = model.sample(length, random_state=10_000 * seed + i)
        xs.append(x)
        zs.append(z)
    return xs, zs


@pytest.fixture(scope="module")
def known():
    """Fast-mixing chain: each run visits every state ~100 times, so per-run z-scoring
    barely moves the state means between runs."""
    xs, zs = _sample(stay=0.6)
    res = fit_hmm(xs, max_states=5, restarts=3, random_state=SEED, feature_names=["a", "b", "c"])
    return xs, zs, res


# --------------------------------------------------------------------------- recovery


def test_bic_selects_three_states_and_decoding_matches_truth(known):
    xs, zs, res = known
    assert res.n_states == 3
    assert min(res.bic, key=res.bic.get) == 3
    assert sorted(res.bic) == [1, 2, 3, 4, 5]
    ari = adjusted_rand_score(np.concatenate(zs), np.concatenate(res.states))
    print(f"ARI={ari:.4f} BIC={res.bic}")
    assert ari > 0.9
    # one decoded sequence per input run, in input order
    assert [len(s) for s in res.states] == [len(x) for x in xs]
    # held-out runs are better explained by 3 states than by 1
    assert res.heldout_loglik[3] > res.heldout_loglik[1] + 0.5
    assert len(res.heldout_index) == 2 and len(res.train_index) == 6


def test_canonical_labels_follow_first_visit(known):
    _, zs, res = known
    # every run starts in true state 0, so canonical state 0 is the true state 0
    assert all(s[0] == 0 for s in res.states)
    assert res.startprob[0] == pytest.approx(1.0, abs=1e-6)
    # decoded labels map one-to-one onto the true labels (majority vote per decoded state)
    z, s = np.concatenate(zs), np.concatenate(res.states)
    mapping = [np.bincount(z[s == k], minlength=3).argmax() for k in range(3)]
    assert sorted(mapping) == [0, 1, 2]
    np.testing.assert_allclose(res.transmat.sum(axis=1), 1.0)
    assert res.means.shape == (3, 3) and res.covars.shape == (3, 3, 3)


def test_split_pipeline_equals_fit_hmm_and_labels_ignore_fit_order():
    xs, _ = _sample(stay=0.6, n_runs=5, length=120, seed=SEED + 3)
    res = fit_hmm(xs, max_states=4, restarts=2, random_state=SEED, feature_names=["a", "b", "c"])
    data = prepare(xs, held_out=0.2, random_state=SEED, feature_names=["a", "b", "c"])
    fits = [fit_one(data.train_sequences, k, s, "full") for k, s in fit_plan(4, 2, SEED)]
    random.Random(1).shuffle(fits)
    again = select(data, fits)
    assert again.n_states == res.n_states == 3
    assert again.bic == res.bic
    for a, b in zip(again.states, res.states):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(again.means, res.means)
    # BIC is hmmlearn's own bic() of the best restart per k, on the training runs
    x = np.concatenate(data.train_sequences)
    lengths = [len(s) for s in data.train_sequences]
    for k in (1, 2, 3, 4):
        best = max((f for f in fits if f.n_states == k), key=lambda f: f.loglik)
        assert res.bic[k] == pytest.approx(best.to_model().bic(x, lengths), rel=1e-9)
        assert res.train_loglik[k] == pytest.approx(best.loglik)


def test_sticky_chain_recovered_with_global_standardization():
    # Sticky states + short runs: per-run z-scores shift state means between runs (Hu et
    # al.'s default); pooled standardization keeps the HMM exact.
    xs, zs = _sample(stay=0.9, seed=SEED + 1)
    res = fit_hmm(xs, max_states=4, restarts=2, random_state=SEED, standardize="global")
    assert res.n_states == 3
    assert adjusted_rand_score(np.concatenate(zs), np.concatenate(res.states)) > 0.95


def test_parameter_count_matches_hmmlearn():
    for cov in ("full", "diag"):
        for k, f in [(1, 1), (2, 3), (4, 5)]:
            m = GaussianHMM(k, covariance_type=cov)
            m.n_features = f
            assert n_free_parameters(k, f, cov) == sum(m._get_n_fit_scalars_per_param().values())


def test_diag_covariance_and_determinism():
    xs, zs = _sample(stay=0.6, n_runs=5, length=200, seed=SEED + 2)
    a = fit_hmm(xs, max_states=4, restarts=2, covariance_type="diag", random_state=7)
    b = fit_hmm(xs, max_states=4, restarts=2, covariance_type="diag", random_state=7)
    assert a.n_states == 3 and a.covariance_type == "diag"
    assert a.bic == b.bic
    for sa, sb in zip(a.states, b.states):
        np.testing.assert_array_equal(sa, sb)
    # diag covars come back in full form with zero off-diagonals
    off = a.covars - np.stack([np.diag(np.diag(c)) for c in a.covars])
    assert np.all(off == 0)


# --------------------------------------------------------------------------- z-scoring / inputs


def test_constant_features_give_zeros_not_nan():
    rng = np.random.default_rng(SEED)
    xs = [np.column_stack([rng.normal(size=50), np.full(50, 3.7), np.full(50, 0.1 * i)]) for i in range(4)]
    for z in zscore_runs(xs, "run"):
        assert np.isfinite(z).all()
        assert np.all(z[:, 1:] == 0.0)
        assert z[:, 0].mean() == pytest.approx(0.0, abs=1e-12)
        assert z[:, 0].std() == pytest.approx(1.0, rel=1e-12)
    g = zscore_runs(xs, "global")
    assert np.all(np.concatenate(g)[:, 1] == 0.0)
    assert np.isfinite(np.concatenate(g)).all()
    res = fit_hmm(xs, max_states=2, restarts=1, random_state=0)
    for arr in (res.means, res.covars, res.transmat, *res.bic.values(), *res.heldout_loglik.values()):
        assert np.isfinite(arr).all()


def test_bad_inputs_raise_naming_the_problem():
    good = [np.zeros((10, 3)), np.ones((12, 3))]
    with pytest.raises(ValueError, match="sequences is empty"):
        fit_hmm([])
    with pytest.raises(ValueError, match=r"sequences\[1\] has F=2 .* F=3"):
        fit_hmm([np.zeros((10, 3)), np.zeros((10, 2))])
    with pytest.raises(ValueError, match="max_states=0"):
        fit_hmm(good, max_states=0)
    with pytest.raises(ValueError, match="restarts"):
        fit_hmm(good, restarts=0)
    with pytest.raises(ValueError, match="covariance_type='spherical'.*full"):
        fit_hmm(good, covariance_type="spherical")
    with pytest.raises(ValueError, match="held_out=1.0"):
        fit_hmm(good, held_out=1.0)
    with pytest.raises(ValueError, match=r"sequences\[0\] has shape \(10,\)"):
        fit_hmm([np.zeros(10)])
    with pytest.raises(ValueError, match="non-finite value at time 2, feature 1"):
        bad = np.zeros((5, 2))
        bad[2, 1] = np.nan
        fit_hmm([bad])
    with pytest.raises(ValueError, match="feature_names has 2 names"):
        fit_hmm(good, feature_names=["a", "b"])
    with pytest.raises(ValueError, match="standardize='zz'"):
        fit_hmm(good, standardize="zz")
    with pytest.raises(ValueError, match="fits is empty"):
        select(prepare(good, random_state=0), [])
    with pytest.raises(ValueError, match="k=30 states but only 22"):
        fit_one(good, 30, 0)


# --------------------------------------------------------------------------- training map


def _hand_result(states: list[list[int]], k: int) -> HMMResult:
    """A result with hand-set states/means; transmat rows = (i + j + 1) normalised."""
    t = np.array([[i + j + 1.0 for j in range(k)] for i in range(k)])
    means = np.array([[0.0, 0.0, 0.0], [1.0, -3.0, 0.5], [1.0, -3.0, 2.5]])[:k]
    return HMMResult(
        n_states=k,
        covariance_type="full",
        bic={k: 0.0},
        train_loglik={k: 0.0},
        heldout_loglik={},
        states=[np.array(s) for s in states],
        transmat=t / t.sum(axis=1, keepdims=True),
        startprob=np.eye(k)[0],
        means=means,
        covars=np.stack([np.eye(3)] * k),
        feature_names=("l1", "l2", "var"),
        train_index=np.arange(len(states)),
        heldout_index=np.array([], dtype=int),
        fit=None,
        order=np.arange(k),
        sequences=(),
    )


def test_training_map_counts_edges_and_feature_ranking():
    res = _hand_result([[0, 0, 1, 1, 2], [0, 1, 2, 2, 2], [0, 0, 0, 2, 1], [1, 1, 1, 1, 1]], k=3)
    tm = training_map(res)
    assert [(e.src, e.dst) for e in tm.edges] == [(0, 1), (0, 2), (1, 2), (2, 1)]  # no self-loops
    e01 = tm.edge(0, 1)
    assert (e01.count, e01.n_runs) == (2, 2)
    assert tm.edge(1, 2).count == 2 and tm.edge(0, 2).count == 1 and tm.edge(2, 1).count == 1
    assert e01.prob == pytest.approx(res.transmat[0, 1])
    np.testing.assert_allclose(e01.feature_change, [1.0, -3.0, 0.5])
    assert [n for n, _ in e01.ranked_features] == ["l2", "l1", "var"]
    assert e01.ranked_features[0][1] == -3.0  # signed, z-units
    assert [n for n, _ in tm.edge(1, 2).ranked_features][0] == "var"
    occ = [n.occupancy for n in tm.nodes]
    assert occ == pytest.approx([6 / 20, 9 / 20, 5 / 20])
    assert [n.run_fraction for n in tm.nodes] == [0.75, 1.0, 0.75]
    assert [n.start_fraction for n in tm.nodes] == [0.75, 0.25, 0.0]
    assert [(e.src, e.dst) for e in training_map(res, min_count=2).edges] == [(0, 1), (1, 2)]
    with pytest.raises(KeyError):
        tm.edge(1, 0)
    with pytest.raises(ValueError, match="min_count=0"):
        training_map(res, min_count=0)


def test_training_map_on_fitted_result_only_has_observed_transitions(known):
    _, _, res = known
    tm = training_map(res)
    seen = {(a, b) for s in res.states for a, b in zip(s[:-1], s[1:]) if a != b}
    assert {(e.src, e.dst) for e in tm.edges} == seen
    assert sum(n.occupancy for n in tm.nodes) == pytest.approx(1.0)


def test_plot_training_map_writes_png(known, tmp_path):
    from raydyn.plots.hmm import plot_training_map

    _, _, res = known
    out = tmp_path / "sub" / "map.png"
    plot_training_map(training_map(res), out, title="known 3-state HMM")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    tm = training_map(res)
    fig = plot_training_map(tm, detours=[1], max_labels=1)
    ax = fig.axes[0]
    rings = {round(p.get_linewidth(), 1) for p in ax.patches if isinstance(p, plt.Circle)}
    assert rings == {1.0, 3.0}  # one red-ringed detour state among plain ones
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["detour state 1"]
    edge_labels = [t for t in ax.texts if t.get_text().startswith("p=")]
    assert len(tm.edges) > 1 and len(edge_labels) == 1  # only the most-travelled edge is labelled
    plt.close(fig)


# --------------------------------------------------------------------------- convergence / detours


def test_convergence_steps_by_hand():
    loss = [np.array([3.0, 2.0, 0.5, 0.4]), np.array([3.0, 0.9, 0.1]), np.array([5.0, 4.0, 3.0, 2.0, 1.5])]
    np.testing.assert_array_equal(convergence_steps(loss, 1.0, "below"), [2, 1, 5])  # never -> max length 5
    acc = [np.array([0.1, 0.5, 0.9, 0.95]), np.array([0.2, np.nan, 0.91])]
    np.testing.assert_array_equal(convergence_steps(acc, 0.9, "above"), [3, 2])  # strict >, NaN never crosses
    steps = np.array([0, 10, 20, 30, 40])
    np.testing.assert_array_equal(convergence_steps(loss, 1.0, steps=steps), [20, 10, 50])
    per_run = [np.array([5, 6, 7, 8]), np.array([0, 100, 200]), np.arange(5) * 10]
    np.testing.assert_array_equal(convergence_steps(loss, 1.0, steps=per_run), [7, 100, 300])
    with pytest.raises(ValueError, match="mode='up'"):
        convergence_steps(loss, 1.0, "up")
    with pytest.raises(ValueError, match="metric_sequences is empty"):
        convergence_steps([], 1.0)
    with pytest.raises(ValueError, match="runs \\[0\\]"):
        convergence_steps(loss, 1.0, steps=[np.arange(3), np.arange(3), np.arange(5)])


def _planted(n_runs: int = 40, delay: float = 60.0, seed: int = SEED):
    """States 0 and 3 obligatory; visiting state 1 (the detour) adds `delay` steps; state 2
    is visited by half the runs with and half without state 1, and has no effect; state 4
    is never visited."""
    rng = np.random.default_rng(seed)
    v1 = rng.random(n_runs) < 0.4
    v2 = np.zeros(n_runs, dtype=bool)
    for group in (np.flatnonzero(v1), np.flatnonzero(~v1)):
        v2[rng.permutation(group)[: len(group) // 2]] = True
    states = [np.array([0] * 5 + [1] * (4 * int(a)) + [2] * (3 * int(b)) + [3] * 5) for a, b in zip(v1, v2)]
    conv = 200.0 + rng.normal(0, 20, n_runs) + delay * v1
    return states, conv, v1, v2


def test_detour_detection_on_planted_data():
    states, conv, v1, v2 = _planted()
    d = detour_analysis(states, conv, n_states=5)
    ref1 = stats.pearsonr(v1.astype(float), conv)
    ref2 = stats.pearsonr(v2.astype(float), conv)
    print(f"detour r={d.r[1]:.3f} p={d.p[1]:.2e}; no-effect r={d.r[2]:.3f} p={d.p[2]:.3f}")
    assert d.r[1] == pytest.approx(ref1.statistic, rel=1e-12)
    assert d.p[1] == pytest.approx(ref1.pvalue, rel=1e-9)
    assert d.r[2] == pytest.approx(ref2.statistic, rel=1e-12)
    assert d.p[2] == pytest.approx(ref2.pvalue, rel=1e-9)
    assert d.r[1] > 0.5 and d.p[1] < 1e-4
    # point-biserial and the reference code's t-statistic formula agree for r > 0
    assert d.r[1] == pytest.approx(stats.pointbiserialr(v1, conv).statistic, rel=1e-12)
    t = d.r[1] * math.sqrt(len(conv) - 2) / math.sqrt(1 - d.r[1] ** 2)
    assert d.p[1] == pytest.approx(2 * stats.t.sf(t, len(conv) - 2), rel=1e-6)
    assert d.detour[[0, 1, 3, 4]].tolist() == [False, True, False, False]
    assert d.detour_states.tolist() in ([1], [1, 2])  # state 2 only by chance (null p ~ uniform)
    assert d.obligatory.tolist() == [True, False, False, True, False]
    assert d.defined.tolist() == [False, True, True, False, False]
    assert np.isnan(d.r[[0, 3, 4]]).all() and np.isnan(d.p[[0, 3, 4]]).all()
    assert d.visit_fraction[4] == 0.0 and d.visit_fraction[0] == 1.0
    assert d.mean_convergence_visited[1] - d.mean_convergence_not_visited[1] == pytest.approx(
        conv[v1].mean() - conv[~v1].mean()
    )


def test_detour_no_effect_gives_large_p():
    # Each convergence time appears twice, once in a run that visits state 1 and once in a
    # run that does not: no association by construction, so r = 0 and p = 1.
    rng = np.random.default_rng(SEED)
    base = 200.0 + rng.normal(0, 20, 20)
    conv = np.concatenate([base, base])
    states = [np.array([0, 1, 2])] * 20 + [np.array([0, 2])] * 20
    d = detour_analysis(states, conv)
    assert abs(d.r[1]) < 1e-12 and d.p[1] == pytest.approx(1.0)
    assert not d.detour.any()


def test_detour_false_positive_rate_under_null_is_about_alpha_over_two():
    # With no effect the p-value is uniform, and a detour also needs r > 0: ~2.5% at 5%.
    rng = np.random.default_rng(SEED + 100)
    calls = []
    for _ in range(1000):
        v = rng.random(30) < 0.5
        states = [np.array([0, 1]) if a else np.array([0]) for a in v]
        calls.append(detour_analysis(states, rng.normal(size=30)).detour[1])
    rate = float(np.mean(calls))
    print(f"null detour rate={rate:.3f}")
    assert 0.012 < rate < 0.045


def test_detour_shortcut_is_not_a_detour():
    states, conv, _, _ = _planted(delay=-60.0)  # visiting state 1 speeds training up
    d = detour_analysis(states, conv)
    assert d.r[1] < -0.5 and d.p[1] < 1e-4 and not d.detour[1]


def test_detour_bad_inputs():
    s = [np.array([0, 1]), np.array([0]), np.array([1])]
    with pytest.raises(ValueError, match="states is empty"):
        detour_analysis([], np.array([]))
    with pytest.raises(ValueError, match="convergence has shape"):
        detour_analysis(s, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="at least 3 runs"):
        detour_analysis(s[:2], np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        detour_analysis(s, np.array([1.0, np.inf, 2.0]))
    with pytest.raises(ValueError, match="label 1 but n_states=1"):
        detour_analysis(s, np.array([1.0, 2.0, 3.0]), n_states=1)
    d = detour_analysis(s, np.array([5.0, 5.0, 5.0]))  # constant convergence: r undefined
    assert not d.defined.any() and not d.detour.any()


# --------------------------------------------------------------------------- issue 15: defaults that are right


def _sticky4(n_runs: int = 30, length: int = 200, seed: int = SEED, scale: float = 1.0):
    """Known 4-state, 3-feature Gaussian HMM, self-transition 0.9, unit covariances."""
    m = GaussianHMM(4, covariance_type="full", init_params="")
    m.startprob_ = np.array([1.0, 0.0, 0.0, 0.0])
    t = np.full((4, 4), 0.1 / 3)
    np.fill_diagonal(t, 0.9)
    m.transmat_ = t
    m.means_ = np.array([[0.0, 0.0, 0.0], [3.0, 0.0, -2.0], [0.0, 3.0, 2.0], [-3.0, -2.0, 0.0]])
    m.covars_ = np.stack([np.eye(3)] * 4)
    xs, zs = [], []
    for i in range(n_runs):
        x, z = m.sample(length, random_state=7_000 * seed + i)
        xs.append(x * scale)
        zs.append(z)
    return xs, zs


def test_default_standardization_recovers_a_sticky_four_state_hmm():
    # Per-run z-scores (Hu et al.'s choice, formerly the default) give every run its own offset
    # per state when occupancies differ, and BIC bought 5-6 states for them (ARI 0.92 at 6);
    # the default now pools the mean/std over the training runs: 4 states.
    xs, zs = _sticky4()
    res = fit_hmm(xs, max_states=5, restarts=2, random_state=SEED)
    ari = adjusted_rand_score(np.concatenate(zs), np.concatenate(res.states))
    print(f"default standardize: k={res.n_states} ARI={ari:.3f}")
    assert res.n_states == 4
    assert ari > 0.95


def test_pooled_standardization_uses_training_runs_only():
    xs, _ = _sticky4(n_runs=10, length=50)
    data = prepare(xs, held_out=0.2, random_state=SEED)
    assert len(data.heldout_index) == 2
    moved = [x * 100.0 + 50.0 if i in set(data.heldout_index.tolist()) else x for i, x in enumerate(xs)]
    again = prepare(moved, held_out=0.2, random_state=SEED)
    np.testing.assert_array_equal(again.train_index, data.train_index)
    for a, b in zip(again.train_sequences, data.train_sequences):  # held-out runs leave the scaling alone
        np.testing.assert_array_equal(a, b)
    pooled = np.concatenate(data.train_sequences)
    np.testing.assert_allclose(pooled.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(pooled.std(axis=0), 1.0, rtol=1e-12)
    # held-out runs are mapped with the training runs' statistics (not their own)
    x_tr = np.concatenate([xs[i] for i in data.train_index])
    h = data.heldout_index[0]
    np.testing.assert_allclose(data.sequences[h], (xs[h] - x_tr.mean(0)) / x_tr.std(0), rtol=1e-12)


def test_covariance_prior_scales_with_raw_features():
    # Raw features of scale 1e-3 (variance 1e-6): a fixed prior of 1e-2 swamped them (ARI ~ 0,
    # variances of 1e55, or EM breaking down); 1e-2 x the pooled variance does not.
    xs, zs = _sample(stay=0.6, n_runs=8, length=300)
    small = [x * 1e-3 for x in xs]
    res = fit_hmm(small, max_states=4, restarts=2, random_state=SEED, standardize="none")
    ari = adjusted_rand_score(np.concatenate(zs), np.concatenate(res.states))
    variances = np.concatenate([np.diag(c) for c in res.covars])
    print(f"raw 1e-3 features: k={res.n_states} ARI={ari:.3f} variances {variances.min():.2e}..{variances.max():.2e}")
    assert res.n_states == 3 and ari > 0.9
    np.testing.assert_allclose(variances, 1e-6, rtol=0.35)


def test_fit_one_reports_a_broken_restart_instead_of_raising():
    xs, _ = _sample(stay=0.6, n_runs=3, length=40)
    f = fit_one([x * 1e-150 for x in xs], 3, 0)  # underflowing variances: EM cannot work
    assert f.n_states == 3 and (f.loglik == -math.inf or np.isfinite(f.loglik))


def test_adjusted_pvalues_equal_holm_and_benjamini_hochberg_by_hand():
    from raydyn.analysis.hmm import adjust_pvalues

    p = np.array([0.01, 0.04, 0.03, np.nan, 0.005])
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, np.nan, 0.02], rtol=1e-12)
    finite = np.isfinite(p)
    bh = adjust_pvalues(p, "bh")
    np.testing.assert_allclose(bh[finite], stats.false_discovery_control(p[finite], method="bh"), rtol=1e-12)
    np.testing.assert_allclose(bh[finite], [0.02, 0.04, 0.04, 0.02], rtol=1e-12)  # m p_(i) / i, running min
    assert np.isnan(bh[3])
    np.testing.assert_array_equal(adjust_pvalues(p, "none")[finite], p[finite])
    with pytest.raises(ValueError, match="correction='sidak'"):
        adjust_pvalues(p, "sidak")


def test_detours_are_called_on_adjusted_pvalues():
    # State 1 is visited more by slow runs (raw p = 0.028); states 2-4 are visited by alternate
    # runs (no association). Four states are tested, so Holm multiplies the smallest p by 4.
    conv = np.arange(30, dtype=float)
    slow = {5, 6, 11, 12, 13, 15, 17, 22, 23, 24, 25, 26, 27, 29}
    states = [np.array([0] + [1] * (i in slow) + [2 + i % 3]) for i in range(30)]
    raw = detour_analysis(states, conv, correction="none")
    holm = detour_analysis(states, conv)
    ref = stats.pearsonr(np.array([i in slow for i in range(30)], dtype=float), conv)
    assert raw.p[1] == pytest.approx(ref.pvalue, rel=1e-9) and 0.02 < raw.p[1] < 0.05
    assert raw.detour[1]  # uncorrected: a "detour"
    assert holm.correction == "holm" and holm.defined[1:].all()
    assert holm.p_adjusted[1] == pytest.approx(min(1.0, 4 * ref.pvalue), rel=1e-9)
    assert not holm.detour.any()  # corrected for the 4 tests: none
    np.testing.assert_allclose(holm.p_adjusted[1:], adjust_pvalues_ref(holm.p[1:]), rtol=1e-12)
    bh = detour_analysis(states, conv, correction="bh")
    np.testing.assert_allclose(bh.p_adjusted[1:], stats.false_discovery_control(bh.p[1:]), rtol=1e-12)


def adjust_pvalues_ref(p: np.ndarray) -> np.ndarray:
    """Holm by the textbook loop (no numpy tricks)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 0.0
    for j, i in enumerate(order):
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return np.array(out)


def test_heldout_selection_keeps_the_best_heldout_restart_and_minimises_heldout_bic(known):
    xs, zs, _ = known
    data = prepare(xs, held_out=0.25, random_state=SEED)
    fits = [fit_one(data.train_sequences, k, s, "full") for k, s in fit_plan(5, 3, SEED)]
    res = select(data, fits, selection="heldout")
    xh = np.concatenate(data.heldout_sequences)
    lh = [len(s) for s in data.heldout_sequences]
    for k in range(1, 6):
        ours = [f for f in fits if f.n_states == k]
        scores = [f.to_model().score(xh, lh) for f in ours]
        kept = ours[int(np.argmax(scores))]
        assert res.heldout_loglik[k] == pytest.approx(max(scores) / xh.shape[0], rel=1e-9)
        assert res.heldout_bic[k] == pytest.approx(kept.to_model().bic(xh, lh), rel=1e-9)  # hmmlearn's BIC on held-out
    assert res.selection == "heldout"
    assert res.n_states == min(res.heldout_bic, key=res.heldout_bic.get) == 3
    assert adjusted_rand_score(np.concatenate(zs), np.concatenate(res.states)) > 0.9
    with pytest.raises(ValueError, match="selection='heldout' needs held-out runs"):
        select(prepare(xs, held_out=0.0, random_state=SEED), fits, selection="heldout")
    with pytest.raises(ValueError, match="selection='aic'"):
        select(data, fits, selection="aic")


def test_a_fit_runs_its_blas_and_openmp_pools_at_one_thread(monkeypatch):
    """EM's matrices are F x F: a fit limits BLAS/OpenMP to one thread (parallelism is across fits), with a
    threadpoolctl controller built once per process, and the limits are lifted again after the fit."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def pools():
        return {(i["user_api"], i["filepath"]): i["num_threads"] for i in threadpool_info()}

    seen = []
    real_fit = GaussianHMM.fit

    def fit(self, *args, **kwargs):
        seen.append(pools())
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(GaussianHMM, "fit", fit)
    data = prepare(_sample(0.9, n_runs=3, length=60)[0])
    with threadpool_limits(limits=2):  # the caller's pools at 2 threads, whatever the environment set
        before = pools()
        fit_one(data.train_sequences, 2, 0, "diag")
        fit_one(data.train_sequences, 3, 1, "diag")
        after = pools()
    assert len(seen) == 2 and seen[0], "no BLAS/OpenMP library seen during the fit"
    assert set(before.values()) == {2}, before
    for pools in seen:
        assert set(pools.values()) == {1}, pools
    assert after == before
