"""Phase classification as an analysis job: one phase label per run, written to ``phase_summary``.

A unit is one run. On a Ray worker it reads the run's metrics rows from the store,
turns them into a :class:`raydyn.analysis.phase.RunTrajectory` (:func:`trajectory_of`)
and labels it with the sweep's thresholds (the sweep file's ``phases:`` section).
``phase_summary`` (keyed by ``run_id``) holds the label and the quantities the rules
used, so ``raydyn phase-map SWEEP --metric phase`` and ``raydyn phase-boundary`` can
read them, and every column is also a numeric phase-map metric.

Which loss the rules see: a full-batch run (its ``batch_loss`` equals ``train_loss``
at every evaluation) uses ``batch_loss`` at every record step, so a catapult's loss
spike between evaluations is seen; any other run uses ``train_loss`` at evaluation
steps. Accuracies and the NTK series are taken at the same steps (NaN where not
measured); for minibatch runs, measure curvature on evaluation steps (the default
``curvature_every``) or it is not seen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import pyarrow as pa

from raydyn.jobs.base import Job, Unit, group_units, run_filter
from raydyn.jobs.options import Options
from raydyn.jobs.registry import Analysis, register
from raydyn.analysis.phase import PhaseThresholds, RunTrajectory, classify

__all__ = ["PhaseJob", "trajectory_of", "summarise_run", "SUMMARY_COLUMNS"]

#: Columns of ``phase_summary`` besides ``run_id`` (float unless noted).
SUMMARY_COLUMNS = (
    "phase",  # string, one of raydyn.analysis.phase.PHASES
    "phase_loss_source",  # string: "batch_loss" (full batch, every record) or "train_loss" (evaluations)
    "phase_loss0", "phase_loss_peak", "phase_loss_final", "phase_peak_ratio",
    "phase_ntk0", "phase_ntk_final", "phase_ntk_change",
    "phase_sharpness_final", "phase_eos_ratio",
    "phase_t_train", "phase_t_test",
)


def _col(m: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    if name not in m:
        return np.full(n, np.nan)
    return np.array([np.nan if v is None else v for v in m[name]], dtype=float)


def trajectory_of(metrics: Mapping[str, Any], status: str) -> tuple[RunTrajectory, str]:
    """One run's metric rows (columns as in the store's ``metrics`` table, sorted by step) -> trajectory.

    Returns the :class:`RunTrajectory` and the loss column it used (see the module docstring).
    Raises ValueError when the run has no usable loss rows.
    """
    steps = np.asarray(metrics["step"], dtype=float)
    n = steps.size
    order = np.argsort(steps, kind="stable")
    m = {k: np.asarray(_col(metrics, k, n))[order] for k in
         ("train_loss", "batch_loss", "train_acc", "test_acc", "test_loss", "ntk_top", "sharpness")}
    steps = steps[order]
    train, batch = m["train_loss"], m["batch_loss"]
    evaluated = ~np.isnan(train)
    both = evaluated & np.isfinite(train) & np.isfinite(batch)
    full_batch = bool(both.any()) and bool(np.allclose(batch[both], train[both], rtol=1e-6, atol=1e-12))
    if full_batch:
        keep, source, loss = ~np.isnan(batch), "batch_loss", batch
    else:
        keep, source, loss = evaluated, "train_loss", train
    if not keep.any():
        raise ValueError("the run has no recorded loss (no evaluation rows in its metrics)")

    def series(name: str) -> Optional[np.ndarray]:
        a = m[name][keep]
        return a if np.isfinite(a).any() else None

    ntk = series("ntk_top")
    if ntk is not None:
        finite = ntk[np.isfinite(ntk)]
        if not finite[0] > 0:  # no positive NTK at the start: the rules cannot use it
            ntk = None
    train_acc = series("train_acc")
    test_acc = series("test_acc") if train_acc is not None else None
    traj = RunTrajectory(steps=steps[keep], train_loss=loss[keep], test_loss=series("test_loss"),
                         train_acc=train_acc, test_acc=test_acc, ntk=ntk, sharpness=series("sharpness"),
                         status=status)
    return traj, source


def _reach(steps: np.ndarray, acc: Optional[np.ndarray], thr: float) -> float:
    if acc is None:
        return math.nan
    hit = np.flatnonzero(np.nan_to_num(acc, nan=-1.0) >= thr)
    return math.nan if hit.size == 0 else float(steps[hit[0]] - steps[0])


def summarise_run(traj: RunTrajectory, thresholds: PhaseThresholds, lr_actual: float = math.nan) -> dict[str, Any]:
    """The phase label and the quantities behind it (see :data:`SUMMARY_COLUMNS`).

    ``phase_eos_ratio`` is the median of ``sharpness * lr_actual / 2`` over the sharpness
    measurements in the second half of the run (about 1 at the edge of stability,
    Cohen et al. 2021); NaN without sharpness.
    """
    loss = traj.train_loss
    finite = loss[np.isfinite(loss)]
    L0 = float(loss[0])
    out: dict[str, Any] = {
        "phase": classify(traj, thresholds),
        "phase_loss0": L0,
        "phase_loss_peak": float(finite.max()) if finite.size else math.nan,
        "phase_loss_final": float(loss[-1]),
        "phase_ntk0": math.nan, "phase_ntk_final": math.nan, "phase_ntk_change": math.nan,
        "phase_sharpness_final": math.nan, "phase_eos_ratio": math.nan,
    }
    out["phase_peak_ratio"] = out["phase_loss_peak"] / max(L0, thresholds.loss_floor) if finite.size else math.nan
    if traj.ntk is not None:
        k = traj.ntk[np.isfinite(traj.ntk)]
        out.update(phase_ntk0=float(k[0]), phase_ntk_final=float(k[-1]),
                   phase_ntk_change=float(np.nanmax(np.abs(traj.ntk / k[0] - 1.0))))
    if traj.sharpness is not None:
        ok = np.isfinite(traj.sharpness)
        s, st = traj.sharpness[ok], traj.steps[ok]
        out["phase_sharpness_final"] = float(s[-1])
        late = s[st >= traj.steps[0] + (traj.steps[-1] - traj.steps[0]) / 2]
        if late.size and math.isfinite(lr_actual):
            out["phase_eos_ratio"] = float(np.median(late) * lr_actual / 2)
    out["phase_t_train"] = _reach(traj.steps, traj.train_acc, thresholds.acc_threshold)
    out["phase_t_test"] = _reach(traj.steps, traj.test_acc, thresholds.acc_threshold)
    return out


@dataclass(frozen=True)
class PhaseOptions(Options):
    """None: the thresholds are the sweep file's ``phases:`` section."""


class PhaseJob(Job):
    """Label every run with a phase (lazy, catapult, grokking, ...) using the sweep's `phases:` thresholds.

    Classifies every run of a sweep (completed, diverged and stopped). Writes phase_summary; then
    `raydyn phase-map SWEEP --metric phase` and `raydyn phase-boundary SWEEP`.
    """

    name = "phase"
    Options = PhaseOptions

    def plan(self, store, sweep: str) -> list[Unit]:
        from raydyn.track import parse_stored

        spec = parse_stored(store, sweep)
        self.thresholds = spec.thresholds() if spec is not None else PhaseThresholds()
        runs = store.runs(sweep=sweep, columns=["run_id", "status"])
        return group_units(runs, None, status=("completed", "diverged", "stopped"))

    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        (run_id,) = unit.run_ids
        run = store.runs(sweep=sweep, filter=run_filter([run_id])).to_pylist()[0]
        metrics = store.metrics(sweep=sweep, filter=run_filter([run_id]))
        metrics = metrics.drop_columns([c for c in metrics.column_names if c in ("weight_norms", "sweep")])
        traj, source = trajectory_of(metrics.to_pydict(), run["status"])
        lr = run.get("lr_actual")
        lr = float(lr) if lr is not None and math.isfinite(lr) else float(run.get("lr", math.nan))
        row = {"run_id": run_id, **summarise_run(traj, getattr(self, "thresholds", PhaseThresholds()), lr),
               "phase_loss_source": source}
        schema = pa.schema([("run_id", pa.string()), ("phase", pa.string()), ("phase_loss_source", pa.string())]
                           + [(c, pa.float64()) for c in SUMMARY_COLUMNS if c not in ("phase", "phase_loss_source")])
        return {"phase_summary": pa.Table.from_pylist([row], schema=schema)}


def classify_sweep(store, sweep: str, progress=None):
    """Run :class:`PhaseJob` over ``sweep`` (Ray must be initialised); returns the job outcome."""
    from raydyn.jobs.base import run_job

    return run_job(PhaseJob(), store, sweep, progress=progress)


register(Analysis(PhaseJob))
