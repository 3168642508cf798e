"""Phase maps: a metric over two swept axes, one panel per value of the remaining axes.

Info first, drawing second (as Optuna's visualisation modules do): the numbers
in :class:`PhaseMapInfo` are tested without drawing anything.

Seeds (and any axis not used for x, y or facets) are aggregated per cell: the
median and IQR of the metric over runs that did not diverge, the number of runs
and the fraction that diverged. A cell with no runs is missing (NaN), never 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError


@dataclass
class PhaseMapInfo:
    """Everything a phase map shows. Arrays are (n_facets, len(y_values), len(x_values))."""

    metric: str
    x: str
    y: str
    facets: list[str]
    facet_values: list[tuple[Any, ...]]
    x_values: list[Any]
    y_values: list[Any]
    median: np.ndarray
    iqr: np.ndarray
    n_runs: np.ndarray
    diverged_frac: np.ndarray
    x_log: bool
    y_log: bool


def is_log_spaced(values: Sequence[Any]) -> bool:
    """True for positive numeric values spanning at least a decade, or with near-constant ratios."""
    try:
        v = np.array(sorted(float(x) for x in values))
    except (TypeError, ValueError):
        return False
    if len(v) < 2 or (v <= 0).any():
        return False
    if v[-1] / v[0] >= 10:
        return True
    if len(v) < 3:
        return False
    r = v[1:] / v[:-1]
    d = np.diff(v)
    return bool(np.ptp(r) / r.mean() < 0.05 and np.ptp(d) / d.mean() > 0.05)


def phase_map_info(
    runs: pa.Table,
    metric: str,
    x: str,
    y: str,
    facets: Sequence[str] = (),
) -> PhaseMapInfo:
    """Aggregate the runs table into a phase-map grid. Raises RaydynError naming unknown columns.

    Axes may be given as swept parameter names (``data.p``, ``model_options.k``) or as columns."""
    from raydyn.spec import column_name

    cols = set(runs.column_names)
    x, y = (column_name(a) if a not in cols else a for a in (x, y))
    facets = [column_name(f) if f not in cols else f for f in facets]
    for role, name in [("--metric", metric), ("--x", x), ("--y", y)] + [("--facet", f) for f in facets]:
        if name not in cols:
            numeric = sorted(c for c in cols if pa.types.is_floating(runs.schema.field(c).type)
                             or pa.types.is_integer(runs.schema.field(c).type))
            raise RaydynError(f"{role} {name!r} is not a column of the runs table; columns: {', '.join(numeric)}")
    if x == y:
        raise RaydynError(f"--x and --y must differ (both are {x!r})")
    d = runs.to_pydict()
    status = d.get("status", ["completed"] * runs.num_rows)
    xv = sorted(set(d[x]), key=_sort_key)
    yv = sorted(set(d[y]), key=_sort_key)
    fv = sorted(set(zip(*[d[f] for f in facets])), key=lambda t: tuple(_sort_key(v) for v in t)) if facets else [()]
    shape = (len(fv), len(yv), len(xv))
    vals: dict[tuple[int, int, int], list[float]] = {}
    div: dict[tuple[int, int, int], list[bool]] = {}
    fi_of = {f: i for i, f in enumerate(fv)}
    xi_of = {v: i for i, v in enumerate(xv)}
    yi_of = {v: i for i, v in enumerate(yv)}
    for r in range(runs.num_rows):
        key = (fi_of[tuple(d[f][r] for f in facets)] if facets else 0, yi_of[d[y][r]], xi_of[d[x][r]])
        diverged = status[r] == "diverged"
        div.setdefault(key, []).append(diverged)
        v = d[metric][r]
        if not diverged and v is not None and math.isfinite(v):
            vals.setdefault(key, []).append(float(v))
    median = np.full(shape, np.nan)
    iqr = np.full(shape, np.nan)
    n_runs = np.zeros(shape, dtype=int)
    dfrac = np.full(shape, np.nan)
    for key, flags in div.items():
        n_runs[key] = len(flags)
        dfrac[key] = sum(flags) / len(flags)
        if key in vals:
            q1, q2, q3 = np.percentile(vals[key], [25, 50, 75])
            median[key], iqr[key] = q2, q3 - q1
    return PhaseMapInfo(metric, x, y, list(facets), fv, xv, yv, median, iqr, n_runs, dfrac,
                        is_log_spaced(xv), is_log_spaced(yv))


def runs_with_metrics(store: Any, sweep: str) -> pa.Table:
    """The runs table of ``sweep`` joined with every analysis summary table (``*_summary``, keyed by run_id).

    This is how any analysis becomes a phase-map metric: its job writes a
    ``<analysis>_summary`` table with one row per run.
    """
    runs = _no_null_columns(store.table("runs", sweep=sweep))
    for name in store.tables():
        if not name.endswith("_summary"):
            continue
        summary = store.table(name, sweep=sweep)
        if summary.num_rows == 0 or "run_id" not in summary.column_names:
            continue
        drop = [c for c in summary.column_names if c != "run_id" and (c in runs.column_names or c == "options_json")]
        summary = _no_null_columns(summary.drop_columns(drop))
        runs = runs.join(summary, "run_id", join_type="left outer")
    return runs


def _no_null_columns(t: pa.Table) -> pa.Table:
    """All-null columns (e.g. a setting left at None) as string columns: Arrow joins reject the null type."""
    for i, f in enumerate(t.schema):
        if pa.types.is_null(f.type):
            t = t.set_column(i, f.name, t.column(i).cast(pa.string()))
    return t


def _sort_key(v: Any) -> tuple[int, Any]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def _edges(values: list[Any], log: bool) -> tuple[np.ndarray, np.ndarray, bool]:
    """Cell centres and edges; numeric axes at their real positions (geometric midpoints on log axes)."""
    try:
        v = np.array([float(a) for a in values])
    except (TypeError, ValueError):
        idx = np.arange(len(values), dtype=float)
        return idx, np.concatenate([idx - 0.5, [idx[-1] + 0.5]]), False
    if len(v) == 1:
        w = v[0] * 0.5 if log else max(abs(v[0]) * 0.5, 0.5)
        return v, (np.array([v[0] / 2, v[0] * 2]) if log else np.array([v[0] - w, v[0] + w])), True
    t = np.log(v) if log else v
    mid = (t[1:] + t[:-1]) / 2
    e = np.concatenate([[t[0] - (mid[0] - t[0])], mid, [t[-1] + (t[-1] - mid[-1])]])
    return v, (np.exp(e) if log else e), True


def draw_phase_map(info: PhaseMapInfo, path: str | Path, title: str | None = None, diverged_at: float = 0.5) -> Path:
    """Draw the phase map to a PNG (see :func:`render_phase_map`); returns the path."""
    import matplotlib.pyplot as plt

    fig = render_phase_map(info, title, diverged_at)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_phase_map(info: PhaseMapInfo, title: str | None = None, diverged_at: float = 0.5):
    """One heatmap panel per facet value, as a matplotlib Figure.

    Cells where at least ``diverged_at`` of the runs diverged are hatched red with an x;
    missing cells are left blank (light grey, "no runs").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Patch, Rectangle

    n = len(info.facet_values)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 1.2, 3.9 * nrows + 0.9), squeeze=False)
    height = 3.9 * nrows + 0.9
    fig.subplots_adjust(top=1 - 0.55 / height, bottom=0.85 / height, hspace=0.35)
    finite = info.median[np.isfinite(info.median)]
    positive = finite.size and (finite > 0).all()
    use_log = bool(positive and finite.max() / finite.min() > 100)
    norm = (LogNorm(finite.min(), finite.max()) if use_log
            else Normalize(finite.min() if finite.size else 0, finite.max() if finite.size else 1))
    xc, xe, xnum = _edges(info.x_values, info.x_log)
    yc, ye, ynum = _edges(info.y_values, info.y_log)
    mesh = None
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        if k >= n:
            ax.axis("off")
            continue
        ax.set_facecolor("#e6e6e6")
        data = np.ma.masked_invalid(info.median[k])
        mesh = ax.pcolormesh(xe, ye, data, norm=norm, cmap="viridis", shading="flat")
        for i in range(len(info.y_values)):
            for j in range(len(info.x_values)):
                cell = (k, i, j)
                x0, x1, y0, y1 = xe[j], xe[j + 1], ye[i], ye[i + 1]
                if info.n_runs[cell] == 0:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, hatch="..", edgecolor="#b0b0b0", lw=0))
                    continue
                if info.diverged_frac[cell] >= diverged_at:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#f4c7c3", hatch="xx",
                                           edgecolor="#c0392b", lw=0))
                    ax.text(xc[j], yc[i], f"div\n{info.diverged_frac[cell]:.0%}", ha="center", va="center",
                            fontsize=7, color="#7b241c")
                elif len(info.x_values) * len(info.y_values) <= 64 and np.isfinite(info.median[cell]):
                    v = info.median[cell]
                    lum = norm(v)
                    ax.text(xc[j], yc[i], f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="white" if lum < 0.6 else "black")
        if info.x_log:
            ax.set_xscale("log")
        if info.y_log:
            ax.set_yscale("log")
        ax.set_xticks(xc, [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in info.x_values], rotation=0)
        ax.set_yticks(yc, [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in info.y_values])
        ax.minorticks_off()
        ax.set_xlabel(info.x)
        ax.set_ylabel(info.y)
        if info.facets:
            ax.set_title(", ".join(f"{f}={v}" for f, v in zip(info.facets, info.facet_values[k])), fontsize=10)
    if mesh is not None:
        cb = fig.colorbar(mesh, ax=axes.ravel().tolist(), shrink=0.85)
        cb.set_label(f"{info.metric} (median over seeds)")
    handles = [Patch(facecolor="#f4c7c3", hatch="xx", edgecolor="#c0392b", label=f"diverged (≥{diverged_at:.0%} of runs)"),
               Patch(facecolor="#e6e6e6", hatch="..", edgecolor="#b0b0b0", label="no runs")]
    fig.legend(handles=handles, loc="lower left", fontsize=8, frameon=False, ncol=2)
    fig.suptitle(title or f"{info.metric} over {info.x} × {info.y}", y=0.985)
    return fig


def default_facets(axes: Sequence[str], x: str, y: str) -> list[str]:
    """Swept axes left after x and y, without seeds (which are aggregated), as runs-table columns."""
    from raydyn.spec import column_name

    skip = {column_name(a) for a in (x, y, "seed")}
    return [column_name(a) for a in axes if column_name(a) not in skip]


def facet_combinations(info: PhaseMapInfo) -> list[str]:
    return [", ".join(f"{f}={v}" for f, v in zip(info.facets, fv)) for fv in info.facet_values]


__all__ = ["runs_with_metrics", "PhaseMapInfo", "phase_map_info", "draw_phase_map", "render_phase_map", "default_facets", "is_log_spaced",
           "facet_combinations"]
