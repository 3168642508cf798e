"""Categorical phase maps (a label per run, e.g. ``phase``) and boundaries along one axis.

Info first, drawing second, as in :mod:`raydyn.phase.maps`:

* :func:`category_map_info` aggregates a string column of the runs table over two
  swept axes (plus facets): per cell the most frequent label, its share of the
  cell's runs, and the counts; neighbouring cells with different labels mark a
  boundary (``x_edges``/``y_edges``). Cells with no labelled run are missing
  (label ``None``, fraction NaN), never a category of their own.
* :func:`boundaries_along` finds the boundaries along one axis (e.g. ``lr``), one
  list per combination of the ``by`` columns, with uncertainty intervals, using
  :func:`raydyn.phase.boundary.find_boundaries` (seeds are replicates).
* :func:`render_category_map` / :func:`draw_category_map` draw the info: discrete
  colours, the share as annotation, a legend, boundaries as thick lines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.phase.boundary import Boundary, find_boundaries
from raydyn.phase.classify import PHASES
from raydyn.phase.maps import _edges, _sort_key, is_log_spaced

__all__ = ["CategoryMapInfo", "category_map_info", "is_categorical", "AxisBoundaries", "boundaries_along",
           "render_category_map", "draw_category_map", "PHASE_COLORS"]

#: Fixed colours of the phases (so maps of different sweeps agree); other labels get tab10 colours.
PHASE_COLORS = {
    "lazy": "#9ecae1", "converged": "#31a354", "unconverged": "#bdbdbd", "catapult": "#fd8d3c",
    "comprehension": "#a0da39", "grokking": "#fde725", "memorization": "#46327e", "confusion": "#1e1e1e",
    "stopped": "#7f7f7f", "diverged": "#d62728",
}


@dataclass
class CategoryMapInfo:
    """Everything a categorical phase map shows. Arrays are (n_facets, len(y_values), len(x_values)).

    Attributes:
        categories: labels present, in :data:`raydyn.phase.classify.PHASES` order (others after, sorted).
        label: (F, Y, X) object array, the most frequent label per cell (ties: the earlier
            category), ``None`` where the cell has no labelled run.
        fraction: share of the cell's runs carrying ``label`` (NaN when missing).
        n_runs: labelled runs per cell.
        counts: (F, Y, X, C) runs per cell and category.
        x_edges: (F, Y, X-1) True where cells ``j`` and ``j+1`` of a row are both present and differ.
        y_edges: (F, Y-1, X) True where cells ``i`` and ``i+1`` of a column are both present and differ.
    """

    metric: str
    x: str
    y: str
    facets: list[str]
    facet_values: list[tuple[Any, ...]]
    x_values: list[Any]
    y_values: list[Any]
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
    xv = sorted(set(d[x]), key=_sort_key)
    yv = sorted(set(d[y]), key=_sort_key)
    fv = sorted(set(zip(*[d[f] for f in facets])), key=lambda t: tuple(_sort_key(v) for v in t)) if facets else [()]
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
    split point widens the uncertainty interval (:func:`raydyn.phase.boundary.find_boundaries`).
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
    for key in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t)):
        pts = groups[key]
        xs = sorted({v for v, _ in pts})
        bs = find_boundaries([v for v, _ in pts], [s for _, s in pts], log=log) if len(xs) >= 2 else []
        out.append(AxisBoundaries(axis, dict(zip(by, key)), bs, len(xs), len(pts)))
    return out


# --------------------------------------------------------------------------- drawing
def _colors(cats: list[str]) -> list[str]:
    import matplotlib

    tab = matplotlib.colormaps["tab10"]
    extra = iter(range(10))
    return [PHASE_COLORS.get(c) or matplotlib.colors.to_hex(tab(next(extra) % 10)) for c in cats]


def _spaced(pos: np.ndarray, gap: float) -> list[int]:
    """Indices of positions kept greedily left to right at least ``gap`` apart (the first always kept)."""
    keep: list[int] = []
    for i, p in enumerate(pos):
        if not keep or p - pos[keep[-1]] >= gap:
            keep.append(i)
    return keep


def render_category_map(info: CategoryMapInfo, title: str | None = None, *, xlabel: str | None = None,
                        ylabel: str | None = None):
    """One panel per facet value: the majority label's colour per cell, its share written in the
    cell (when the grid is small), boundaries as thick black lines, missing cells hatched grey.
    Axis labels default to readable names (:func:`raydyn.plots.labels.readable`)."""
    from raydyn.phase.maps import _facet_title
    from raydyn.plots.labels import grid_axes, readable, text_color_on

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap, to_rgb
    from matplotlib.patches import Patch, Rectangle

    n = len(info.facet_values)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    height = 3.9 * nrows + 1.1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.6, height), squeeze=False)
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=1.05 / height, hspace=0.35, right=0.8)
    colors = _colors(info.categories) or ["#ffffff"]
    cmap = ListedColormap(colors)
    norm = BoundaryNorm(np.arange(len(colors) + 1) - 0.5, len(colors))
    ci = {c: i for i, c in enumerate(info.categories)}
    xc, xe, _ = _edges(info.x_values, info.x_log)
    yc, ye, _ = _edges(info.y_values, info.y_log)
    annotate = len(info.x_values) * len(info.y_values) <= 100
    # refined axes have uneven cells: write shares and tick labels only where there is room
    tx = np.log(xe) if info.x_log else np.asarray(xe, float)
    wide = np.diff(tx) >= (tx[-1] - tx[0]) / 25
    xticks = _spaced(np.log(xc) if info.x_log else np.asarray(xc, float), (tx[-1] - tx[0]) / 12)
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        if k >= n:
            ax.axis("off")
            continue
        ax.set_facecolor("#eeeeee")
        idx = np.array([[ci[v] if v is not None else np.nan for v in row] for row in info.label[k]], dtype=float)
        ax.pcolormesh(xe, ye, np.ma.masked_invalid(idx), cmap=cmap, norm=norm, shading="flat")
        for i in range(len(info.y_values)):
            for j in range(len(info.x_values)):
                x0, x1, y0, y1 = xe[j], xe[j + 1], ye[i], ye[i + 1]
                if info.n_runs[k, i, j] == 0:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, hatch="..", edgecolor="#b0b0b0",
                                           lw=0))
                elif annotate and wide[j]:
                    ax.text(xc[j], yc[i], f"{info.fraction[k, i, j]:.0%}", ha="center", va="center", fontsize=7,
                            color=text_color_on(to_rgb(colors[ci[info.label[k, i, j]]])))
        for i, j in zip(*np.nonzero(info.x_edges[k])):  # vertical segment between columns j and j+1
            ax.plot([xe[j + 1], xe[j + 1]], [ye[i], ye[i + 1]], color="black", lw=2.2, solid_capstyle="butt")
        for i, j in zip(*np.nonzero(info.y_edges[k])):  # horizontal segment between rows i and i+1
            ax.plot([xe[j], xe[j + 1]], [ye[i + 1], ye[i + 1]], color="black", lw=2.2, solid_capstyle="butt")
        grid_axes(ax, xe, ye, info.x_log, info.y_log,
                  (xc[xticks], [f"{v:.4g}" if isinstance(v, (int, float)) else str(v)
                                for v in np.asarray(info.x_values, dtype=object)[xticks]]),
                  (yc, [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in info.y_values]))
        if k + ncols >= n:  # the lowest panel of its column
            ax.set_xlabel(xlabel if xlabel is not None else readable(info.x))
        if k % ncols == 0:
            ax.set_ylabel(ylabel if ylabel is not None else readable(info.y))
        if info.facets:
            ax.set_title(_facet_title(info.facets, info.facet_values[k]), fontsize=9)
    handles = [Patch(facecolor=c, edgecolor="#555555", label=name) for name, c in zip(info.categories, colors)]
    handles.append(Patch(facecolor="#eeeeee", hatch="..", edgecolor="#b0b0b0", label="no runs"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False, title=info.metric)
    fig.text(0.01, 0.01, "cell: most frequent label; number: its share of the cell's runs; thick lines: boundaries",
             fontsize=7, color="#555555")
    fig.suptitle(title or f"{info.metric} over {info.x} × {info.y}", y=0.985)
    return fig


def draw_category_map(info: CategoryMapInfo, path: str | Path, title: str | None = None, *, dpi: int = 110,
                      xlabel: str | None = None, ylabel: str | None = None) -> Path:
    """Draw :func:`render_category_map` to ``path``: PNG, PDF or SVG after its suffix (another suffix is a
    RaydynError); returns the path."""
    from raydyn.plots.labels import figure_format, save_figure

    figure_format(path)  # refuse a bad suffix before drawing
    return save_figure(render_category_map(info, title, xlabel=xlabel, ylabel=ylabel), path, dpi=dpi)
