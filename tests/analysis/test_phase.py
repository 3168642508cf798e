"""Phase rules on constructed trajectories: one test per phase plus the edges between rules."""
from __future__ import annotations

import numpy as np
import pytest

from raydyn.analysis.phase import (
    GENERALISATION_PHASES,
    LOSS_PHASES,
    PHASES,
    PhaseThresholds,
    RunTrajectory,
    classify,
    classify_many,
)

T = 101
STEPS = np.arange(T)


def decaying(rate=0.05, L0=1.0):
    return L0 * np.exp(-rate * STEPS)


def catapult_loss(peak=50.0, L0=1.0):
    # rises for 10 steps to `peak`, then decays to ~1e-4 * L0
    up = L0 * np.geomspace(1, peak, 11)
    down = peak * L0 * np.geomspace(1, 1e-6, T - 11)
    return np.concatenate([up, down])


def run(loss, **kw):
    return RunTrajectory(steps=STEPS, train_loss=loss, **kw)


# ---------------------------------------------------------------- loss phases
def test_lazy():
    ntk = 1.0 + 0.02 * np.sin(STEPS)  # moves at most 2%
    assert classify(run(decaying(), ntk=ntk)) == "lazy"


def test_lazy_does_not_require_convergence():
    # tiny learning rate: kernel frozen, loss barely moved -- still the kernel regime
    assert classify(run(decaying(rate=1e-4), ntk=np.full(T, 3.0))) == "lazy"


def test_catapult():
    ntk = np.linspace(2.0, 0.9, T)
    assert classify(run(catapult_loss(), ntk=ntk)) == "catapult"


def test_catapult_without_ntk_uses_loss_only():
    assert classify(run(catapult_loss())) == "catapult"


def test_converged_feature_learning():
    # loss converges, no spike, but NTK moved 40%: not lazy, not catapult
    assert classify(run(decaying(), ntk=np.linspace(1.0, 1.4, T))) == "converged"


def test_converged_without_ntk():
    assert classify(run(decaying())) == "converged"


def test_unconverged_stall():
    assert classify(run(np.linspace(1.0, 0.5, T), ntk=np.linspace(1, 2, T))) == "unconverged"


def test_spike_that_never_comes_down_is_not_catapult():
    loss = catapult_loss()
    loss[-20:] = 3.0  # ends above the converge threshold but below div_factor
    assert classify(run(loss, ntk=np.linspace(2, 1, T))) == "unconverged"


def test_spike_with_growing_ntk_is_not_catapult():
    assert classify(run(catapult_loss(), ntk=np.linspace(1.0, 1.5, T))) == "converged"


@pytest.mark.parametrize(
    "loss,status",
    [
        (np.r_[decaying()[:-1], np.nan], "completed"),
        (np.r_[decaying()[:-1], np.inf], "completed"),
        (decaying(), "diverged"),
        (np.linspace(1.0, 11.0, T), "completed"),
    ],
    ids=["nan", "inf", "status", "final>10x"],
)
def test_diverged(loss, status):
    assert classify(run(loss, ntk=np.ones(T), status=status)) == "diverged"


def test_boundary_cases_of_factors():
    th = PhaseThresholds()
    # final exactly div_factor x initial is not diverged (strict >)
    loss = np.linspace(1.0, th.div_factor, T)
    assert classify(run(loss)) != "diverged"
    loss2 = np.linspace(1.0, th.div_factor * (1 + 1e-9), T)
    assert classify(run(loss2)) == "diverged"
    # peak exactly catapult_factor x initial is not a rise: lazy if NTK still
    peaked = decaying()
    peaked[5] = th.catapult_factor
    assert classify(run(peaked, ntk=np.ones(T))) == "lazy"
    peaked[5] = th.catapult_factor * (1 + 1e-9)
    assert classify(run(peaked, ntk=np.linspace(1, 0.95, T))) == "catapult"
    # NTK relative change exactly at lazy_tol is not lazy (strict <)
    ntk = np.ones(T)
    ntk[-1] = 1 + th.lazy_tol
    assert classify(run(decaying(), ntk=ntk)) == "converged"
    ntk[-1] = 1 + th.lazy_tol * (1 - 1e-9)
    assert classify(run(decaying(), ntk=ntk)) == "lazy"
    # final exactly converge_factor x initial counts as converged
    loss3 = np.linspace(1.0, th.converge_factor, T)
    assert classify(run(loss3)) == "converged"


def test_ntk_measured_sparsely_with_nans():
    ntk = np.full(T, np.nan)
    ntk[::10] = np.linspace(2.0, 1.0, 11)
    assert classify(run(catapult_loss(), ntk=ntk)) == "catapult"
    ntk2 = np.full(T, np.nan)
    ntk2[::25] = 1.0
    assert classify(run(decaying(), ntk=ntk2)) == "lazy"


def test_zero_initial_loss_is_not_a_blow_up():
    loss = np.zeros(T)
    loss[3] = 1e-14
    assert classify(run(loss)) == "converged"


def test_thresholds_change_labels():
    loss = catapult_loss(peak=5.0)
    assert classify(run(loss)) == "catapult"
    assert classify(run(loss), PhaseThresholds(catapult_factor=8.0)) == "converged"


# ---------------------------------------------------------------- generalisation phases
def acc_curve(t_reach, lo=0.1, hi=1.0):
    """Accuracy that jumps from lo to hi at step t_reach (None: never)."""
    a = np.full(T, lo)
    if t_reach is not None:
        a[t_reach:] = hi
    return a


def gen(t_train, t_test, **kw):
    return run(decaying(), train_acc=acc_curve(t_train), test_acc=acc_curve(t_test), **kw)


def test_comprehension():
    assert classify(gen(10, 14)) == "comprehension"


def test_comprehension_when_test_reaches_first():
    assert classify(gen(20, 15)) == "comprehension"


def test_grokking():
    assert classify(gen(10, 60)) == "grokking"


def test_grokking_delay_boundary():
    # gap = 10 = 1.0 x t_train -> grokking (>=); gap 9 -> comprehension
    assert classify(gen(10, 20)) == "grokking"
    assert classify(gen(10, 19)) == "comprehension"
    # min-gap rule: t_train 50, gap 20 < 50 but >= grok_min_gap
    assert classify(gen(50, 70)) == "comprehension"
    assert classify(gen(50, 70), PhaseThresholds(grok_min_gap=20)) == "grokking"


def test_grokking_steps_counted_from_first_recorded_step():
    r = RunTrajectory(
        steps=STEPS + 1000, train_loss=decaying(), train_acc=acc_curve(10), test_acc=acc_curve(15)
    )
    assert classify(r) == "comprehension"


def test_memorization():
    assert classify(gen(10, None)) == "memorization"


def test_memorization_without_test_curve():
    assert classify(run(decaying(), train_acc=acc_curve(5))) == "memorization"


def test_confusion():
    assert classify(gen(None, None)) == "confusion"


def test_accuracy_threshold_is_inclusive():
    tr = np.full(T, 0.5)
    tr[10:] = 0.9
    te = np.full(T, 0.5)
    te[12:] = 0.9
    assert classify(run(decaying(), train_acc=tr, test_acc=te)) == "comprehension"
    assert classify(run(decaying(), train_acc=tr, test_acc=te), PhaseThresholds(acc_threshold=0.95)) == "confusion"


def test_diverged_beats_generalisation():
    assert classify(gen(10, 12, status="diverged")) == "diverged"


# ---------------------------------------------------------------- API and validation
def test_phases_tuple():
    assert len(set(PHASES)) == len(PHASES) == 10
    # every loss and generalisation phase, plus "stopped" (early stopping ended the run: no phase of its own dynamics)
    assert set(LOSS_PHASES) | set(GENERALISATION_PHASES) | {"stopped"} == set(PHASES)
    labels = classify_many([run(decaying(), ntk=np.ones(T)), gen(10, 60), run(decaying(), status="diverged")])
    assert labels == ["lazy", "grokking", "diverged"]
    assert all(lbl in PHASES for lbl in labels)


def test_from_mapping_and_validation():
    th = PhaseThresholds.from_mapping({"lazy_tol": 0.05, "catapult_factor": 3})
    assert th.lazy_tol == 0.05 and th.catapult_factor == 3
    assert PhaseThresholds.from_mapping(None) == PhaseThresholds()
    with pytest.raises(ValueError, match="phases.lazy_tl"):
        PhaseThresholds.from_mapping({"lazy_tl": 0.1})
    bad = [
        {"div_factor": 1.0},
        {"catapult_factor": 0.5},
        {"converge_factor": 1.0},
        {"lazy_tol": 0.0},
        {"loss_floor": -1.0},
        {"acc_threshold": 1.5},
        {"grok_delay_factor": 0},
        {"grok_min_gap": -3},
        {"lazy_tol": float("nan")},
        {"div_factor": "big"},
        {"catapult_factor": 20.0, "div_factor": 10.0},
    ]
    for kw in bad:
        with pytest.raises(ValueError, match="phases\\."):
            PhaseThresholds(**kw)


def test_trajectory_validation():
    with pytest.raises(ValueError, match="strictly increasing"):
        RunTrajectory(steps=[0, 2, 1], train_loss=[1, 1, 1])
    with pytest.raises(ValueError, match="ntk"):
        RunTrajectory(steps=[0, 1, 2], train_loss=[1, 1, 1], ntk=[1, 1])
    with pytest.raises(ValueError, match="status"):
        RunTrajectory(steps=[0, 1], train_loss=[1, 1], status="failed")
    with pytest.raises(ValueError, match="percent"):
        RunTrajectory(steps=[0, 1], train_loss=[1, 1], train_acc=[10, 95])
    with pytest.raises(ValueError, match="without train_acc"):
        RunTrajectory(steps=[0, 1], train_loss=[1, 1], test_acc=[0.1, 0.2])
    with pytest.raises(ValueError, match="RunTrajectory"):
        classify({"steps": [0], "train_loss": [1]})
    r = RunTrajectory.from_dict({"steps": [0, 1], "train_loss": [1.0, 0.01], "lambda0": 3.0})
    assert classify(r) == "converged"
