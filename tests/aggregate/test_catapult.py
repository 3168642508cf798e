"""Catapult phases as a real oracle: the uv model (exact, float64) and a wide ReLU network.

Lewkowycz et al. 2020: lazy for eta*lambda_0 < 2, catapult for 2 < eta*lambda_0 < 4
(uv model), diverged above. The boundaries are located with refine.py/boundary.py
using classify.py as the labeller.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydyn.aggregate.bisect import Refiner
from raydyn.analysis.curvature import ntk_top_eigenvalue
from raydyn.analysis.phase import PhaseThresholds, RunTrajectory, classify
from raydyn.tasks.uv import relu_net, relu_teacher_problem, train_relu_teacher, train_uv, uv_lambda0


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def uv_label(eta_lambda0: float, seed: int = 0) -> str:
    return classify(RunTrajectory.from_dict(train_uv(eta_lambda0, seed=seed)))


def test_uv_dynamics_match_closed_form_recursion():
    r = train_uv(2.7, m=1000, steps=50, seed=4)
    lam, eta, m = r["ntk"], r["eta"], 1000
    f2 = 2 * r["train_loss"]
    # lambda_{t+1} = lambda_t + eta f_t^2 (eta lambda_t - 4) / m
    pred = lam[:-1] + eta * f2[:-1] * (eta * lam[:-1] - 4) / m
    np.testing.assert_allclose(lam[1:], pred, rtol=1e-10)
    # f_{t+1}^2 = f_t^2 (1 - eta lambda_t + eta^2 f_t^2 / m)^2 (f is a dot product: absolute error ~1e-14)
    pred_f2 = f2[:-1] * (1 - eta * lam[:-1] + eta**2 * f2[:-1] / m) ** 2
    np.testing.assert_allclose(f2[1:], pred_f2, rtol=1e-8, atol=1e-12)
    assert f2.max() > 100 * f2[0]  # the run did catapult, so the check covered large f
    assert r["lambda0"] == pytest.approx(uv_lambda0(1000, seed=4)) and lam[0] == pytest.approx(r["lambda0"])


def test_uv_lambda0_agrees_with_curvature_ntk_convention():
    m, seed = 1000, 0
    rng = np.random.default_rng(seed)
    p = {"u": torch.from_numpy(rng.standard_normal(m)), "v": torch.from_numpy(rng.standard_normal(m))}
    X = torch.ones(1, 1, dtype=torch.float64)
    lam = ntk_top_eigenvalue(lambda q, x: (q["u"] @ q["v"] / math.sqrt(m)) * x[:, 0], p, X)
    assert lam == pytest.approx(uv_lambda0(m, seed), rel=1e-12)


def test_uv_labels_on_a_grid():
    grid = np.round(np.arange(1.0, 5.01, 0.25), 2)
    labels = {e: uv_label(e) for e in grid}
    for e, lab in labels.items():
        if e < 2:
            assert lab == "lazy", (e, lab)
        elif 2.2 <= e < 4:
            assert lab == "catapult", (e, lab)
        elif e > 4:
            assert lab == "diverged", (e, lab)


def test_uv_catapult_flattens_below_two_over_eta():
    for e in (2.5, 3.0, 3.5):
        r = train_uv(e)
        assert r["eta"] * r["ntk"][-1] < 2.0  # converged in a flatter region
        assert r["train_loss"].max() > 10 * r["train_loss"][0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uv_boundaries_located_by_refinement(seed):
    x0 = np.linspace(1.0, 5.0, 5)
    tol = 0.02
    r = Refiner(x0, [uv_label(e, seed) for e in x0], log=False, tol=tol).run(lambda e: uv_label(e, seed))
    bs = r.boundaries()
    assert [(b.left_phase, b.right_phase) for b in bs] == [("lazy", "catapult"), ("catapult", "diverged")]
    onset, top = bs
    assert abs(onset.location - 2.0) <= 0.1, onset
    assert abs(top.location - 4.0) <= 0.1, top
    assert onset.width <= tol + 1e-12 and top.width <= tol + 1e-12
    # refinement used fewer runs than a dense grid of the same resolution (201 points)
    assert r.n_told_ < 201 / 5


def test_uv_boundaries_with_seeds_as_replicates():
    x0 = np.linspace(1.0, 5.0, 5)

    def oracle(e):
        return [uv_label(e, s) for s in range(3)]

    r = Refiner(x0, [oracle(e) for e in x0], log=False, tol=0.05).run(oracle)
    onset, top = r.boundaries()
    assert onset.lower <= 2.1 and onset.upper >= 2.0 and abs(onset.location - 2.0) <= 0.1
    assert abs(top.location - 4.0) <= 0.1


def test_relu_catapult_onset_near_two():
    """Wide two-layer ReLU net (width 2048, n=64, d=10, 300 GD steps): the catapult
    starts at eta*lambda_0 in [2.0, 2.15]. Finite width shifts the loss-based
    detection upward: the loss peak grows like (eta*lambda_0 - 2)^2 * width, so a
    'peak > 2x initial' rule only fires from ~2.05-2.1 (at width 1024: ~2.1-2.15)."""
    th = PhaseThresholds()

    def label(e):
        return classify(RunTrajectory.from_dict(train_relu_teacher(e, width=2048, steps=300, ntk_every=20)), th)

    x0 = [1.5, 2.0, 2.5, 3.0]
    labels = [label(e) for e in x0]
    assert labels[0] == "lazy" and labels[2] == "catapult" and labels[3] == "catapult"
    r = Refiner(x0, labels, log=False, tol=0.05).run(label)
    onset = next(b for b in r.boundaries() if b.left_phase == "lazy")
    assert 2.0 <= onset.location <= 2.15, onset
    # the NTK itself drops to ~2/eta in the catapult phase (the mechanism)
    run = train_relu_teacher(2.5, width=2048, steps=300, ntk_every=50)
    ntk = run["ntk"][np.isfinite(run["ntk"])]
    assert run["eta"] * ntk[-1] < 2.0


def test_relu_lambda0_is_measured_with_curvature():
    params, X, _ = relu_teacher_problem(width=256, n=16, d=5, seed=1)
    from raydyn.analysis.curvature import ntk_top_eigenvalue_exact

    r = train_relu_teacher(1.0, width=256, n=16, d=5, steps=2, seed=1)
    assert r["lambda0"] == pytest.approx(ntk_top_eigenvalue_exact(relu_net, params, X), rel=1e-6)
    assert r["eta"] == pytest.approx(1.0 / r["lambda0"])


def test_task_argument_validation():
    with pytest.raises(ValueError, match="eta_lambda0"):
        train_uv(-1.0)
    with pytest.raises(ValueError, match="dtype"):
        train_uv(1.0, dtype="int32")
    with pytest.raises(ValueError, match="steps"):
        train_relu_teacher(1.0, steps=0)
    r32 = train_uv(1.5, steps=100, dtype="float32")
    assert r32["status"] == "completed" and r32["train_loss"][-1] < 1e-6 * r32["train_loss"][0]
