"""Phase maps: a metric over two swept axes, one panel per value of the remaining axes.

Info first, drawing second (as Optuna's visualisation modules do): the numbers
in :class:`PhaseMapInfo` are tested without drawing anything; :mod:`raydyn.plots.maps`
draws them.

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
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from raydyn.aggregate.axes import GridAxes, is_log_spaced, sort_key
from raydyn.errors import RaydynError


@dataclass
class PhaseMapInfo(GridAxes):
    """Everything a phase map shows. Arrays are (n_facets, len(y_values), len(x_values)).

    ``q25``/``q75`` and ``lo``/``hi`` are the quartiles and the extremes of the cell's values
    (the seed spread); ``aggregated`` names the config keys whose value differs between runs
    of one cell (what the median is taken over, e.g. ``["seed"]``)."""

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
    xv = sorted(set(d[x]), key=sort_key)
    yv = sorted(set(d[y]), key=sort_key)
    fv = sorted(set(zip(*[d[f] for f in facets])), key=lambda t: tuple(sort_key(v) for v in t)) if facets else [()]
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


def default_facets(axes: Sequence[str], x: str, y: str) -> list[str]:
    """Swept axes left after x and y, without seeds (which are aggregated), as runs-table columns."""
    from raydyn.spec import column_name

    skip = {column_name(a) for a in (x, y, "seed")}
    return [column_name(a) for a in axes if column_name(a) not in skip]


def facet_combinations(info: PhaseMapInfo) -> list[str]:
    return [", ".join(f"{f}={v}" for f, v in zip(info.facets, fv)) for fv in info.facet_values]


__all__ = ["runs_with_metrics", "PhaseMapInfo", "phase_map_info", "default_facets", "facet_combinations"]
