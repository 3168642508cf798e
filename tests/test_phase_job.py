"""Phase classification from stored metrics: which loss the rules see, the summary quantities."""
from __future__ import annotations

import math

import numpy as np
import pytest

from raydyn.jobs.phase import SUMMARY_COLUMNS, summarise_run, trajectory_of
from raydyn.analysis.phase import PhaseThresholds

NAN = math.nan


def rows(steps, batch, train, **extra):
    n = len(steps)
    out = {"step": list(steps), "batch_loss": list(batch), "train_loss": list(train),
           "train_acc": [NAN] * n, "test_acc": [NAN] * n, "test_loss": [NAN] * n}
    out.update({k: list(v) for k, v in extra.items()})
    return out


def test_full_batch_runs_use_the_loss_at_every_record_step():
    """A catapult spike between evaluations is only seen in batch_loss; full batch -> batch_loss is used."""
    steps = range(0, 60, 10)
    batch = [1.0, 30.0, 80.0, 0.5, 0.01, 0.001]
    train = [1.0, NAN, NAN, NAN, NAN, 0.001]  # evaluated at the first and last step only, equal to batch_loss
    ntk = [2.0, NAN, NAN, NAN, NAN, 0.9]
    traj, source = trajectory_of(rows(steps, batch, train, ntk_top=ntk), "completed")
    assert source == "batch_loss"
    np.testing.assert_array_equal(traj.train_loss, batch)
    assert traj.train_acc is None  # regression: accuracies are NaN everywhere
    s = summarise_run(traj, PhaseThresholds())
    assert s["phase"] == "catapult" and s["phase_peak_ratio"] == 80.0
    assert s["phase_ntk0"] == 2.0 and s["phase_ntk_final"] == 0.9 and s["phase_ntk_change"] == pytest.approx(0.55)
    # the same run seen only at its evaluations would not show the spike
    traj2, _ = trajectory_of(rows(steps, [NAN] * 6, train, ntk_top=ntk), "completed")
    assert summarise_run(traj2, PhaseThresholds())["phase"] != "catapult"


def test_minibatch_runs_use_train_loss_at_evaluations():
    steps = [0, 10, 20, 30]
    batch = [1.3, 0.9, 0.2, 0.1]  # minibatch losses differ from the evaluated loss
    train = [1.0, NAN, 0.3, 0.05]
    acc_tr = [0.1, NAN, 0.95, 1.0]
    acc_te = [0.1, NAN, 0.2, 0.97]
    traj, source = trajectory_of(rows(steps, batch, train, train_acc=acc_tr, test_acc=acc_te), "completed")
    assert source == "train_loss"
    np.testing.assert_array_equal(traj.steps, [0, 20, 30])
    s = summarise_run(traj, PhaseThresholds())
    assert s["phase_t_train"] == 20 and s["phase_t_test"] == 30
    assert s["phase"] == "comprehension"  # gap 10 < t_train 20
    s = summarise_run(traj, PhaseThresholds(grok_delay_factor=0.25))
    assert s["phase"] == "grokking"


def test_eos_ratio_is_late_sharpness_times_lr_over_two():
    steps = np.arange(0, 100, 10)
    loss = np.linspace(1, 0.05, 10)
    sharp = [1.0, NAN, 5.0, NAN, 9.0, NAN, 19.0, NAN, 21.0, 20.0]
    traj, _ = trajectory_of(rows(steps, loss, loss, sharpness=sharp), "completed")
    s = summarise_run(traj, PhaseThresholds(), lr_actual=0.1)
    # second half: steps >= 45 -> sharpness 19, 21, 20 -> median 20 -> 20 * 0.1 / 2
    assert s["phase_eos_ratio"] == pytest.approx(1.0) and s["phase_sharpness_final"] == 20.0
    assert math.isnan(summarise_run(traj, PhaseThresholds())["phase_eos_ratio"])  # no lr, no ratio


def test_diverged_status_and_summary_columns():
    traj, _ = trajectory_of(rows([0, 10], [1.0, math.inf], [1.0, math.inf]), "diverged")
    s = summarise_run(traj, PhaseThresholds())
    assert s["phase"] == "diverged"
    assert set(s) | {"phase_loss_source"} == set(SUMMARY_COLUMNS)
    with pytest.raises(ValueError, match="no recorded loss"):
        trajectory_of(rows([0, 10], [NAN, NAN], [NAN, NAN]), "completed")
