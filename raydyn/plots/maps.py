"""Draw phase maps: a metric over two swept axes, numeric or categorical, one panel per facet.

Compute first, draw second: the numbers come from :func:`raydyn.aggregate.maps.phase_map_info`
(:class:`~raydyn.aggregate.maps.PhaseMapInfo`: median, spread, diverged and stopped shares per
cell) and :func:`raydyn.aggregate.categorical.category_map_info`
(:class:`~raydyn.aggregate.categorical.CategoryMapInfo`: majority label, its share, boundaries);
nothing is aggregated here.

* :func:`render_phase_map` / :func:`draw_phase_map` -- a heatmap per facet, diverged cells hatched
  red, stopped ones grey, missing ones dotted; :func:`colorbar_caption` / :func:`spread_caption`
  say what a cell's colour is.
* :func:`render_category_map` / :func:`draw_category_map` -- discrete colours
  (:data:`PHASE_COLORS` for the phases), the share as annotation, a legend, boundaries as thick lines.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from raydyn.aggregate.categorical import CategoryMapInfo
from raydyn.aggregate.maps import PhaseMapInfo
from raydyn.errors import RaydynError

__all__ = ["render_phase_map", "draw_phase_map", "colorbar_caption", "spread_caption", "SPREADS",
           "render_category_map", "draw_category_map", "PHASE_COLORS"]


# --------------------------------------------------------------------------- cells, ticks, titles
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


def _spaced(pos: np.ndarray, gap: float) -> list[int]:
    """Indices of positions kept greedily left to right at least ``gap`` apart (the first always kept)."""
    keep: list[int] = []
    for i, p in enumerate(pos):
        if not keep or p - pos[keep[-1]] >= gap:
            keep.append(i)
    return keep


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


# --------------------------------------------------------------------------- numeric phase maps
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
    pos = np.log(centres) if (log and numeric) else np.asarray(centres, float)
    if len(pos) <= max_ticks or np.ptp(pos) == 0:
        return list(range(len(pos)))
    return _spaced(pos, np.ptp(pos) / (max_ticks - 1) * 0.999)


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


def draw_phase_map(info: PhaseMapInfo, path: str | Path, title: str | None = None, diverged_at: float = 0.5,
                   *, dpi: int = 110, **style: Any) -> Path:
    """Draw the phase map (see :func:`render_phase_map`, which takes ``style``) to ``path``: PNG, PDF or
    SVG after its suffix (another suffix is a RaydynError); returns the path."""
    from raydyn.plots.labels import figure_format, save_figure

    figure_format(path)  # refuse a bad suffix before drawing
    return save_figure(render_phase_map(info, title, diverged_at, **style), path, dpi=dpi)


# --------------------------------------------------------------------------- categorical maps
#: Fixed colours of the phases (so maps of different sweeps agree); other labels get tab10 colours.
PHASE_COLORS = {
    "lazy": "#9ecae1", "converged": "#31a354", "unconverged": "#bdbdbd", "catapult": "#fd8d3c",
    "comprehension": "#a0da39", "grokking": "#fde725", "memorization": "#46327e", "confusion": "#1e1e1e",
    "stopped": "#7f7f7f", "diverged": "#d62728",
}


def _colors(cats: list[str]) -> list[str]:
    import matplotlib

    tab = matplotlib.colormaps["tab10"]
    extra = iter(range(10))
    return [PHASE_COLORS.get(c) or matplotlib.colors.to_hex(tab(next(extra) % 10)) for c in cats]


def render_category_map(info: CategoryMapInfo, title: str | None = None, *, xlabel: str | None = None,
                        ylabel: str | None = None):
    """One panel per facet value: the majority label's colour per cell, its share written in the
    cell (when the grid is small), boundaries as thick black lines, missing cells hatched grey.
    Axis labels default to readable names (:func:`raydyn.plots.labels.readable`)."""
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
