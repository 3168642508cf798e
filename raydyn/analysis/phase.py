"""Phase rules on per-run trajectories. Pure: arrays in, a label out.

A run is a :class:`RunTrajectory` (what the recorder stores for one trial) and
the rules' knobs are a :class:`PhaseThresholds` (settable from the sweep file's
``phases:`` section via :meth:`PhaseThresholds.from_mapping`).

Rules, checked in this order (first match wins):

1. ``diverged`` -- status ``"diverged"``, or any non-finite training loss, or
   final loss > ``div_factor`` x initial loss.
1b. ``stopped`` -- status ``"stopped"``: early stopping (``train.early_stop``) ended the run at a rung, so
   its trajectory is cut short and the rules below would judge an unfinished run (diverged comes first:
   a stopped run whose loss blew up is ``diverged``).
2. If ``train_acc`` is given (a generalisation task), with ``t_train`` / ``t_test``
   the first step at which train / test accuracy >= ``acc_threshold`` (steps
   counted from the first recorded step):

   * ``comprehension`` -- both reached, and test follows train closely;
   * ``grokking`` -- both reached, and test lags: ``gap = t_test - t_train > 0``
     with ``gap >= grok_delay_factor * t_train`` or (if set) ``gap >= grok_min_gap``;
   * ``memorization`` -- train reached, test never did (or no test curve);
   * ``confusion`` -- train never reached.

3. Otherwise, on the training loss (``L0`` = initial loss, floored at ``loss_floor``):

   * ``catapult`` -- the loss rises far above ``L0`` (peak > ``catapult_factor`` x L0),
     then converges (final <= ``converge_factor`` x L0), and, when an NTK series is
     given, its final value is below its initial value (the catapult flattens);
   * ``lazy`` -- an NTK series is given, its largest relative change
     ``max_t |ntk_t / ntk_0 - 1|`` is < ``lazy_tol``, and the loss never exceeds
     ``catapult_factor`` x L0 (the kernel regime; convergence is not required);
   * ``converged`` -- final loss <= ``converge_factor`` x L0;
   * ``unconverged`` -- none of the above (e.g. a loss that stalled, or a loss
     spike that never came down). This catch-all keeps a run that did not
     converge from being called ``converged``.

Series may contain NaN where a quantity was not measured at a step (e.g. the NTK
measured every k steps); the first/last finite values are used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "PHASES",
    "LOSS_PHASES",
    "GENERALISATION_PHASES",
    "RUN_STATUSES",
    "PhaseThresholds",
    "RunTrajectory",
    "classify",
    "classify_many",
]

#: Phases of loss-only runs, in order of increasing step size where that makes sense.
LOSS_PHASES: tuple[str, ...] = ("lazy", "converged", "unconverged", "catapult", "diverged")
#: Phases of runs with train/test accuracy (Liu et al. 2022), best to worst.
GENERALISATION_PHASES: tuple[str, ...] = ("comprehension", "grokking", "memorization", "confusion")
#: Every label :func:`classify` can return, in a fixed order (use it for colours and legends).
PHASES: tuple[str, ...] = LOSS_PHASES[:-1] + GENERALISATION_PHASES + ("stopped", "diverged")
#: Statuses :func:`classify` accepts (a ``"failed"`` run has no trajectory to classify).
RUN_STATUSES: tuple[str, ...] = ("completed", "diverged", "stopped")


@dataclass(frozen=True)
class PhaseThresholds:
    """Knobs of the phase rules; every field has a default and is validated.

    Build from the sweep file's ``phases:`` mapping with :meth:`from_mapping`,
    which rejects unknown keys by name.
    """

    div_factor: float = 10.0
    """``diverged`` if the final training loss exceeds ``div_factor`` x the initial
    loss (in addition to a ``"diverged"`` status or any NaN/inf). Must be > 1."""

    catapult_factor: float = 2.0
    """A loss peak above ``catapult_factor`` x the initial loss counts as a catapult
    rise (and disqualifies ``lazy``). Must be > 1. The default 2 catches the uv
    model's catapult from eta*lambda_0 ~ 2.05-2.1 at width 1000 (the peak grows
    like (eta*lambda_0 - 2)^2 * width)."""

    converge_factor: float = 0.1
    """A run has converged if its final loss is <= ``converge_factor`` x the initial
    loss. Must be in (0, 1)."""

    lazy_tol: float = 0.1
    """``lazy`` requires the NTK top eigenvalue's largest relative change over
    training, ``max_t |ntk_t/ntk_0 - 1|``, to be < ``lazy_tol``. Must be in (0, 1)."""

    loss_floor: float = 1e-12
    """Absolute floor on the initial loss used in the ratios above, so that a run
    starting at (numerically) zero loss is not called a blow-up. Must be >= 0."""

    acc_threshold: float = 0.9
    """Accuracy that counts as 'reached' for train and test (fraction in (0, 1]).
    0.9 follows the 90% criterion used for grokking phase diagrams (Liu et al. 2022)."""

    grok_delay_factor: float = 1.0
    """``grokking`` if the test accuracy reaches ``acc_threshold`` at least
    ``grok_delay_factor`` x ``t_train`` steps after the train accuracy did (``t_train``
    is the number of steps train took). Must be > 0."""

    grok_min_gap: float | None = None
    """Optional absolute criterion: a gap of at least this many steps is
    ``grokking`` whatever ``t_train`` was. ``None`` disables it; else must be > 0."""

    def __post_init__(self) -> None:
        def num(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not math.isfinite(v):
                raise ValueError(f"phases.{name} must be a finite number, got {v!r}")
            return float(v)

        checks = {
            "div_factor": (lambda v: v > 1, "> 1"),
            "catapult_factor": (lambda v: v > 1, "> 1"),
            "converge_factor": (lambda v: 0 < v < 1, "in (0, 1)"),
            "lazy_tol": (lambda v: 0 < v < 1, "in (0, 1)"),
            "loss_floor": (lambda v: v >= 0, ">= 0"),
            "acc_threshold": (lambda v: 0 < v <= 1, "in (0, 1]"),
            "grok_delay_factor": (lambda v: v > 0, "> 0"),
        }
        for name, (ok, allowed) in checks.items():
            v = num(name)
            if not ok(v):
                raise ValueError(f"phases.{name} must be {allowed}, got {v!r}")
        if self.grok_min_gap is not None:
            v = num("grok_min_gap")
            if v <= 0:
                raise ValueError(f"phases.grok_min_gap must be > 0 or null, got {v!r}")
        if self.catapult_factor > self.div_factor:
            raise ValueError(
                f"phases.catapult_factor ({self.catapult_factor}) must not exceed phases.div_factor ({self.div_factor})"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> "PhaseThresholds":
        """Thresholds from a sweep file's ``phases:`` mapping; unknown keys are errors."""
        mapping = dict(mapping or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(mapping) - set(allowed))
        if unknown:
            raise ValueError(f"unknown key(s) phases.{', phases.'.join(unknown)}; allowed: {', '.join(allowed)}")
        return cls(**mapping)


def _series(name: str, value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    a = np.asarray(value, dtype=float)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"RunTrajectory.{name} must be 1-D with one entry per step ({n}), got shape {a.shape}")
    return a


@dataclass
class RunTrajectory:
    """One run's recorded series, aligned on ``steps``.

    Attributes:
        steps: (T,) increasing step numbers (need not start at 0 or be contiguous).
        train_loss: (T,) training loss at each step; entry 0 is the initial loss.
        test_loss, train_acc, test_acc: optional (T,) series; accuracies in [0, 1].
            NaN marks steps where a quantity was not evaluated.
        ntk: optional (T,) NTK top eigenvalue (NaN where not measured).
        sharpness: optional (T,) top Hessian eigenvalue (recorded, not used by the rules).
        status: ``"completed"``, ``"diverged"`` or ``"stopped"`` (see :data:`RUN_STATUSES`).
    """

    steps: np.ndarray
    train_loss: np.ndarray
    test_loss: np.ndarray | None = None
    train_acc: np.ndarray | None = None
    test_acc: np.ndarray | None = None
    ntk: np.ndarray | None = None
    sharpness: np.ndarray | None = None
    status: str = "completed"

    def __post_init__(self) -> None:
        steps = np.asarray(self.steps)
        if steps.ndim != 1 or steps.size == 0:
            raise ValueError(f"RunTrajectory.steps must be a non-empty 1-D array, got shape {steps.shape}")
        if not np.issubdtype(steps.dtype, np.number) or not np.all(np.isfinite(steps)):
            raise ValueError("RunTrajectory.steps must be finite numbers")
        if np.any(np.diff(steps) <= 0):
            raise ValueError("RunTrajectory.steps must be strictly increasing")
        self.steps = steps
        n = steps.size
        self.train_loss = _series("train_loss", self.train_loss, n)
        if self.train_loss is None:
            raise ValueError("RunTrajectory.train_loss is required")
        for name in ("test_loss", "train_acc", "test_acc", "ntk", "sharpness"):
            setattr(self, name, _series(name, getattr(self, name), n))
        for name in ("train_acc", "test_acc"):
            a = getattr(self, name)
            if a is not None and np.any((a[np.isfinite(a)] < 0) | (a[np.isfinite(a)] > 1)):
                raise ValueError(f"RunTrajectory.{name} must lie in [0, 1] (fractions, not percent)")
        if self.test_acc is not None and self.train_acc is None:
            raise ValueError("RunTrajectory.test_acc given without train_acc")
        if self.status not in RUN_STATUSES:
            raise ValueError(
                f"RunTrajectory.status {self.status!r} cannot be classified; allowed: {', '.join(RUN_STATUSES)}"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunTrajectory":
        """Build from a mapping that has (at least) ``steps`` and ``train_loss``; other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _first_reach(steps: np.ndarray, acc: np.ndarray | None, thr: float) -> float | None:
    """Steps elapsed from ``steps[0]`` until ``acc >= thr`` first holds; None if never."""
    if acc is None:
        return None
    hit = np.flatnonzero(np.nan_to_num(acc, nan=-1.0) >= thr)
    return None if hit.size == 0 else float(steps[hit[0]] - steps[0])


def _first_last_finite(a: np.ndarray) -> tuple[float, float] | None:
    idx = np.flatnonzero(np.isfinite(a))
    if idx.size == 0:
        return None
    return float(a[idx[0]]), float(a[idx[-1]])


def classify(run: RunTrajectory, thresholds: PhaseThresholds | None = None) -> str:
    """Label one run with a phase from :data:`PHASES` (rules in the module docstring)."""
    if not isinstance(run, RunTrajectory):
        raise ValueError(f"run must be a RunTrajectory, got {type(run).__name__}")
    th = thresholds if thresholds is not None else PhaseThresholds()
    if not isinstance(th, PhaseThresholds):
        raise ValueError(f"thresholds must be a PhaseThresholds, got {type(th).__name__}")
    loss = run.train_loss

    # 1. divergence: status, NaN/inf anywhere, or final loss far above initial.
    if run.status == "diverged" or not np.all(np.isfinite(loss)):
        return "diverged"
    L0 = max(float(loss[0]), th.loss_floor)
    if loss[-1] > th.div_factor * L0:
        return "diverged"
    if run.status == "stopped":  # cut short by early stopping: its own class, not judged as if finished
        return "stopped"

    # 2. generalisation phases, when accuracies are recorded.
    if run.train_acc is not None:
        t_train = _first_reach(run.steps, run.train_acc, th.acc_threshold)
        t_test = _first_reach(run.steps, run.test_acc, th.acc_threshold)
        if t_train is None:
            return "confusion"
        if t_test is None:
            return "memorization"
        gap = t_test - t_train
        if gap > 0 and (
            gap >= th.grok_delay_factor * t_train or (th.grok_min_gap is not None and gap >= th.grok_min_gap)
        ):
            return "grokking"
        return "comprehension"

    # 3. loss phases.
    peak = float(np.max(loss))
    rose = peak > th.catapult_factor * L0
    converged = float(loss[-1]) <= th.converge_factor * L0
    ntk = _first_last_finite(run.ntk) if run.ntk is not None else None
    if ntk is not None and not ntk[0] > 0:
        raise ValueError(f"RunTrajectory.ntk must start positive (an NTK top eigenvalue), got {ntk[0]!r}")
    if rose and converged and (ntk is None or ntk[1] < ntk[0]):
        return "catapult"
    if ntk is not None and not rose:
        rel = np.nanmax(np.abs(run.ntk / ntk[0] - 1.0))
        if rel < th.lazy_tol:
            return "lazy"
    return "converged" if converged else "unconverged"


def classify_many(runs: Sequence[RunTrajectory], thresholds: PhaseThresholds | None = None) -> list[str]:
    """:func:`classify` over a sequence of runs."""
    return [classify(r, thresholds) for r in runs]
