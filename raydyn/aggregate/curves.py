"""Curves across runs: a metric over training steps, aggregated per group of runs in one DuckDB query.

:func:`curve_table` groups the runs of a sweep by one runs-table column (``--group-by lr``) and
optionally a second one for panels (``--facet width``); per (facet, group, step) it returns the
median of the metric over the group's runs (seeds, and any column not grouped by) and the band
asked for. The aggregation runs in DuckDB over the store's Parquet (:meth:`raydyn.store.Store.sql`),
never as Python loops over runs, so it takes the same few calls at 10^4 runs as at 10.

Non-finite values (NaN, inf: a diverged run's last steps) are skipped, per step: ``n`` says how
many runs a step's numbers are over. Quantiles interpolate linearly (DuckDB's ``quantile_cont``,
numpy's default); ``std`` is the sample standard deviation (NaN for one run).
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from raydyn.errors import RaydynError

__all__ = ["BANDS", "curve_table", "band_columns"]

#: Bands around the curve, and the columns :func:`curve_table` adds for each.
BANDS: dict[str, tuple[str, ...]] = {"iqr": ("q25", "q75"), "std": ("mean", "std"), "minmax": ("min", "max"),
                                     "none": ()}

_KEYS = ("run_id", "step", "sweep")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(store: Any, table: str, sweep: str) -> dict[str, pa.DataType]:
    """The columns of ``table`` (no rows are read: DuckDB reads the Parquet footers)."""
    t = store.sql(f"SELECT * FROM {table} WHERE sweep = {_literal(sweep)} LIMIT 0")
    return {f.name: f.type for f in t.schema}


def band_columns(band: str) -> tuple[str, ...]:
    if band not in BANDS:
        raise RaydynError(f"--band {band!r}: allowed values are {', '.join(BANDS)}")
    return BANDS[band]


def curve_table(store: Any, sweep: str, metric: str, group_by: str, facet: str | None = None,
                band: str = "iqr") -> pa.Table:
    """Per (facet, group, step): the metric's median over the group's runs, the band, and ``n``.

    Columns: ``facet`` (null without ``facet``), ``group``, ``step``, ``median``, then the band's
    (``q25, q75`` | ``mean, std`` | ``min, max`` | none), ``n`` (finite values at that step) and
    ``runs`` (runs in the group), sorted by facet, group, step. The column names given are in the
    schema metadata (``raydyn.group_by``, ``raydyn.facet``, ``raydyn.metric``, ``raydyn.band``).
    ``group_by`` and ``facet`` are runs-table columns (swept parameters such as ``data.p`` are
    accepted); ``metric`` is a column of the metrics table. Unknown names are a RaydynError that
    lists the usable ones.
    """
    from raydyn.spec import column_name

    extra = band_columns(band)
    mcols = _columns(store, "metrics", sweep)
    rcols = _columns(store, "runs", sweep)
    if not rcols or "run_id" not in rcols:
        raise RaydynError(f"sweep {sweep!r} has no runs in store {store.uri}")
    usable = sorted(c for c, t in mcols.items() if c not in _KEYS and (pa.types.is_floating(t) or pa.types.is_integer(t)))
    if metric not in usable:
        raise RaydynError(f"--metric {metric!r} is not a metric of sweep {sweep!r} (a numeric column of the metrics "
                          f"table); metrics: {', '.join(usable) or 'none (no metrics were logged)'}")
    groupable = sorted(c for c, t in rcols.items() if c not in ("run_id", "sweep", "config_json", "weights_layout",
                                                               "versions") and not pa.types.is_nested(t))
    group_by = group_by if group_by in rcols else column_name(group_by)
    facet = None if facet is None else (facet if facet in rcols else column_name(facet))
    for role, name in [("--group-by", group_by)] + ([("--facet", facet)] if facet is not None else []):
        if name not in groupable:
            raise RaydynError(f"{role} {name!r} is not a column of the runs table of sweep {sweep!r}; columns: "
                              f"{', '.join(groupable)}")
    if facet == group_by:
        raise RaydynError(f"--facet and --group-by must differ (both are {group_by!r})")

    s, v = _literal(sweep), _ident(metric)
    stats = {"q25": "quantile_cont(v, 0.25)", "q75": "quantile_cont(v, 0.75)", "mean": "avg(v)",
             "std": "stddev_samp(v)", "min": "min(v)", "max": "max(v)"}
    select = ", ".join(["median(v) AS median"] + [f"{stats[c]} AS {c}" for c in extra])
    facet_sql = _ident(facet) if facet is not None else "NULL"
    query = f"""
        WITH r AS (
            SELECT run_id, {facet_sql} AS facet, {_ident(group_by)} AS "group" FROM runs WHERE sweep = {s}
        ), sizes AS (
            SELECT facet, "group", count(*) AS runs FROM r GROUP BY ALL
        ), m AS (
            SELECT run_id, step, CAST({v} AS DOUBLE) AS v FROM metrics
            WHERE sweep = {s} AND {v} IS NOT NULL AND isfinite(CAST({v} AS DOUBLE))
        ), agg AS (
            SELECT r.facet, r."group", m.step, {select}, count(*) AS n
            FROM m JOIN r USING (run_id) GROUP BY ALL
        )
        SELECT agg.*, sizes.runs FROM agg JOIN sizes
            ON agg.facet IS NOT DISTINCT FROM sizes.facet AND agg."group" IS NOT DISTINCT FROM sizes."group"
        ORDER BY facet NULLS LAST, "group" NULLS LAST, step
    """
    table = store.sql(query)
    if table.num_rows == 0:
        raise RaydynError(f"--metric {metric!r} has no finite value in sweep {sweep!r} (store {store.uri})")
    meta = {b"raydyn.metric": metric.encode(), b"raydyn.group_by": group_by.encode(),
            b"raydyn.facet": (facet or "").encode(), b"raydyn.band": band.encode()}
    return table.replace_schema_metadata(meta)
