"""Categorical phase maps (a label per run, e.g. ``phase``) and boundaries along one axis.

Info first, drawing second (in :mod:`raydyn.plots.maps`), as in :mod:`raydyn.aggregate.maps`:

* :func:`category_map_info` aggregates a string column of the runs table over two
  swept axes (plus facets): per cell the most frequent label, its share of the
  cell's runs, and the counts; neighbouring cells with different labels mark a
  boundary (``x_edges``/``y_edges``). Cells with no labelled run are missing
  (label ``None``, fraction NaN), never a category of their own.
* :func:`boundaries_along` finds the boundaries along one axis (e.g. ``lr``), one
  list per combination of the ``by`` columns, with uncertainty intervals, using
  :func:`raydyn.aggregate.boundary.find_boundaries` (seeds are replicates).

:func:`raydyn.plots.maps.render_category_map` / :func:`raydyn.plots.maps.draw_category_map` draw the
info: discrete colours, the share as annotation, a legend, boundaries as thick lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.aggregate.axes import GridAxes, is_log_spaced, sort_key
from raydyn.aggregate.boundary import Boundary, find_boundaries
from raydyn.analysis.phase import PHASES
from raydyn.errors import RaydynError

__all__ = ["CategoryMapInfo", "category_map_info", "is_categorical", "AxisBoundaries", "boundaries_along"]


@dataclass
class CategoryMapInfo(GridAxes):
    """Everything a categorical phase map shows. Arrays are (n_facets, len(y_values), len(x_values)).

    Attributes:
        categories: labels present, in :data:`raydyn.analysis.phase.PHASES` order (others after, sorted).
        label: (F, Y, X) object array, the most frequent label per cell (ties: the earlier
            category), ``None`` where the cell has no labelled run.
        fraction: share of the cell's runs carrying ``label`` (NaN when missing).
        n_runs: labelled runs per cell.
        counts: (F, Y, X, C) runs per cell and category.
        x_edges: (F, Y, X-1) True where cells ``j`` and ``j+1`` of a row are both present and differ.
        y_edges: (F, Y-1, X) True where cells ``i`` and ``i+1`` of a column are both present and differ.
    """

    categories: list[str]
    label: np.ndarray
    fraction: np.ndarray
    n_runs: np.ndarray
    counts: np.ndarray
    x_edges: np.ndarray
    y_edges: np.ndarray
    x_log: bool
    y_log: bool


def is_categorical(runs: pa.Table, metric: str) -> bool:
    """True when ``metric`` is a string (or dictionary) column of ``runs``."""
    if metric not in runs.column_names:
        return False
    t = runs.schema.field(metric).type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t)


def _order(labels: set[str]) -> list[str]:
    known = [p for p in PHASES if p in labels]
    return known + sorted(labels - set(known))


def _check_columns(runs: pa.Table, names: Sequence[tuple[str, str]]) -> None:
    cols = set(runs.column_names)
    for role, name in names:
        if name not in cols:
            raise RaydynError(f"{role} {name!r} is not a column of the runs table; columns: "
                              f"{', '.join(sorted(cols))}")


def category_map_info(runs: pa.Table, metric: str, x: str, y: str, facets: Sequence[str] = ()) -> CategoryMapInfo:
    """Aggregate a label column of the runs table into a categorical phase-map grid."""
    from raydyn.spec import column_name

    cols = set(runs.column_names)
    x, y = (column_name(a) if a not in cols else a for a in (x, y))
    facets = [column_name(f) if f not in cols else f for f in facets]
    _check_columns(runs, [("--metric", metric), ("--x", x), ("--y", y)] + [("--facet", f) for f in facets])
    if x == y:
        raise RaydynError(f"--x and --y must differ (both are {x!r})")
    d = runs.to_pydict()
    xv = sorted(set(d[x]), key=sort_key)
    yv = sorted(set(d[y]), key=sort_key)
    fv = sorted(set(zip(*[d[f] for f in facets])), key=lambda t: tuple(sort_key(v) for v in t)) if facets else [()]
    labels = [v for v in d[metric] if v is not None]
    cats = _order(set(labels))
    ci = {c: i for i, c in enumerate(cats)}
    F, Y, X, C = len(fv), len(yv), len(xv), len(cats)
    counts = np.zeros((F, Y, X, C), dtype=int)
    fi_of = {f: i for i, f in enumerate(fv)}
    xi_of = {v: i for i, v in enumerate(xv)}
    yi_of = {v: i for i, v in enumerate(yv)}
    for r in range(runs.num_rows):
        lab = d[metric][r]
        if lab is None:
            continue
        k = fi_of[tuple(d[f][r] for f in facets)] if facets else 0
        counts[k, yi_of[d[y][r]], xi_of[d[x][r]], ci[lab]] += 1
    n_runs = counts.sum(-1)
    label = np.full((F, Y, X), None, dtype=object)
    fraction = np.full((F, Y, X), np.nan)
    for idx in zip(*np.nonzero(n_runs)):
        c = counts[idx]
        top = int(np.argmax(c))  # first maximum: ties go to the earlier category
        label[idx] = cats[top]
        fraction[idx] = c[top] / n_runs[idx]
    present = n_runs > 0
    x_edges = present[:, :, :-1] & present[:, :, 1:] & (label[:, :, :-1] != label[:, :, 1:])
    y_edges = present[:, :-1, :] & present[:, 1:, :] & (label[:, :-1, :] != label[:, 1:, :])
    return CategoryMapInfo(metric, x, y, list(facets), fv, xv, yv, cats, label, fraction, n_runs, counts,
                           x_edges.astype(bool), y_edges.astype(bool), is_log_spaced(xv), is_log_spaced(yv))


@dataclass
class AxisBoundaries:
    """Boundaries along ``axis`` for one combination of the ``by`` columns (``group``)."""

    axis: str
    group: dict[str, Any]
    boundaries: list[Boundary]
    n_points: int
    n_runs: int

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per boundary (for tables, CSV and JSON)."""
        return [{**self.group, "left_phase": b.left_phase, "right_phase": b.right_phase, "location": b.location,
                 "lower": b.lower, "upper": b.upper, "interval_width": b.upper - b.lower,
                 "left_fraction": b.left_fraction, "right_fraction": b.right_fraction, "widened": b.widened}
                for b in self.boundaries]


def boundaries_along(runs: pa.Table, metric: str, axis: str, by: Sequence[str] = (),
                     log: bool | str = "auto") -> list[AxisBoundaries]:
    """Boundaries of a label column along a numeric ``axis``, one result per ``by`` group.

    Runs without a label are ignored; runs sharing an axis value within a group (seeds,
    and any column not in ``by``) are replicates: the majority label counts and a
    split point widens the uncertainty interval (:func:`raydyn.aggregate.boundary.find_boundaries`).
    """
    _check_columns(runs, [("--metric", metric), ("--axis", axis)] + [("--by", b) for b in by])
    if axis in by:
        raise RaydynError(f"--by {axis!r} is the axis itself")
    d = runs.to_pydict()
    groups: dict[tuple, list[tuple[float, str]]] = {}
    for r in range(runs.num_rows):
        lab, v = d[metric][r], d[axis][r]
        if lab is None or v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise RaydynError(f"--axis {axis!r} must be numeric, got {d[axis][r]!r}") from None
        if not math.isfinite(v):
            continue
        groups.setdefault(tuple(d[b][r] for b in by), []).append((v, str(lab)))
    out = []
    for key in sorted(groups, key=lambda t: tuple(sort_key(v) for v in t)):
        pts = groups[key]
        xs = sorted({v for v, _ in pts})
        bs = find_boundaries([v for v, _ in pts], [s for _, s in pts], log=log) if len(xs) >= 2 else []
        out.append(AxisBoundaries(axis, dict(zip(by, key)), bs, len(xs), len(pts)))
    return out
