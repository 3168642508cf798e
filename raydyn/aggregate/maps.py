"""Phase maps: a metric over two swept axes, one panel per value of the remaining axes.

Info first, drawing second (as Optuna's visualisation modules do): the numbers
in :class:`PhaseMapInfo` are tested without drawing anything.

Seeds (and any axis not used for x, y or facets) are aggregated per cell: the
median and IQR of the metric over runs that did not diverge, the number of runs
and the fraction that diverged. Runs that early stopping ended at a rung (status ``stopped``)
are left out of the median too (their final metrics are those at the rung, not at the end)
and counted in ``stopped_frac``; a cell none of whose runs trained to the end is drawn as
stopped. A cell with no runs is missing (NaN), never 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError


@dataclass
class PhaseMapInfo:
    """Everything a phase map shows. Arrays are (n_facets, len(y_values), len(x_values)).

    ``q25``/``q75`` and ``lo``/``hi`` are the quartiles and the extremes of the cell's values
    (the seed spread); ``aggregated`` names the config keys whose value differs between runs
    of one cell (what the median is taken over, e.g. ``["seed"]``)."""

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
    q25: np.ndarray | None = None
    q75: np.ndarray | None = None
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None
    aggregated: list[str] = field(default_factory=list)
    stopped_frac: np.ndarray | None = None  # share of the cell's runs that early stopping ended (status stopped)


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
    stop: dict[tuple[int, int, int], list[bool]] = {}
    cell_rows: dict[tuple[int, int, int], list[int]] = {}
    fi_of = {f: i for i, f in enumerate(fv)}
    xi_of = {v: i for i, v in enumerate(xv)}
    yi_of = {v: i for i, v in enumerate(yv)}
    for r in range(runs.num_rows):
        key = (fi_of[tuple(d[f][r] for f in facets)] if facets else 0, yi_of[d[y][r]], xi_of[d[x][r]])
        diverged = status[r] == "diverged"
        stopped = status[r] == "stopped"
        div.setdefault(key, []).append(diverged)
        stop.setdefault(key, []).append(stopped)
        cell_rows.setdefault(key, []).append(r)
        v = d[metric][r]
        if not diverged and not stopped and v is not None and math.isfinite(v):
            vals.setdefault(key, []).append(float(v))
    median = np.full(shape, np.nan)
    iqr = np.full(shape, np.nan)
    q25, q75, lo, hi = (np.full(shape, np.nan) for _ in range(4))
    n_runs = np.zeros(shape, dtype=int)
    dfrac = np.full(shape, np.nan)
    sfrac = np.full(shape, np.nan)
    for key, flags in div.items():
        n_runs[key] = len(flags)
        dfrac[key] = sum(flags) / len(flags)
        sfrac[key] = sum(stop[key]) / len(flags)
        if key in vals:
            q1, q2, q3 = np.percentile(vals[key], [25, 50, 75])
            median[key], iqr[key] = q2, q3 - q1
            q25[key], q75[key], lo[key], hi[key] = q1, q3, min(vals[key]), max(vals[key])
    return PhaseMapInfo(metric, x, y, list(facets), fv, xv, yv, median, iqr, n_runs, dfrac,
                        is_log_spaced(xv), is_log_spaced(yv), q25, q75, lo, hi,
                        _varying_in_cells(d, list(cell_rows.values()), [x, y, *facets]), sfrac)


def _flat_config(text: Any) -> dict[str, str]:
    """A run's config_json flattened (nested keys joined with ``_``), values as JSON text."""
    import json

    out: dict[str, str] = {}

    def walk(v: Any, prefix: str) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{prefix}{k}_")
        else:
            out[prefix[:-1]] = json.dumps(v, sort_keys=True)
    try:
        walk(json.loads(text), "")
    except (TypeError, ValueError):
        return {}
    return out


def _varying_in_cells(d: dict[str, list[Any]], cells: list[list[int]], shown: list[str]) -> list[str]:
    """Config keys whose value differs between the runs of some cell: what a cell's median is over.

    Read from ``config_json`` (every setting of a run); without it, from the ``seed`` column."""
    multi = [rows for rows in cells if len(rows) > 1]
    if not multi:
        return []
    if "config_json" in d:
        configs = {r: _flat_config(d["config_json"][r]) for rows in multi for r in rows}
        varying: dict[str, None] = {}
        for rows in multi:
            keys = set().union(*(configs[r] for r in rows))
            for k in sorted(keys):
                if k not in varying and len({configs[r].get(k) for r in rows}) > 1:
                    varying[k] = None
        return [k for k in varying if k not in shown]
    if "seed" in d and "seed" not in shown and any(len({d["seed"][r] for r in rows}) > 1 for rows in multi):
        return ["seed"]
    return []


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


def draw_phase_map(info: PhaseMapInfo, path: str | Path, title: str | None = None, diverged_at: float = 0.5,
                   *, dpi: int = 110, **style: Any) -> Path:
    """Draw the phase map (see :func:`render_phase_map`, which takes ``style``) to ``path``: PNG, PDF or
    SVG after its suffix (another suffix is a RaydynError); returns the path."""
    from raydyn.plots.labels import figure_format, save_figure

    figure_format(path)  # refuse a bad suffix before drawing
    return save_figure(render_phase_map(info, title, diverged_at, **style), path, dpi=dpi)


def colorbar_caption(info: PhaseMapInfo) -> str:
    """What a cell's colour is: the metric, and the median over what (seeds, or N runs differing in ...).

    "median over seeds" only when the runs of a cell differ in their seed alone; one run per
    cell is just the metric."""
    from raydyn.plots.labels import readable

    name = readable(info.metric)
    counts = info.n_runs[info.n_runs > 0]
    if counts.size == 0 or counts.max() <= 1:
        return name
    per = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}–{counts.max()}"
    others = [k for k in info.aggregated if not _is_seed(k)]
    if info.aggregated and not others:
        return f"{name} (median over seeds, {per} per cell)"
    if others:
        names = ", ".join(info.aggregated[:3]) + (", …" if len(info.aggregated) > 3 else "")
        return f"{name} (median over {per} runs per cell, differing in {names})"
    return f"{name} (median over {per} runs per cell)"


def _is_seed(key: str) -> bool:
    return key == "seed" or key.endswith(("_seed", "seed"))


SPREADS = {"iqr": ("IQR", "q75 − q25"), "minmax": ("range", "max − min")}


def spread_caption(info: PhaseMapInfo, spread: str) -> str:
    """The colour-bar caption of the spread panel, e.g. ``final test loss: IQR over seeds (q75 − q25)``."""
    from raydyn.plots.labels import readable

    over = "seeds" if info.aggregated and all(_is_seed(k) for k in info.aggregated) else "runs"
    name, how = SPREADS[spread]
    return f"{readable(info.metric)}: {name} over {over} ({how})"


def _ticks(centres: np.ndarray, log: bool, numeric: bool, max_ticks: int) -> list[int]:
    """Indices of the cell centres that get a tick label: all, or evenly thinned to about ``max_ticks``."""
    from raydyn.phase.categorical import _spaced

    pos = np.log(centres) if (log and numeric) else np.asarray(centres, float)
    if len(pos) <= max_ticks or np.ptp(pos) == 0:
        return list(range(len(pos)))
    return _spaced(pos, np.ptp(pos) / (max_ticks - 1) * 0.999)


def _facet_title(facets: list[str], values: tuple[Any, ...], width: int = 38) -> str:
    """``depth=2, width=64`` wrapped onto lines of about ``width`` characters (between facets)."""
    from raydyn.plots.labels import fmt_value

    lines: list[str] = []
    for part in (f"{f}={fmt_value(v)}" for f, v in zip(facets, values)):
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return "\n".join(lines)


def _color_norm(values: np.ndarray, vmin: float | None, vmax: float | None, log_color: bool | None):
    """The colour scale: log when asked, or by default when the values are positive and span > 100x."""
    from matplotlib.colors import LogNorm, Normalize

    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else None)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else None)
    if lo is not None and hi is not None and lo >= hi and (vmin is not None or vmax is not None):
        raise RaydynError(f"--vmin {lo:g} must be below --vmax {hi:g}")
    if log_color is None:
        log_color = bool(finite.size and (finite > 0).all() and finite.max() / finite.min() > 100
                         and (lo is None or lo > 0))
    if log_color and lo is not None and hi is not None:
        if lo <= 0:
            raise RaydynError(f"--log-color needs positive values, but the colour scale starts at {lo:g}"
                              + ("" if vmin is not None else " (the smallest value); give --vmin > 0 or --linear-color"))
        return LogNorm(lo, hi)
    return Normalize(0 if lo is None else lo, 1 if hi is None else hi)


def render_phase_map(info: PhaseMapInfo, title: str | None = None, diverged_at: float = 0.5, *,
                     xlabel: str | None = None, ylabel: str | None = None, cmap: str = "viridis",
                     vmin: float | None = None, vmax: float | None = None, log_color: bool | None = None,
                     spread: str | None = None):
    """One heatmap panel per facet value, as a matplotlib Figure.

    Cells where at least ``diverged_at`` of the runs diverged are hatched red with an x; cells none of
    whose runs trained to the end because early stopping ended them (status ``stopped``) are hatched grey;
    missing cells are left blank (light grey, "no runs"). Axis labels default to readable
    names (:func:`raydyn.plots.labels.readable`); the colour scale is log by default for positive
    values spanning more than 100x (``log_color`` True/False forces it); the colour-bar caption
    says what a cell is (:func:`colorbar_caption`). ``spread`` (``iqr`` or ``minmax``) adds a second
    row of panels with the spread of each cell's values and writes ``median`` over ``low–high``
    in the cells of small grids, so that two seeds at 0.87 and 1.78 do not read as one value.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch, Rectangle

    from raydyn.plots.labels import fmt_tick, grid_axes, readable, text_color_on

    if spread is not None and spread not in SPREADS:
        raise RaydynError(f"--spread {spread!r}: allowed values are {', '.join(SPREADS)}")
    if cmap not in matplotlib.colormaps:
        raise RaydynError(f"--cmap {cmap!r} is not a matplotlib colour map; e.g. viridis, magma, cividis, plasma, "
                          "RdBu_r (a name ending in _r is reversed)")
    n = len(info.facet_values)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    blocks = 2 if spread else 1
    fig, axes = plt.subplots(nrows * blocks, ncols, figsize=(4.6 * ncols + 1.6, 3.9 * nrows * blocks + 1.0),
                             squeeze=False, layout="constrained")
    norm = _color_norm(info.median, vmin, vmax, log_color)
    if spread:
        lo_a, hi_a = (info.q25, info.q75) if spread == "iqr" else (info.lo, info.hi)
        width = hi_a - lo_a
        fw = width[np.isfinite(width)]
        snorm = Normalize(0, float(fw.max()) if fw.size and fw.max() > 0 else 1)
    xc, xe, xnum = _edges(info.x_values, info.x_log)
    yc, ye, ynum = _edges(info.y_values, info.y_log)
    xlabels = [fmt_tick(v) for v in info.x_values]
    # as many x tick labels as fit side by side in a panel (~260 pt wide, 8 pt digits ~5 pt each)
    xt = _ticks(xc, info.x_log, xnum, max(2, min(10, int(260 / (5 * max(map(len, xlabels)) + 14)))))
    yt = _ticks(yc, info.y_log, ynum, 16)
    small = len(info.x_values) * len(info.y_values) <= 64
    meshes: dict[int, Any] = {}
    used: dict[int, list[Any]] = {0: [], 1: []}
    for b in range(blocks):
        for k in range(nrows * ncols):
            ax = axes[b * nrows + k // ncols][k % ncols]
            if k >= n:
                ax.axis("off")
                continue
            used[b].append(ax)
            ax.set_facecolor("#e6e6e6")
            if b == 0:
                meshes[0] = ax.pcolormesh(xe, ye, np.ma.masked_invalid(info.median[k]), norm=norm, cmap=cmap,
                                          shading="flat")
            else:
                meshes[1] = ax.pcolormesh(xe, ye, np.ma.masked_invalid(width[k]), norm=snorm, cmap="Oranges",
                                          shading="flat")
            cmap_of = meshes[b].get_cmap()
            for i in range(len(info.y_values)):
                for j in range(len(info.x_values)):
                    cell = (k, i, j)
                    x0, x1, y0, y1 = xe[j], xe[j + 1], ye[i], ye[i + 1]
                    if info.n_runs[cell] == 0:
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, hatch="..", edgecolor="#b0b0b0",
                                               lw=0))
                        continue
                    if info.diverged_frac[cell] >= diverged_at:
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#f4c7c3", hatch="xx",
                                               edgecolor="#c0392b", lw=0))
                        ax.text(xc[j], yc[i], f"div\n{info.diverged_frac[cell]:.0%}", ha="center", va="center",
                                fontsize=7, color="#7b241c")
                        continue
                    if _all_stopped(info, cell):
                        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#d9d9d9", hatch="//",
                                               edgecolor="#7f7f7f", lw=0))
                        ax.text(xc[j], yc[i], "stopped", ha="center", va="center", fontsize=7, color="#404040")
                        continue
                    if not small or not np.isfinite(info.median[cell]):
                        continue
                    v = info.median[cell] if b == 0 else width[cell]
                    r, g, bl, _ = cmap_of((norm if b == 0 else snorm)(v))
                    color = text_color_on((r, g, bl))
                    if b == 0 and spread and info.n_runs[cell] > 1:
                        text, size = f"{v:.3g}\n{lo_a[cell]:.3g}–{hi_a[cell]:.3g}", 6
                    else:
                        text, size = f"{v:.3g}", 7
                    ax.text(xc[j], yc[i], text, ha="center", va="center", fontsize=size, color=color)
            grid_axes(ax, xe, ye, info.x_log, info.y_log, (xc[xt], [xlabels[j] for j in xt]),
                      (yc[yt], [fmt_tick(info.y_values[i]) for i in yt]))
            ax.tick_params(labelsize=8)
            if k + ncols >= n:  # the lowest panel of its column (in this block)
                ax.set_xlabel(xlabel if xlabel is not None else readable(info.x))
            if k % ncols == 0:
                ax.set_ylabel(ylabel if ylabel is not None else readable(info.y))
            facet = _facet_title(info.facets, info.facet_values[k]) if info.facets else ""
            if b == 0 and facet:
                ax.set_title(facet, fontsize=9)
            elif b == 1:
                ax.set_title(f"{SPREADS[spread][0]}" + (f" · {facet}" if facet else ""), fontsize=9)
    if 0 in meshes:
        cb = fig.colorbar(meshes[0], ax=used[0], shrink=0.85)
        cb.set_label(colorbar_caption(info))
    if 1 in meshes:
        cb = fig.colorbar(meshes[1], ax=used[1], shrink=0.85)
        cb.set_label(spread_caption(info, spread))
    handles = [Patch(facecolor="#f4c7c3", hatch="xx", edgecolor="#c0392b", label=f"diverged (≥{diverged_at:.0%} of runs)"),
               Patch(facecolor="#e6e6e6", hatch="..", edgecolor="#b0b0b0", label="no runs")]
    if any(_all_stopped(info, c) for c in zip(*np.nonzero(info.n_runs))):
        handles.insert(1, Patch(facecolor="#d9d9d9", hatch="//", edgecolor="#7f7f7f",
                                label="stopped early (no run trained to the end)"))
    if spread:
        handles.append(Patch(facecolor="none", edgecolor="none",
                             label=f"cell text: median, below it {'q25–q75' if spread == 'iqr' else 'min–max'}"))
    fig.legend(handles=handles, loc="outside lower left", fontsize=8, frameon=False, ncol=len(handles))
    fig.suptitle(title or f"{info.metric} over {info.x} × {info.y}")
    return fig


def _all_stopped(info: PhaseMapInfo, cell: tuple[int, ...]) -> bool:
    """True when early stopping ended some of the cell's runs and none trained to the end (the others diverged)."""
    if info.stopped_frac is None or info.n_runs[cell] == 0:
        return False
    s = float(info.stopped_frac[cell])
    return s > 0 and s + float(info.diverged_frac[cell]) >= 1 - 1e-12


def default_facets(axes: Sequence[str], x: str, y: str) -> list[str]:
    """Swept axes left after x and y, without seeds (which are aggregated), as runs-table columns."""
    from raydyn.spec import column_name

    skip = {column_name(a) for a in (x, y, "seed")}
    return [column_name(a) for a in axes if column_name(a) not in skip]


def facet_combinations(info: PhaseMapInfo) -> list[str]:
    return [", ".join(f"{f}={v}" for f, v in zip(info.facets, fv)) for fv in info.facet_values]


__all__ = ["runs_with_metrics", "PhaseMapInfo", "phase_map_info", "draw_phase_map", "render_phase_map", "default_facets", "is_log_spaced",
           "facet_combinations", "colorbar_caption", "spread_caption", "SPREADS"]
