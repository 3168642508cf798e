"""Tests of raydyn.analysis.cmd (Correlation Mode Decomposition) on data with known answers."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from raydyn.analysis.cmd import (
    CMDResult,
    OnlineCMD,
    decompose,
    evaluate_reconstruction,
    fit_fixed_modes,
    reconstruction_trajectory,
)

pytestmark = pytest.mark.filterwarnings("error")

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "20240501"))
if "RAYDYN_TEST_SEED" in os.environ:
    print(f"test_cmd: RAYDYN_TEST_SEED={SEED}")

NOISE = 1e-3  # noise std relative to the RMS of the clean weights


def planted(n=6000, t=80, m=4, noise=NOISE, seed=SEED, dtype=np.float64):
    """w_i(t) = a_i r_{m(i)}(t) + b_i + noise with M known random-walk references."""
    rng = np.random.default_rng(seed)
    refs = np.cumsum(rng.normal(size=(m, t)), axis=1)
    labels = rng.integers(0, m, n)
    a = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)
    b = rng.normal(size=n)
    clean = a[:, None] * refs[labels] + b[:, None]
    sigma = noise * np.sqrt(np.mean(clean ** 2))
    w = clean + sigma * rng.normal(size=clean.shape)
    return w.astype(dtype), labels, refs, a, b


# ---------------------------------------------------------------- planted recovery


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_planted_modes_recovered(dtype):
    w, labels, refs, a, b = planted(dtype=dtype)
    res = decompose(w, n_modes=None, tolerance=1.5 * NOISE, n_samples=500, random_state=1)
    assert res.n_modes == 4
    assert adjusted_rand_score(labels, res.assignment) > 0.95
    # the residual is the planted noise: relative error ~ NOISE (std relative to clean RMS)
    assert 0.8 * NOISE < res.error < 1.2 * NOISE, res.error
    # fewer modes than planted cannot reach the noise level
    assert res.error_curve_modes[:4].tolist() == [1, 2, 3, 4]
    assert res.error_curve[2] > 10 * NOISE
    # curve value at the chosen M equals the directly measured error
    assert res.error_curve[res.n_modes - 1] == pytest.approx(res.error, rel=1e-7)
    # references are planted references up to an affine map (|corr| ~ 1)
    for m in range(4):
        c = np.abs(np.corrcoef(res.references[m], refs).ravel()[1:5]).max()
        assert c > 1 - 1e-5
    # each reference is a real parameter's trajectory, assigned to its own mode
    np.testing.assert_array_equal(res.references, np.asarray(w, dtype=np.float64)[res.reference_index])
    np.testing.assert_array_equal(res.assignment[res.reference_index], np.arange(4))
    assert set(res.reference_index) <= set(res.sample_index)
    assert res.layer_errors == {"all": pytest.approx(res.error, rel=1e-12)}


def test_error_curve_equals_fits_at_each_m():
    """The exact error-vs-M curve matches decompose(n_modes=M) for every M (same sample)."""
    w, *_ = planted(n=1500, t=40, m=5, noise=0.05)
    with pytest.warns(RuntimeWarning, match="no number of modes"):
        auto = decompose(w, tolerance=1e-6, n_samples=200, random_state=3)
    assert auto.n_modes == int(np.argmin(auto.error_curve)) + 1
    assert auto.error_curve_modes.tolist() == list(range(1, 51))
    for m in (1, 2, 3, 5, 8, 20):
        fixed = decompose(w, n_modes=m, n_samples=200, random_state=3)
        assert fixed.n_modes == m
        assert fixed.error == pytest.approx(auto.error_curve[m - 1], rel=1e-9)
        assert fixed.error_curve.tolist() == [fixed.error]


def test_affine_fit_is_least_squares_and_reconstruction_consistent():
    rng = np.random.default_rng(SEED + 1)
    w = np.cumsum(rng.normal(size=(300, 25)), axis=1) + rng.normal(size=(300, 1))
    res = decompose(w, n_modes=3, random_state=0)
    for i in rng.choice(300, 20, replace=False):
        r = res.references[res.assignment[i]]
        design = np.stack([r, np.ones_like(r)], axis=1)
        (ai, bi), *_ = np.linalg.lstsq(design, w[i], rcond=None)
        assert res.a[i] == pytest.approx(ai, rel=1e-9, abs=1e-12)
        assert res.b[i] == pytest.approx(bi, rel=1e-9, abs=1e-12)
    # assignment = mode whose reference has the highest |corr|
    corr = np.abs(np.corrcoef(w, res.references)[:300, 300:])
    np.testing.assert_array_equal(res.assignment, np.argmax(corr, axis=1))
    full = res.reconstruct()
    assert full.shape == (300, 25)
    direct = np.linalg.norm(w - full) / np.linalg.norm(w)
    assert res.error == pytest.approx(direct, rel=1e-12)
    np.testing.assert_allclose(res.reconstruct_at(7), full[:, 7], rtol=1e-14)
    np.testing.assert_allclose(res.reconstruct_at(-1), full[:, -1], rtol=1e-14)
    np.testing.assert_allclose(res.reconstruct([2, 5]), full[:, [2, 5]], rtol=1e-14)
    assert res.reconstruct(4).shape == (300, 1)
    assert res.reconstruct(dtype=np.float32).dtype == np.float32
    traj = list(reconstruction_trajectory(res, [0, 3, 24]))
    assert len(traj) == 3
    np.testing.assert_allclose(traj[1], full[:, 3], rtol=1e-14)
    with pytest.raises(ValueError, match="t_index"):
        res.reconstruct_at(25)


# -------------------------------------------------------------------------- layers


def test_layers_balanced_sampling_and_layer_errors():
    w, labels, *_ = planted(n=5000, t=40)
    layers = [("big", 0, 4980), ("tiny", 4980, 5000)]
    bal = decompose(w, n_modes=4, n_samples=200, random_state=0, layers=layers)
    uni = decompose(w, n_modes=4, n_samples=200, random_state=0, layers=layers, sampling="uniform")
    n_tiny_bal = int((bal.sample_index >= 4980).sum())
    n_tiny_uni = int((uni.sample_index >= 4980).sum())
    assert bal.sample_index.size == uni.sample_index.size == 200
    # balanced: equal share 200 // (2 * 2) = 50, capped by the layer size 20; uniform: ~0.8 expected
    assert n_tiny_bal == 20 and n_tiny_uni < 10
    assert set(bal.layer_errors) == {"big", "tiny"}
    full = bal.reconstruct()
    for name, (s, e) in {"big": (0, 4980), "tiny": (4980, 5000)}.items():
        direct = np.linalg.norm(w[s:e] - full[s:e]) / np.linalg.norm(w[s:e])
        assert bal.layer_errors[name] == pytest.approx(direct, rel=1e-10)
    frac = bal.layer_mode_fractions()
    assert frac.shape == (2, 4)
    np.testing.assert_allclose(frac.sum(axis=1), 1.0)
    np.testing.assert_allclose(frac[0], np.bincount(bal.assignment[:4980], minlength=4) / 4980)
    # the same layers given as an (N,) label array
    lab = np.r_[np.zeros(4980, int), np.ones(20, int)]
    arr = decompose(w, n_modes=4, n_samples=200, random_state=0, layers=lab)
    assert arr.layer_names == ("0", "1")
    np.testing.assert_array_equal(arr.sample_index, bal.sample_index)
    assert arr.layer_errors["1"] == pytest.approx(bal.layer_errors["tiny"], rel=1e-12)


# ------------------------------------------------------------------------ constants


def test_constant_parameters_and_constant_layer_give_no_nan():
    w, labels, *_ = planted(n=2000, t=30)
    w[[3, 10, 500, 1999]] = np.array([0.0, 1.5, -2.0, 7.0])[:, None]
    w[1000:1100] = np.linspace(-1, 1, 100)[:, None]  # an all-constant layer
    layers = [("a", 0, 1000), ("frozen", 1000, 1100), ("b", 1100, 2000)]
    const = np.zeros(2000, bool)
    const[[3, 10, 500, 1999]] = True
    const[1000:1100] = True
    for res in (decompose(w, tolerance=1.5 * NOISE, random_state=0, layers=layers),
                decompose(w, n_modes=6, n_samples=50, random_state=0, layers=layers,
                          sampling="uniform")):
        assert np.isfinite(res.a).all() and np.isfinite(res.b).all()
        assert np.isfinite(res.error) and np.isfinite(res.error_curve).all()
        assert all(np.isfinite(v) for v in res.layer_errors.values())
        assert not np.isin(res.sample_index, np.flatnonzero(const)).any()
        np.testing.assert_array_equal(res.a[const], 0.0)
        np.testing.assert_array_equal(res.b[const], w[const, 0])
        np.testing.assert_array_equal(res.reconstruct()[const], w[const])
        assert res.layer_errors["frozen"] == 0.0
    assert decompose(w, tolerance=1.5 * NOISE, random_state=0).n_modes == 4
    # online with constants
    online = OnlineCMD(n_modes=4, warmup=10, random_state=0, layers=layers)
    for t in range(30):
        online.update(w[:, t])
    res = online.result()
    assert np.isfinite(res.a).all() and np.isfinite(res.b).all() and np.isfinite(res.error)
    np.testing.assert_array_equal(res.a[const], 0.0)
    np.testing.assert_allclose(res.b[const], w[const, 0], rtol=1e-15)
    assert res.layer_errors["frozen"] == 0.0


def test_all_constant_weights():
    w = np.repeat(np.arange(12.0)[:, None], 5, axis=1)
    res = decompose(w)
    assert res.n_modes == 1 and res.error == 0.0
    np.testing.assert_array_equal(res.a, 0.0)
    np.testing.assert_array_equal(res.reconstruct(), w)
    assert decompose(np.zeros((4, 5))).error == 0.0
    with pytest.raises(ValueError, match="all parameters are constant"):
        decompose(w, n_modes=2)


# --------------------------------------------------------------------------- online


def test_online_equals_post_hoc_on_same_trajectory():
    w, labels, *_ = planted(n=4000, t=120, m=4)
    w = w + 50.0  # large offsets: the running sums must not lose precision to cancellation
    layers = [("l0", 0, 1500), ("l1", 1500, 4000)]
    online = OnlineCMD(n_modes=4, warmup=20, n_samples=300, random_state=5,
                       layers=layers)
    with pytest.raises(RuntimeError, match="warm-up"):
        online.result()
    for t in range(120):
        online.update(w[:, t])
    assert online.is_warm and online.n_steps_ == 120
    res = online.result()
    post = fit_fixed_modes(w, online.reference_index_, online.assignment_, layers=layers)
    assert res.n_modes == post.n_modes == online.n_modes_ == 4
    np.testing.assert_array_equal(res.assignment, post.assignment)
    np.testing.assert_array_equal(res.references, post.references)
    np.testing.assert_allclose(res.a, post.a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.b, post.b, rtol=1e-6, atol=1e-6)
    assert res.error == pytest.approx(post.error, rel=1e-6)
    for k in post.layer_errors:
        assert res.layer_errors[k] == pytest.approx(post.layer_errors[k], rel=1e-6)
    np.testing.assert_allclose(res.reconstruct(), post.reconstruct(), rtol=0, atol=1e-6)
    # the warm-up modes are the planted ones
    assert adjusted_rand_score(labels, res.assignment) > 0.95
    # re-assigning by |corr| over the full run keeps the warm-up assignment here
    np.testing.assert_array_equal(fit_fixed_modes(w, online.reference_index_).assignment,
                                  res.assignment)


def test_online_after_warmup_only_equals_decompose():
    w, *_ = planted(n=1000, t=15)
    online = OnlineCMD(n_modes=None, tolerance=0.05, warmup=15, n_samples=200, random_state=2)
    for t in range(15):
        online.update(w[:, t])
    res = online.result()
    post = decompose(w, tolerance=0.05, n_samples=200, random_state=2)
    assert res.n_modes == post.n_modes
    np.testing.assert_array_equal(res.reference_index, post.reference_index)
    np.testing.assert_array_equal(res.assignment, post.assignment)
    np.testing.assert_allclose(res.a, post.a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.b, post.b, rtol=1e-9, atol=1e-12)
    assert res.error == pytest.approx(post.error, rel=1e-9)


def test_online_memory_does_not_grow_with_steps():
    n, m = 20000, 3
    rng = np.random.default_rng(SEED + 2)
    refs = np.cumsum(rng.normal(size=(m, 400)), axis=1)
    lab = rng.integers(0, m, n)
    a = rng.uniform(0.5, 2, n)
    online = OnlineCMD(n_modes=m, warmup=10, n_samples=100, random_state=0)
    tracemalloc.start()
    try:
        for t in range(400):
            online.update(a * refs[lab, t] + 1e-3 * rng.normal(size=n))
            if t == 99:
                mem_100, _ = tracemalloc.get_traced_memory()
        mem_400, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 300 more steps add only 300 reference values per mode (a (M,) array each, ~150 B);
    # any per-step O(N) growth would add >= 160 kB per step.
    assert mem_400 - mem_100 < 300 * 300, (mem_100, mem_400)
    assert online.result().references.shape == (m, 400)


# -------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_value_error_naming_the_problem():
    w, *_ = planted(n=50, t=10)
    with pytest.raises(ValueError, match="2-D"):
        decompose(w[0])
    with pytest.raises(ValueError, match="T=3"):
        decompose(w[:, :2])
    bad = w.copy()
    bad[17, 4] = np.nan
    bad[30, 0] = np.nan
    with pytest.raises(ValueError, match=r"row 17 \(first offending"):
        decompose(bad)
    bad = w.copy()
    bad[41, 2] = np.inf
    with pytest.raises(ValueError, match="row 41"):
        decompose(bad.astype(np.float32))
    with pytest.raises(ValueError, match="real-valued"):
        decompose(w.astype(complex))
    with pytest.raises(ValueError, match="n_modes"):
        decompose(w, n_modes=0)
    with pytest.raises(ValueError, match="n_modes=60 exceeds"):
        decompose(w, n_modes=60)
    with pytest.raises(ValueError, match="tolerance"):
        decompose(w, tolerance=0.0)
    with pytest.raises(ValueError, match="n_samples"):
        decompose(w, n_samples=0)
    with pytest.raises(ValueError, match=r"sampling must be one of \('balanced', 'uniform'\)"):
        decompose(w, sampling="var")
    with pytest.raises(ValueError, match="random_state"):
        decompose(w, random_state="x")
    with pytest.raises(ValueError, match="gap"):
        decompose(w, layers=[("a", 0, 20), ("b", 25, 50)])
    with pytest.raises(ValueError, match="overlaps"):
        decompose(w, layers=[("a", 0, 30), ("b", 25, 50)])
    with pytest.raises(ValueError, match="N=50"):
        decompose(w, layers=[("a", 0, 20)])
    with pytest.raises(ValueError, match="integer array"):
        decompose(w, layers=np.zeros(49, int))
    with pytest.raises(ValueError, match="reference_index"):
        fit_fixed_modes(w, [0, 50])
    with pytest.raises(ValueError, match="assignment"):
        fit_fixed_modes(w, [0, 1], np.full(50, 2))
    online = OnlineCMD(warmup=2)
    with pytest.raises(ValueError, match="warmup"):
        online.update(w[:, 0])
    online = OnlineCMD(warmup=3)
    online.update(w[:, 0])
    with pytest.raises(ValueError, match="expected N=50"):
        online.update(w[:40, 1])
    v = w[:, 1].copy()
    v[9] = np.nan
    with pytest.raises(ValueError, match="parameter 9"):
        online.update(v)
    with pytest.raises(ValueError, match=r"flat \(N,\)"):
        online.update(w)


# ---------------------------------------------------------------------- MLP digits


def test_mlp_digits_reconstruction_keeps_accuracy():
    torch = pytest.importorskip("torch")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from torch.nn.utils import parameters_to_vector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only add overhead on 2 cores
    try:
        x, y = load_digits(return_X_y=True)
        xtr, xte, ytr, yte = train_test_split((x / 16.0).astype(np.float32), y, test_size=0.3,
                                              random_state=0, stratify=y)
        xtr, ytr = torch.tensor(xtr), torch.tensor(ytr)
        xte, yte = torch.tensor(xte), torch.tensor(yte)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = torch.nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(0)
        record = [parameters_to_vector(model.parameters()).detach().numpy().copy()]
        step = 0
        for _epoch in range(20):
            perm = torch.randperm(len(xtr), generator=gen)
            for i in range(0, len(perm), 32):
                idx = perm[i:i + 32]
                opt.zero_grad()
                loss_fn(model(xtr[idx]), ytr[idx]).backward()
                opt.step()
                step += 1
                if step % 5 == 0:
                    record.append(parameters_to_vector(model.parameters()).detach().numpy().copy())
        w = np.stack(record, axis=1)  # (2410, T)
        with torch.no_grad():
            real_acc = float((model(xte).argmax(1) == yte).double().mean())
        layers = [(name, s, s + p.numel()) for (name, p), s in
                  zip(model.named_parameters(), np.cumsum([0] + [p.numel() for p in model.parameters()]))]
        res = decompose(w, n_modes=10, random_state=0, layers=layers)
        before = parameters_to_vector(model.parameters()).detach().clone()
        ev = evaluate_reconstruction(model, res, xte, yte, loss_fn, [0, w.shape[1] - 1])
        # the model's own weights are restored
        assert torch.equal(parameters_to_vector(model.parameters()), before)
    finally:
        torch.set_num_threads(threads)
    cmd_acc = float(ev["accuracy"][-1])
    print(f"digits MLP: T={w.shape[1]} records, real test acc {real_acc:.4f}, "
          f"CMD (M={res.n_modes}, rel. error {res.error:.4f}) test acc {cmd_acc:.4f}")
    assert res.n_modes <= 10
    assert real_acc > 0.9
    assert abs(cmd_acc - real_acc) <= 0.01
    assert ev["t_index"].tolist() == [0, w.shape[1] - 1]
    assert np.isfinite(ev["loss"]).all() and ev["accuracy"][0] < 0.5  # untrained start
    assert set(res.layer_errors) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# --------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path):
    from raydyn.plots.cmd import plot_cmd_layer_modes, plot_cmd_references, reference_curves

    w, *_ = planted(n=600, t=30)
    res = decompose(w, n_modes=4, random_state=0, layers=[("x", 0, 100), ("y", 100, 600)])
    curves = reference_curves(res)
    assert curves.shape == (4, 30)
    np.testing.assert_allclose(curves.min(axis=1), 0.0)
    np.testing.assert_allclose(curves.max(axis=1), 1.0)
    p1, p2 = tmp_path / "refs.png", tmp_path / "layers.png"
    plot_cmd_references(res, p1, steps=np.arange(30) * 10)
    plot_cmd_layer_modes(res, p2)
    for p in (p1, p2):
        assert p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.pyplot as plt
    plt.close("all")
    assert isinstance(res, CMDResult)


def test_tiny_models_every_parameter_its_own_candidate():
    """Fewer parameters than the automatic choice's 50 modes (a 4x2 linear layer): the dendrogram cut into as
    many clusters as parameters must be every parameter alone (scipy 1.17's cut_tree gets that one cut wrong
    when asked for a list of cuts). 3 planted modes over 10 parameters come out exactly."""
    rng = np.random.default_rng(SEED)
    t = np.linspace(0, 1, 40)
    refs = np.stack([t, np.sin(3 * np.pi * t), np.exp(-5 * t)])
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    w = rng.uniform(0.5, 2.0, 10)[:, None] * refs[labels] + rng.normal(size=10)[:, None]
    res = decompose(w, n_modes=None, tolerance=1e-6, n_samples=10, random_state=0)
    assert res.n_modes == 3 and res.error < 1e-10
    assert adjusted_rand_score(labels, res.assignment) == 1.0
    full = decompose(w, n_modes=10, n_samples=10, random_state=0)
    assert full.n_modes == 10 and full.error < 1e-12
