"""The column contract of raydyn's core tables, and the checks that enforce it.

Every Parquet file the store writes carries the schema metadata
``{"raydyn.schema_version": "1", "raydyn.table": <table>}``. The ``sweep``
column is never stored in a file: it comes from the hive partition directory
``sweep=<name>`` and appears in query results as a ``string`` column.

Core tables (one row per ...):

``runs`` -- one row per trained model (a "run"). Written LAST by
:meth:`raydyn.store.Store.write_runs`; a run exists when its row exists.

    ==================  =========================  =======================================
    column              type                       meaning
    ==================  =========================  =======================================
    run_id              string, not null           unique within a sweep
    population          string                     the population (vmap group) it trained in
    status              string                     one of ``completed | diverged | stopped | failed``
                                                   (``stopped``: early stopping ended it at a rung)
    seed                int64                      the run's RNG seed
    steps_done          int64                      optimiser steps taken
    wall_time_s         float64                    seconds of training wall time
    config_json         string                     the run's full resolved config, JSON
    weights_layout      string                     JSON: parameter names, shapes, offsets
    versions            string                     JSON: library versions used
    final_<metric>      float64                    metrics at the last step (NaN if none)
    <config column>     int64|float64|string|bool  flattened config values, one per key
    ==================  =========================  =======================================

``metrics`` -- one row per (run, recorded step):
    ``run_id`` string, ``step`` int64, then any number of float64 scalar columns
    (loss, accuracy, grad_norm, ...).

``weights`` -- one row per (run, recorded step):
    ``run_id`` string, ``step`` int64, ``weights`` list<float32> or
    large_list<float32> (float64 where the sweep asks for it: ``train.weights.dtype``) (the flattened parameter vector; ``runs.weights_layout``
    says how to unflatten it). Further columns are allowed and unchecked.

Analysis tables (``koopman_spectra``, ``hmm_states``, ``cmd_summary``, ...) have
no enforced contract beyond the file metadata; by convention they carry
``run_id`` when they are per run.

``string`` columns may also be ``large_string`` (what polars produces); a
column that is entirely null may have Arrow type ``null`` (the store unifies it
with the typed column of other parts and sweeps).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from raydyn.errors import StoreError

__all__ = [
    "SCHEMA_VERSION",
    "RUN_STATUSES",
    "FINISHED_STATUSES",
    "CORE_TABLES",
    "RUNS_REQUIRED",
    "METRICS_REQUIRED",
    "file_metadata",
    "runs_schema_check",
    "metrics_schema_check",
    "weights_schema_check",
]

#: Bumped when the meaning or layout of stored columns changes incompatibly.
SCHEMA_VERSION = 1

#: Allowed values of ``runs.status``.
RUN_STATUSES: tuple[str, ...] = ("completed", "diverged", "stopped", "failed")

#: Statuses that mean "finished, do not re-run on resume".
FINISHED_STATUSES: frozenset[str] = frozenset({"completed", "diverged", "stopped"})

CORE_TABLES: tuple[str, ...] = ("runs", "metrics", "weights")

_STRING = "string"
_INT = "int64"
_FLOAT = "float64"

#: Required columns of ``runs`` and their contract type names.
RUNS_REQUIRED: dict[str, str] = {
    "run_id": _STRING,
    "population": _STRING,
    "status": _STRING,
    "seed": _INT,
    "steps_done": _INT,
    "wall_time_s": _FLOAT,
    "config_json": _STRING,
    "weights_layout": _STRING,
    "versions": _STRING,
}

#: Required columns of ``metrics``; every other column must be float64.
METRICS_REQUIRED: dict[str, str] = {"run_id": _STRING, "step": _INT}


def file_metadata(table: str) -> dict[bytes, bytes]:
    """The schema metadata every file of ``table`` carries."""
    return {
        b"raydyn.schema_version": str(SCHEMA_VERSION).encode(),
        b"raydyn.table": table.encode(),
    }


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _matches(t: pa.DataType, kind: str) -> bool:
    if kind == _STRING:
        return _is_string(t)
    if kind == _INT:
        return pa.types.is_int64(t)
    if kind == _FLOAT:
        return pa.types.is_float64(t)
    raise AssertionError(kind)  # pragma: no cover


def _is_config_type(t: pa.DataType) -> bool:
    return (
        pa.types.is_int64(t)
        or pa.types.is_float64(t)
        or _is_string(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def _require(table: pa.Table, required: dict[str, str], what: str) -> list[str]:
    problems = []
    for name, kind in required.items():
        if name not in table.column_names:
            problems.append(f"missing column {name!r} ({kind})")
        elif not _matches(table.schema.field(name).type, kind):
            problems.append(
                f"column {name!r} has type {table.schema.field(name).type}, expected {kind}"
            )
    return problems


def _raise(problems: list[str], what: str) -> None:
    if problems:
        raise StoreError(f"{what} table does not meet the column contract: " + "; ".join(problems))


def _check_run_ids(table: pa.Table, what: str) -> list[str]:
    if "run_id" not in table.column_names or not _is_string(table.schema.field("run_id").type):
        return []
    if table.column("run_id").null_count:
        return [f"column 'run_id' has {table.column('run_id').null_count} null value(s)"]
    return []


def runs_schema_check(table: pa.Table) -> None:
    """Raise :class:`StoreError` unless ``table`` meets the ``runs`` contract.

    Checks required columns and their types, ``final_*`` columns are float64,
    every other (config) column is int64/float64/string/bool (or all-null),
    ``run_id`` has no nulls and no duplicates, and ``status`` values are
    allowed. The message names every offending column / value.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"runs must be a pyarrow.Table, got {type(table).__name__}")
    problems = _require(table, RUNS_REQUIRED, "runs")
    for field in table.schema:
        if field.name in RUNS_REQUIRED or field.name == "sweep":
            continue
        if field.name.startswith("final_"):
            if not (pa.types.is_float64(field.type) or pa.types.is_null(field.type)):
                problems.append(f"column {field.name!r} has type {field.type}, expected float64")
        elif not _is_config_type(field.type):
            problems.append(
                f"config column {field.name!r} has type {field.type}, "
                "expected one of int64, float64, string, bool"
            )
    problems += _check_run_ids(table, "runs")
    if not problems:
        run_ids = table.column("run_id")
        if pc.count_distinct(run_ids).as_py() != len(run_ids):
            counts = pc.value_counts(run_ids)
            dups = [v["values"] for v in counts.to_pylist() if v["counts"] > 1]
            problems.append(f"duplicate run_id value(s) {dups[:5]}")
        statuses = set(pc.unique(table.column("status")).to_pylist())
        bad = sorted(str(s) for s in statuses - set(RUN_STATUSES))
        if bad:
            problems.append(f"column 'status' has value(s) {bad}, allowed {list(RUN_STATUSES)}")
    _raise(problems, "runs")


def metrics_schema_check(table: pa.Table) -> None:
    """Raise :class:`StoreError` unless ``table`` meets the ``metrics`` contract:
    ``run_id`` string (no nulls), ``step`` int64, every other column float64 or list<float64>
    (a per-parameter vector such as ``weight_norms``)."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"metrics must be a pyarrow.Table, got {type(table).__name__}")
    problems = _require(table, METRICS_REQUIRED, "metrics")
    for field in table.schema:
        if field.name in METRICS_REQUIRED or field.name == "sweep":
            continue
        ok = pa.types.is_float64(field.type) or pa.types.is_null(field.type) or (
            pa.types.is_list(field.type) and pa.types.is_float64(field.type.value_type))
        if not ok:
            problems.append(f"metric column {field.name!r} has type {field.type}, expected float64 or list<float64>")
    problems += _check_run_ids(table, "metrics")
    _raise(problems, "metrics")


def weights_schema_check(table: pa.Table) -> None:
    """Raise :class:`StoreError` unless ``table`` meets the ``weights`` contract:
    ``run_id`` string (no nulls), ``step`` int64, ``weights`` list<float32> or
    large_list<float32>."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"weights must be a pyarrow.Table, got {type(table).__name__}")
    problems = _require(table, METRICS_REQUIRED, "weights")
    if "weights" not in table.column_names:
        problems.append("missing column 'weights' (list<float32>)")
    else:
        t = table.schema.field("weights").type
        ok = (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
            pa.types.is_float32(t.value_type) or pa.types.is_float64(t.value_type))
        if not ok:
            problems.append(f"column 'weights' has type {t}, expected list<float32|float64> or large_list<float32|float64>")
    problems += _check_run_ids(table, "weights")
    _raise(problems, "weights")
