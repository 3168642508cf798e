"""Draw :func:`raydyn.aggregate.curves.curve_table`: every group's curve over steps with its band, one panel per facet.

The line is the median over the group's runs (the mean for ``band="std"``, whose band is
mean ± std); the band is shaded around it. Groups are coloured along a colour map in the order
of their values (log-spaced values evenly), named in a legend (a colour bar when there are more
than :data:`LEGEND_MAX` numeric groups). Steps without a finite value are absent from the table,
so lines join the steps that have one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = ["render_curves", "draw_curves", "LEGEND_MAX"]

#: Most groups named in a legend; more numeric groups get a colour bar instead.
LEGEND_MAX = 12

_BAND_TEXT = {"iqr": "band: interquartile range (25–75 %)", "std": "band: ± 1 standard deviation",
              "minmax": "band: min–max", "none": ""}


def _sort_key(v: Any) -> tuple[int, Any]:
    if v is None:
        return (2, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, v)
    return (1, str(v))


def render_curves(table: pa.Table, *, title: str | None = None, log_y: bool = False, xlabel: str | None = None,
                  ylabel: str | None = None):
    """The figure of a curve table (see the module docstring); returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, Normalize

    from raydyn.aggregate.axes import is_log_spaced
    from raydyn.plots.labels import fmt_value, readable

    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    metric, group_by = meta.get("raydyn.metric", "value"), meta.get("raydyn.group_by", "group")
    facet_name, band = meta.get("raydyn.facet") or None, meta.get("raydyn.band", "none")
    d = table.to_pydict()
    facets = sorted(set(d["facet"]), key=_sort_key) if facet_name else [None]
    groups = sorted(set(d["group"]), key=_sort_key)
    numeric = all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in groups)
    log_groups = numeric and is_log_spaced(groups)
    cmap = matplotlib.colormaps["viridis" if numeric else "tab10"]
    if numeric and len(groups) > 1:
        gnorm = (LogNorm(min(groups), max(groups)) if log_groups else Normalize(min(groups), max(groups)))
        color = {g: cmap(0.9 * gnorm(g)) for g in groups}
    else:
        gnorm = None
        color = {g: cmap(i % 10) if not numeric else cmap(0.45) for i, g in enumerate(groups)}
    # one array per column, rows of each (facet, group) together in step order (the query sorts them)
    cols = {c: np.asarray(d[c], dtype=float) for c in ("step", "median", "mean", "std", "q25", "q75", "min", "max")
            if c in d}
    centre = cols["mean"] if band == "std" else cols["median"]
    lo, hi = {"iqr": ("q25", "q75"), "minmax": ("min", "max")}.get(band, (None, None))
    if band == "std":
        lo_v, hi_v = cols["mean"] - np.nan_to_num(cols["std"]), cols["mean"] + np.nan_to_num(cols["std"])
    elif lo:
        lo_v, hi_v = cols[lo], cols[hi]
    else:
        lo_v = hi_v = None
    keys = list(zip(d["facet"], d["group"]))
    rows: dict[tuple[Any, Any], list[int]] = {}
    for i, k in enumerate(keys):
        rows.setdefault(k, []).append(i)
    runs = dict(zip(keys, d["runs"]))

    n = len(facets)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.8 * ncols + 1.8, 3.6 * nrows + 1.0), squeeze=False,
                             layout="constrained", sharey=True)
    legend_ok = not numeric or len(groups) <= LEGEND_MAX
    for k in range(nrows * ncols):
        ax = axes[k // ncols][k % ncols]
        if k >= n:
            ax.axis("off")
            continue
        f = facets[k]
        for g in groups:
            idx = rows.get((f, g))
            if not idx:
                continue
            idx = np.asarray(idx)
            x, y = cols["step"][idx], centre[idx]
            ok = np.isfinite(y) & (y > 0 if log_y else True)
            ax.plot(x[ok], y[ok], color=color[g], lw=1.6, label=fmt_value(g))
            if lo_v is not None:
                b0, b1 = lo_v[idx], hi_v[idx]
                okb = np.isfinite(b0) & np.isfinite(b1) & ((b1 > 0) if log_y else True)
                if log_y:
                    b0 = np.where(b0 > 0, b0, np.nan)
                ax.fill_between(x[okb], b0[okb], b1[okb], color=color[g], alpha=0.2, lw=0)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.25, lw=0.5)
        ax.tick_params(labelsize=8)
        if k + ncols >= n:
            ax.set_xlabel(xlabel if xlabel is not None else readable("step"))
        if k % ncols == 0:
            ax.set_ylabel(ylabel if ylabel is not None else readable(metric))
        if facet_name:
            ax.set_title(f"{facet_name}={fmt_value(f)}", fontsize=9)
    if legend_ok:
        from matplotlib.lines import Line2D

        present = [g for g in groups if any((f, g) in rows for f in facets)]
        handles = [Line2D([], [], color=color[g], lw=1.6) for g in present]
        labels = [fmt_value(g) + (f" ({runs[(facets[0], g)]} run{'s' * (runs[(facets[0], g)] != 1)})" if n == 1 else "")
                  for g in present]
        fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False,
                   title=readable(group_by), title_fontsize=9)
    else:
        sm = ScalarMappable(norm=gnorm, cmap=matplotlib.colors.ListedColormap(cmap(np.linspace(0, 0.9, 256))))
        fig.colorbar(sm, ax=axes.ravel().tolist(), shrink=0.85, label=readable(group_by))
    stat = "mean" if band == "std" else "median"
    caption = f"line: {stat} over the runs of each {group_by}" + (f" and {facet_name}" if facet_name else "")
    caption += f"; {_BAND_TEXT[band]}" if _BAND_TEXT[band] else ""
    fig.suptitle(title or f"{readable(metric)} by {readable(group_by)}", fontsize=11)
    fig.supxlabel(caption, fontsize=8, color="#555555")
    return fig


def draw_curves(table: pa.Table, path: str | Path, *, dpi: int = 110, **style: Any) -> Path:
    """Draw :func:`render_curves` to ``path``: PNG, PDF or SVG after its suffix; returns the path."""
    from raydyn.plots.labels import figure_format, save_figure

    figure_format(path)
    return save_figure(render_curves(table, **style), path, dpi=dpi)
