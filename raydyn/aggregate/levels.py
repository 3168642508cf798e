"""Where a numeric metric crosses a level along one axis (``raydyn phase-boundary --metric M --level X``).

The numeric counterpart of :func:`raydyn.aggregate.categorical.boundaries_along`: per group of the
``by`` columns, the metric's median over the runs at each axis value (seeds, and any column not in
``by``, are replicates; diverged runs and NaN/inf values are left out, as in a phase map), then
every sign change of ``median - level`` between neighbouring axis values is one crossing, located
by linear interpolation between the two points (in log space on a log-spaced axis). A median equal
to the level between values on opposite sides is the crossing itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.aggregate.axes import sort_key
from raydyn.aggregate.boundary import LogArg, _resolve_log
from raydyn.errors import RaydynError

__all__ = ["LevelCrossing", "AxisCrossings", "level_crossings", "is_numeric"]


def is_numeric(runs: pa.Table, column: str) -> bool:
    """True when ``column`` is an integer or floating-point column of ``runs``."""
    if column not in runs.column_names:
        return False
    t = runs.schema.field(column).type
    return pa.types.is_integer(t) or pa.types.is_floating(t)


@dataclass(frozen=True)
class LevelCrossing:
    """One crossing of ``level`` between neighbouring axis values ``lower`` < ``upper``.

    Attributes:
        direction: ``rises`` (the median goes from below the level to above it) or ``falls``.
        location: the interpolated axis value where the median equals the level.
        lower, upper: the bracketing axis values; ``lower_median``, ``upper_median`` the medians there.
        log: whether the interpolation was done in log space.
    """

    direction: str
    location: float
    lower: float
    upper: float
    lower_median: float
    upper_median: float
    log: bool


@dataclass
class AxisCrossings:
    """Crossings along ``axis`` for one combination of the ``by`` columns (``group``)."""

    axis: str
    level: float
    group: dict[str, Any]
    crossings: list[LevelCrossing]
    n_points: int
    n_runs: int

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per crossing (for tables, CSV and JSON)."""
        return [{**self.group, "level": self.level, "direction": c.direction, "location": c.location,
                 "lower": c.lower, "upper": c.upper, "lower_median": c.lower_median, "upper_median": c.upper_median}
                for c in self.crossings]


def _crossings(xs: np.ndarray, med: np.ndarray, level: float, log: bool) -> list[LevelCrossing]:
    """Crossings of ``level`` by the piecewise-linear curve through (xs, med); xs sorted, unique."""
    d = med - level
    signed = [i for i in range(len(xs)) if d[i] != 0]
    out = []
    for i, j in zip(signed, signed[1:]):
        if (d[i] > 0) == (d[j] > 0):
            continue
        direction = "rises" if d[i] < 0 else "falls"
        if j > i + 1:  # the medians in between equal the level: the first of them is the crossing
            loc = float(xs[i + 1])
        else:
            t = d[i] / (d[i] - d[j])
            a, b = (math.log(xs[i]), math.log(xs[j])) if log else (float(xs[i]), float(xs[j]))
            loc = a + t * (b - a)
            loc = math.exp(loc) if log else loc
        out.append(LevelCrossing(direction, float(loc), float(xs[i]), float(xs[j]), float(med[i]), float(med[j]),
                                 log))
    return out


def level_crossings(runs: pa.Table, metric: str, axis: str, level: float, by: Sequence[str] = (),
                    log: LogArg = "auto") -> list[AxisCrossings]:
    """Where the median over replicates of the numeric ``metric`` crosses ``level`` along ``axis``,
    one result per ``by`` group (see the module docstring). ``log="auto"`` interpolates in log
    space when the axis values are log-spaced (:func:`raydyn.aggregate.boundary.infer_log`)."""
    cols = set(runs.column_names)
    for role, name in [("--metric", metric), ("--axis", axis)] + [("--by", b) for b in by]:
        if name not in cols:
            raise RaydynError(f"{role} {name!r} is not a column of the runs table; columns: {', '.join(sorted(cols))}")
    if axis in by:
        raise RaydynError(f"--by {axis!r} is the axis itself")
    if not is_numeric(runs, metric):
        raise RaydynError(f"--level needs a numeric --metric; {metric!r} is a "
                          f"{runs.schema.field(metric).type} column (a label column such as phase: drop --level "
                          "to find where its label changes)")
    if not math.isfinite(level):
        raise RaydynError(f"--level {level}: give a finite number")
    d = runs.to_pydict()
    status = d.get("status", [None] * runs.num_rows)
    groups: dict[tuple, dict[float, list[float]]] = {}
    n_runs: dict[tuple, int] = {}
    for r in range(runs.num_rows):
        v, m = d[axis][r], d[metric][r]
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RaydynError(f"--axis {axis!r} must be numeric, got {d[axis][r]!r}") from None
        key = tuple(d[b][r] for b in by)
        pts = groups.setdefault(key, {})
        if status[r] == "diverged" or m is None or not math.isfinite(v) or not math.isfinite(float(m)):
            continue
        pts.setdefault(v, []).append(float(m))
        n_runs[key] = n_runs.get(key, 0) + 1
    out = []
    for key in sorted(groups, key=lambda t: tuple(sort_key(v) for v in t)):
        pts = groups[key]
        xs = np.array(sorted(pts), dtype=float)
        med = np.array([np.median(pts[x]) for x in xs], dtype=float)
        found = _crossings(xs, med, float(level), _resolve_log(log, xs)) if len(xs) >= 2 else []
        out.append(AxisCrossings(axis, float(level), dict(zip(by, key)), found, len(xs), n_runs.get(key, 0)))
    return out
