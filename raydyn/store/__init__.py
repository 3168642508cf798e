"""raydyn's result store: Arrow/Parquet files on any pyarrow filesystem.

>>> from raydyn.store import open_store
>>> store = open_store("./raydyn-results")          # or "s3://bucket/prefix", or $RAYDYN_STORE
>>> store.metrics(sweep="lr-grid", filter=pc.field("step") >= 100)   # doctest: +SKIP
>>> store.sql("SELECT status, count(*) FROM runs GROUP BY status")    # doctest: +SKIP

The contract every backend meets is the docstring of :class:`Store`; the
column contract of the core tables is :mod:`raydyn.store.schema`. This package
imports no Ray, no torch and nothing from raydyn but :mod:`raydyn.errors`.
"""
from __future__ import annotations

from raydyn.store.check import CheckReport, DuplicateRun, OrphanRun, OrphanTrajectory, StrayTmp, UnreadableFile
from raydyn.store.layout import validate_name
from raydyn.store.schema import (
    FINISHED_STATUSES,
    RUN_STATUSES,
    SCHEMA_VERSION,
    metrics_schema_check,
    runs_schema_check,
    weights_schema_check,
)
from raydyn.store.store import DEFAULT_STORE, STORE_ENV, Store, StoreWarning, open_store

__all__ = [
    "open_store",
    "Store",
    "StoreWarning",
    "CheckReport",
    "UnreadableFile",
    "OrphanRun",
    "OrphanTrajectory",
    "DuplicateRun",
    "StrayTmp",
    "SCHEMA_VERSION",
    "RUN_STATUSES",
    "FINISHED_STATUSES",
    "STORE_ENV",
    "DEFAULT_STORE",
    "runs_schema_check",
    "metrics_schema_check",
    "weights_schema_check",
    "validate_name",
]
