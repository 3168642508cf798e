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
    weights_layout      string                     JSON: parameter names, shapes, offsets (:class:`WeightsLayout`)
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

import json
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import field as _field
from importlib import metadata as _metadata
from types import MappingProxyType
from typing import Any, NamedTuple

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
    "WeightsLayout",
    "StoredParam",
    "RUN_LIBRARIES",
    "SWEEP_LIBRARIES",
    "library_versions",
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


#: How often a read is retried when the files it read were replaced under it (``Store.table``, ``Store.sql``).
READ_ATTEMPTS = 3

_CONTRACT_TYPES: dict[str, pa.DataType] = {_STRING: pa.string(), _INT: pa.int64(), _FLOAT: pa.float64()}
_EMPTY_CORE: dict[str, dict[str, pa.DataType]] = {
    "runs": {k: _CONTRACT_TYPES[v] for k, v in RUNS_REQUIRED.items()},
    "metrics": {"run_id": pa.string(), "step": pa.int64()},
    "weights": {"run_id": pa.string(), "step": pa.int64(), "weights": pa.list_(pa.float32())},
}


def empty_table(name: str, columns: list[str] | None) -> pa.Table:
    """What reading a table that has no files gives: its contract columns (or ``columns``), no rows."""
    known = dict(_EMPTY_CORE.get(name, {}))
    known["sweep"] = pa.string()
    names = columns if columns is not None else list(known)
    schema = pa.schema([pa.field(c, known.get(c, pa.null())) for c in names], metadata=file_metadata(name))
    return schema.empty_table()


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


# ------------------------------------------------------------------------------ runs.versions
#: Libraries whose versions a runs row records (``runs.versions``; ``"unknown"`` when one is not installed).
RUN_LIBRARIES: tuple[str, ...] = ("raydyn", "torch", "ray", "numpy", "pyarrow")
#: Libraries whose versions a sweep's ``sweep.json`` records by default (with Python's; left out when not installed).
SWEEP_LIBRARIES: tuple[str, ...] = ("raydyn", "pyarrow", "duckdb", "numpy", "torch", "ray", "scipy")


def library_versions(libraries: Iterable[str] = RUN_LIBRARIES, *, python: bool = False,
                     missing: str | None = "unknown") -> dict[str, str]:
    """Installed versions of ``libraries``, in their order: ``missing`` for one that is not installed
    (None: left out); with ``python``, the interpreter's version first, under ``"python"``.

    The defaults give ``runs.versions``; ``library_versions(SWEEP_LIBRARIES, python=True, missing=None)``
    what :meth:`raydyn.store.Store.put_sweep` records.
    """
    out = {"python": sys.version.split()[0]} if python else {}
    for dist in libraries:
        try:
            out[dist] = _metadata.version(dist)
        except _metadata.PackageNotFoundError:
            if missing is not None:
                out[dist] = missing
    return out


# ------------------------------------------------------------------------------ runs.weights_layout
#: The keys of a ``weights_layout`` that :class:`WeightsLayout` has fields for, in the order the recorder
#: (and :func:`raydyn.track`) write them.
_LAYOUT_KEYS: tuple[str, ...] = ("kind", "names", "shapes", "offsets", "dim", "param_names", "source_dim",
                                 "sketch_seed", "dtype", "buffer_names", "buffer_shapes")


def _freeze(v: Any) -> Any:
    """A JSON value made immutable: lists as tuples, objects as read-only mappings."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Mapping):
        return MappingProxyType({k: _freeze(x) for k, x in v.items()})
    return v


def _thaw(v: Any) -> Any:
    """The JSON value of a frozen one (:func:`_freeze` undone)."""
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    return v


class StoredParam(NamedTuple):
    """One stored parameter tensor of a snapshot: its position in ``names``, name, shape, and the columns
    of the flat snapshot vector that hold it."""

    index: int
    name: str
    shape: tuple[int, ...]
    cols: slice


@dataclass(frozen=True)
class WeightsLayout:
    """How a run's flat weight snapshots unflatten: the ``runs.weights_layout`` JSON as a typed record.

    ``kind`` is ``full`` (every trained parameter), ``layers`` (the tensors ``train.weights.layers``
    names), either with ``+countsketch`` (a seeded CountSketch of those ``source_dim`` values to ``dim``
    dimensions, seed ``sketch_seed``), ``none`` (a tracked run that logged no model), or None (no layout
    stored). ``names``/``shapes``/``offsets`` describe the stored tensors (column ``offsets[i]:offsets[i+1]``
    of an unsketched vector is tensor ``names[i]``), ``dim`` the stored vector's length, ``param_names``
    every parameter of the model, ``dtype`` the stored precision when the layout records it (runs logged with
    :func:`raydyn.track`; a sweep's runs say it in ``train.weights.dtype``), ``buffer_names``/``buffer_shapes``
    the floating buffers stored with the snapshots (``weights.buffers``). Lists are tuples here; ``extra`` holds
    keys raydyn does not know, as stored. A field is None when its key is absent.

    ``key_order`` is the key order of the JSON it was parsed from, so that :meth:`to_json` gives that text
    back; a layout built in code (None) writes its keys in the recorder's order.
    """

    kind: str | None = None
    names: tuple[str, ...] | None = None
    shapes: tuple[tuple[int, ...], ...] | None = None
    offsets: tuple[int, ...] | None = None
    dim: int | None = None
    param_names: tuple[str, ...] | None = None
    source_dim: int | None = None
    sketch_seed: int | None = None
    dtype: str | None = None
    buffer_names: tuple[str, ...] | None = None
    buffer_shapes: tuple[tuple[int, ...], ...] | None = None
    extra: Mapping[str, Any] = _field(default_factory=lambda: MappingProxyType({}))
    key_order: tuple[str, ...] | None = _field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for k in _LAYOUT_KEYS:  # lists given in code become tuples, as parsed ones are
            v = getattr(self, k)
            if isinstance(v, (list, tuple, Mapping)):
                object.__setattr__(self, k, _freeze(v))
        if not isinstance(self.extra, MappingProxyType):
            object.__setattr__(self, "extra", _freeze(dict(self.extra)))

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_json(cls, value: "str | bytes | Mapping[str, Any] | WeightsLayout | None") -> "WeightsLayout":
        """The layout of a ``runs.weights_layout`` value: JSON text, the parsed dict, a WeightsLayout (returned
        as it is), or None / ``""`` (no layout: every field None)."""
        if isinstance(value, WeightsLayout):
            return value
        d = json.loads(value) if isinstance(value, (str, bytes, bytearray)) and value else (value or {})
        if not isinstance(d, Mapping):
            raise StoreError(f"weights_layout must be a JSON object, got {type(d).__name__}: {str(value)[:80]!r}")
        return cls(**{k: _freeze(d[k]) for k in _LAYOUT_KEYS if k in d},
                   extra=MappingProxyType({k: _freeze(v) for k, v in d.items() if k not in _LAYOUT_KEYS}),
                   key_order=tuple(d))

    def to_dict(self) -> dict[str, Any]:
        """The layout as the JSON object it is stored as (lists, the keys in their stored order)."""
        out: dict[str, Any] = {}
        for k in self.key_order or ():
            if k in _LAYOUT_KEYS:
                out[k] = _thaw(getattr(self, k))
            elif k in self.extra:
                out[k] = _thaw(self.extra[k])
        for k in _LAYOUT_KEYS:
            if k not in out and getattr(self, k) is not None:
                out[k] = _thaw(getattr(self, k))
        for k, v in self.extra.items():
            if k not in out:
                out[k] = _thaw(v)
        return out

    def to_json(self) -> str:
        """The ``runs.weights_layout`` text (``json.dumps`` of :meth:`to_dict`, as raydyn has always written it)."""
        return json.dumps(self.to_dict())

    def __getitem__(self, key: str) -> Any:
        """A key of the stored JSON object (``layout["names"]`` is a list), for code written against it."""
        return self.to_dict()[key]

    def __reduce__(self) -> tuple[Any, ...]:  # pickled as its JSON object (read-only mappings do not pickle)
        return (WeightsLayout.from_json, (self.to_dict(),))

    # ------------------------------------------------------------------ meaning
    @property
    def is_full(self) -> bool:
        """Every trained parameter, unsketched: the snapshots load back into the model."""
        return self.kind == "full"

    @property
    def is_sketch(self) -> bool:
        """A CountSketch projection: no column of a snapshot belongs to one parameter."""
        return "countsketch" in (self.kind or "")

    @property
    def sizes(self) -> tuple[int, ...]:
        """The number of stored values of each tensor of ``names`` (from ``offsets``)."""
        offs = self.offsets or ()
        return tuple(offs[i + 1] - offs[i] for i in range(len(offs) - 1))

    def select(self, prefixes: Iterable[str] | None = None) -> list[StoredParam]:
        """The stored tensors whose names start with one of ``prefixes`` (None: all of them), in stored
        order, with the columns of the snapshot vector that hold them; ``[]`` when none matches.

        Raises StoreError on a CountSketch layout (its columns mix every parameter) or one naming no tensors.
        """
        if self.is_sketch:
            raise StoreError(f"the snapshots are a CountSketch of the parameters ({self.source_dim} values "
                             f"projected to {self.dim} dimensions): no column belongs to one parameter; record "
                             "full snapshots or fewer tensors (train.weights.layers)")
        if self.names is None or self.offsets is None:
            raise StoreError(f"weights_layout of kind {self.kind!r} names no stored parameter tensors")
        prefixes = None if prefixes is None else tuple(prefixes)
        shapes = self.shapes or ((),) * len(self.names)
        return [StoredParam(i, n, tuple(shapes[i]), slice(self.offsets[i], self.offsets[i + 1]))
                for i, n in enumerate(self.names) if prefixes is None or any(n.startswith(p) for p in prefixes)]
