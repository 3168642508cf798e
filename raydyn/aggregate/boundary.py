"""Phase boundaries along one axis. Pure: values and labels in, dataclasses out.

Given labelled points on an axis (e.g. the learning rate, possibly log-spaced),
with possibly several labels per point (seeds), :func:`find_boundaries` returns
one :class:`Boundary` per change of the per-point majority label between
consecutive points:

* ``location`` -- midpoint of the two bracketing points (geometric mean on a log axis);
* ``lower, upper`` -- the uncertainty interval: the two bracketing points, widened
  to the next point outward on a side whose bracketing point is not unanimous
  (some seeds there disagree, so the switch may lie beyond it);
* ``left_fraction, right_fraction`` -- fraction of seeds at each bracketing point
  that carry that side's majority label (1.0 when unanimous).

A phase that lives entirely between two grid points is invisible here; refine
the grid (:mod:`raydyn.aggregate.bisect`) to find it.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal, Sequence, Union

import numpy as np

__all__ = [
    "Boundary",
    "AxisPoints",
    "summarise_points",
    "find_boundaries",
    "find_boundaries_rows",
    "infer_log",
    "axis_distance",
    "axis_midpoint",
]

LogArg = Union[bool, Literal["auto"]]


@dataclass(frozen=True)
class Boundary:
    """One boundary between consecutive distinct phases on an axis.

    Attributes:
        left_phase, right_phase: majority labels just below / above the boundary.
        location: point estimate (midpoint of ``left_value`` and ``right_value``;
            geometric on a log axis), in axis units.
        lower, upper: uncertainty interval in axis units (``lower <= location <= upper``).
        left_value, right_value: the bracketing points (last point of the left
            phase, first point of the right phase).
        left_fraction, right_fraction: share of seeds at the bracketing points that
            carry ``left_phase`` / ``right_phase``.
        widened: True when the interval was widened beyond the bracketing points.
        log: whether distances and midpoints are taken in log space.
    """

    left_phase: str
    right_phase: str
    location: float
    lower: float
    upper: float
    left_value: float
    right_value: float
    left_fraction: float
    right_fraction: float
    widened: bool
    log: bool

    @property
    def width(self) -> float:
        """Interval width: ``upper - lower``, or ``ln(upper/lower)`` on a log axis."""
        return axis_distance(self.lower, self.upper, self.log)

    @property
    def resolved_width(self) -> float:
        """Width in the units a refinement tolerance uses: ``upper - lower`` on a
        linear axis, ``upper/lower - 1`` on a log axis."""
        return math.expm1(self.width) if self.log else self.width

    def contains(self, x: float) -> bool:
        """True if ``lower <= x <= upper``."""
        return self.lower <= x <= self.upper


@dataclass(frozen=True)
class AxisPoints:
    """Labels grouped per distinct axis value (sorted ascending).

    Attributes:
        values: (k,) distinct axis values.
        majority: (k,) majority label per value.
        fraction: (k,) share of that value's labels equal to its majority.
        counts: per value, a ``Counter`` of labels.
    """

    values: np.ndarray
    majority: list[str]
    fraction: np.ndarray
    counts: list[Counter]


def infer_log(values: Sequence[float]) -> bool:
    """Guess whether an axis is log-spaced: all values > 0 and either spanning at
    least a decade or with steadier ratios than differences between neighbours."""
    v = np.unique(np.asarray(values, dtype=float))
    if v.size < 2 or np.any(v <= 0):
        return False
    if v[-1] / v[0] >= 10:
        return True
    if v.size < 3:
        return False
    r, d = v[1:] / v[:-1], np.diff(v)
    return bool(np.std(np.log(r)) / np.mean(np.log(r)) < 0.5 * np.std(d) / np.mean(d))


def axis_distance(a: float, b: float, log: bool) -> float:
    """``|b - a|``, or ``|ln(b/a)|`` on a log axis."""
    return abs(math.log(b / a)) if log else abs(b - a)


def axis_midpoint(a: float, b: float, log: bool) -> float:
    """``(a + b)/2``, or ``sqrt(a b)`` on a log axis."""
    return math.sqrt(a * b) if log else 0.5 * (a + b)


def _pairs(values: Any, labels: Any) -> list[tuple[float, str]]:
    """Flatten (values, labels) -- a label may be a string or a sequence of seed labels -- into pairs."""
    vals = np.asarray(values, dtype=float)
    if vals.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {vals.shape}")
    labels = list(labels)
    if len(labels) != vals.size:
        raise ValueError(f"values and labels differ in length: {vals.size} vs {len(labels)}")
    if not np.all(np.isfinite(vals)):
        raise ValueError("values must be finite")
    out: list[tuple[float, str]] = []
    for x, lab in zip(vals.tolist(), labels):
        if isinstance(lab, str):
            seeds = [lab]
        elif isinstance(lab, (list, tuple, np.ndarray)):
            seeds = list(lab)
        else:
            raise ValueError(f"labels must be strings (phase names) or sequences of them, got {lab!r} at value {x}")
        if not seeds:
            raise ValueError(f"no label given at value {x}")
        for s in seeds:
            if not isinstance(s, str):
                raise ValueError(f"labels must be strings (phase names), got {s!r} at value {x}")
            out.append((float(x), s))
    return out


def summarise_points(values: Any, labels: Any) -> AxisPoints:
    """Group labels per distinct value; majority label and its share per value.

    ``labels[i]`` is the label at ``values[i]`` -- a string, or a sequence of labels
    (one per seed). Repeated values are merged. Ties in the majority go to the
    label of the previous point if it is among the tied ones, else the
    alphabetically first.
    """
    pairs = _pairs(values, labels)
    if not pairs:
        raise ValueError("no labelled points")
    by: dict[float, Counter] = {}
    for x, s in pairs:
        by.setdefault(x, Counter())[s] += 1
    xs = sorted(by)
    majority: list[str] = []
    fraction = np.empty(len(xs))
    for i, x in enumerate(xs):
        c = by[x]
        top = max(c.values())
        tied = sorted(k for k, v in c.items() if v == top)
        m = majority[-1] if majority and majority[-1] in tied else tied[0]
        majority.append(m)
        fraction[i] = top / sum(c.values())
    return AxisPoints(np.array(xs), majority, fraction, [by[x] for x in xs])


def _resolve_log(log: LogArg, xs: np.ndarray) -> bool:
    if log == "auto":
        return infer_log(xs)
    if not isinstance(log, (bool, np.bool_)):
        raise ValueError(f"log must be True, False or 'auto', got {log!r}")
    if log and np.any(xs <= 0):
        raise ValueError(f"log=True needs positive axis values, got min {xs.min()!r}")
    return bool(log)


def find_boundaries(values: Any, labels: Any, log: LogArg = "auto") -> list[Boundary]:
    """Boundaries between consecutive distinct (majority) phases along one axis.

    Args:
        values: (n,) axis values, any order, repeats allowed (seeds).
        labels: (n,) labels: ``labels[i]`` is a phase name or a sequence of phase
            names (one per seed) at ``values[i]``.
        log: treat the axis as log-spaced (midpoints are geometric means); ``"auto"``
            guesses with :func:`infer_log`.

    Returns:
        Boundaries sorted by location (empty if a single phase is seen).
    """
    pts = summarise_points(values, labels)
    xs = pts.values
    is_log = _resolve_log(log, xs)
    out: list[Boundary] = []
    for i in range(len(xs) - 1):
        a, b = pts.majority[i], pts.majority[i + 1]
        if a == b:
            continue
        lo, hi, widened = xs[i], xs[i + 1], False
        if pts.fraction[i] < 1 and i > 0:
            lo, widened = xs[i - 1], True
        if pts.fraction[i + 1] < 1 and i + 2 < len(xs):
            hi, widened = xs[i + 2], True
        out.append(
            Boundary(
                left_phase=a,
                right_phase=b,
                location=axis_midpoint(float(xs[i]), float(xs[i + 1]), is_log),
                lower=float(lo),
                upper=float(hi),
                left_value=float(xs[i]),
                right_value=float(xs[i + 1]),
                left_fraction=float(pts.counts[i][a] / sum(pts.counts[i].values())),
                right_fraction=float(pts.counts[i + 1][b] / sum(pts.counts[i + 1].values())),
                widened=widened,
                log=is_log,
            )
        )
    return out


def find_boundaries_rows(
    x_values: Any, labels_2d: Sequence[Sequence[Any]], log: LogArg = "auto"
) -> list[list[Boundary]]:
    """:func:`find_boundaries` along ``x`` for every row of a 2-D grid.

    ``labels_2d[i][j]`` is the label (or seed labels) at ``(x_values[j], row i)``.
    Returns one list of boundaries per row. To scan along the other axis, transpose.
    """
    xs = np.asarray(x_values, dtype=float)
    is_log = _resolve_log(log, xs)
    out = []
    for i, row in enumerate(labels_2d):
        row = list(row)
        if len(row) != xs.size:
            raise ValueError(f"row {i} of labels_2d has {len(row)} entries, expected len(x_values) = {xs.size}")
        out.append(find_boundaries(xs, row, log=is_log))
    return out
