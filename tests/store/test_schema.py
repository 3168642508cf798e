"""The column contract checks and the name/layout rules."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from raydyn.errors import RaydynError, StoreError
from raydyn.store import (
    SCHEMA_VERSION,
    metrics_schema_check,
    runs_schema_check,
    validate_name,
    weights_schema_check,
)
from raydyn.store.layout import parse_relpath
from raydyn.store.schema import RUNS_REQUIRED

from .helpers import make_metrics, make_runs, make_weights


def test_schema_version_and_error_type():
    assert SCHEMA_VERSION == 1
    assert issubclass(StoreError, RaydynError)


def test_valid_tables_pass():
    runs_schema_check(make_runs(["a", "b", "c"]))
    metrics_schema_check(make_metrics(["a"]))
    weights_schema_check(make_weights(["a"]))
    # large strings (polars) and all-null config columns are fine
    r = make_runs(["a", "b"])
    r = r.set_column(0, "run_id", pc.cast(r["run_id"], pa.large_string()))
    r = r.append_column("maybe", pa.nulls(2))
    runs_schema_check(r)
    w = make_weights(["a"])
    weights_schema_check(w.set_column(2, "weights", pc.cast(w["weights"], pa.large_list(pa.float32()))))


@pytest.mark.parametrize("column", sorted(RUNS_REQUIRED))
def test_each_missing_runs_column_is_named(column):
    with pytest.raises(StoreError, match=f"missing column '{column}'"):
        runs_schema_check(make_runs(["a"]).drop_columns([column]))


@pytest.mark.parametrize(
    "column, bad_type, expected",
    [
        ("seed", pa.float64(), "int64"),
        ("steps_done", pa.int32(), "int64"),
        ("wall_time_s", pa.float32(), "float64"),
        ("run_id", pa.int64(), "string"),
        ("final_loss", pa.float32(), "float64"),
    ],
)
def test_mistyped_runs_columns_are_named(column, bad_type, expected):
    r = make_runs(["1", "2"])
    r = r.set_column(r.column_names.index(column), column, pc.cast(r[column], bad_type))
    with pytest.raises(StoreError, match=rf"'{column}' has type {bad_type}, expected {expected}"):
        runs_schema_check(r)


def test_runs_value_rules():
    r = make_runs(["a", "b"])
    with pytest.raises(StoreError, match=r"config column 'tags'.*list"):
        runs_schema_check(r.append_column("tags", pa.array([[1], [2]])))
    with pytest.raises(StoreError, match=r"'status' has value\(s\) \['crashed'\].*completed"):
        runs_schema_check(r.set_column(2, "status", pa.array(["completed", "crashed"])))
    with pytest.raises(StoreError, match=r"duplicate run_id.*'a'"):
        runs_schema_check(make_runs(["a", "a"]))
    with pytest.raises(StoreError, match="null"):
        runs_schema_check(r.set_column(0, "run_id", pa.array(["a", None])))
    with pytest.raises(TypeError, match="DataFrame|dict"):
        runs_schema_check({"run_id": ["a"]})


def test_metrics_and_weights_rules():
    m = make_metrics(["a"])
    with pytest.raises(StoreError, match="missing column 'step'"):
        metrics_schema_check(m.drop_columns(["step"]))
    with pytest.raises(StoreError, match="'loss' has type float"):
        metrics_schema_check(m.set_column(2, "loss", pc.cast(m["loss"], pa.float32())))
    with pytest.raises(StoreError, match="'step' has type int32"):
        metrics_schema_check(m.set_column(1, "step", pc.cast(m["step"], pa.int32())))
    w = make_weights(["a"])
    weights_schema_check(w.set_column(2, "weights", pc.cast(w["weights"], pa.list_(pa.float64()))))  # on request
    with pytest.raises(StoreError, match=r"'weights' has type list<item: int32>"):
        weights_schema_check(w.set_column(2, "weights", pc.cast(w["weights"], pa.list_(pa.int32()), safe=False)))
    with pytest.raises(StoreError, match="missing column 'weights'"):
        weights_schema_check(w.drop_columns(["weights"]))


@pytest.mark.parametrize("good", ["runs", "koopman_spectra", "lr-grid.v2", "0", "A_b-c.d"])
def test_good_names(good):
    assert validate_name("table", good) == good


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", "-x", "x y", "x\n", "ü", None, 3])
def test_bad_names(bad):
    with pytest.raises(StoreError, match="invalid sweep name"):
        validate_name("sweep", bad)


def test_parse_relpath_only_accepts_part_files():
    p = parse_relpath("metrics/sweep=s1/part-007.parquet")
    assert (p.table, p.sweep, p.part) == ("metrics", "s1", "007")
    for rel in (
        "metrics/sweep=s1/.tmp-007-abc.parquet",
        "metrics/sweep=s1/part-007.parquet.bak",
        "metrics/s1/part-0.parquet",
        "_quarantine/20240101T000000Z/metrics/sweep=s1/part-0.parquet",
        "sweeps/s1/sweep.json",
        "sweeps/sweep=s1/part-0.parquet",
        "metrics/sweep=../part-0.parquet",
    ):
        assert parse_relpath(rel) is None, rel
