"""The Store contract, run against every backend (see conftest.py)."""
from __future__ import annotations

import json
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raydyn.errors import StoreError
from raydyn.store import SCHEMA_VERSION, Store, StoreWarning, open_store

from .helpers import FailingMoveHandler, files, make_metrics, make_runs, make_weights, read_bytes, sort, write_bytes

# Any StoreWarning a test does not expect with pytest.warns fails it.
pytestmark = pytest.mark.filterwarnings("error::raydyn.store.StoreWarning")

IDS_A = [f"a{i}" for i in range(6)]
IDS_B = [f"b{i}" for i in range(4)]


def _write_sweep(store: Store, sweep: str, parts: dict[str, list[str]], *, seed: int = 0, extra_metrics=()):
    truth = {"runs": [], "metrics": [], "weights": []}
    for k, (part, ids) in enumerate(parts.items()):
        runs = make_runs(ids, seed=seed + k)
        metrics = make_metrics(ids, seed=seed + k, extra=extra_metrics)
        weights = make_weights(ids, seed=seed + k)
        store.write_runs(sweep, part, runs=runs, metrics=metrics, weights=weights)
        for name, t in (("runs", runs), ("metrics", metrics), ("weights", weights)):
            truth[name].append(t.append_column("sweep", pa.array([sweep] * t.num_rows, pa.string())))
    return {k: pa.concat_tables(v) for k, v in truth.items()}


# ---------------------------------------------------------------------- round trip
def test_round_trip_every_table(store: Store):
    runs, metrics, weights = make_runs(IDS_A), make_metrics(IDS_A), make_weights(IDS_A)
    spectra = pa.table({"run_id": IDS_A, "mode": pa.array(range(6), pa.int64()), "eig_abs": np.linspace(0, 1, 6)})
    store.write_runs("s1", "p0", runs=runs, metrics=metrics, weights=weights, extra={"koopman_spectra": spectra})

    assert store.tables() == ["koopman_spectra", "metrics", "runs", "weights"]
    assert store.sweeps() == ["s1"]
    for name, expected in (("runs", runs), ("metrics", metrics), ("weights", weights), ("koopman_spectra", spectra)):
        got = store.table(name)
        assert got.column_names == expected.column_names + ["sweep"]
        assert got.schema.field("sweep").type == pa.string()
        assert got.column("sweep").to_pylist() == ["s1"] * expected.num_rows
        assert sort(got.drop_columns(["sweep"]), *[c for c in ("run_id", "step", "mode") if c in got.column_names]).equals(
            sort(expected, *[c for c in ("run_id", "step", "mode") if c in expected.column_names])
        )
    assert store.runs().equals(store.table("runs"))
    assert store.metrics().equals(store.table("metrics"))
    assert store.weights().equals(store.table("weights"))

    # file-level contract: metadata, no stored sweep column, zstd, exact layout
    assert files(store) == [
        "koopman_spectra/sweep=s1/part-p0.parquet",
        "metrics/sweep=s1/part-p0.parquet",
        "runs/sweep=s1/part-p0.parquet",
        "weights/sweep=s1/part-p0.parquet",
    ]
    for rel in files(store):
        with store.filesystem.open_input_file(store.path(rel)) as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata
            assert meta[b"raydyn.schema_version"] == str(SCHEMA_VERSION).encode()
            assert meta[b"raydyn.table"] == rel.split("/")[0].encode()
            assert "sweep" not in pf.schema_arrow.names
            assert pf.metadata.row_group(0).column(0).compression == "ZSTD"


def test_completed_run_ids_are_the_finished_ones_completed_diverged_stopped(store: Store):
    runs = make_runs(IDS_A)  # statuses cycle completed, diverged, failed
    store.write_runs("s1", "p0", runs=runs, metrics=make_metrics(IDS_A))
    assert store.completed_run_ids("s1") == {"a0", "a1", "a3", "a4"}
    assert store.completed_run_ids("other") == set()


# ---------------------------------------------------------------------- push-down
def test_columns_and_filter_return_exactly_the_right_rows(store: Store):
    truth_a = _write_sweep(store, "sa", {"0": IDS_A[:3], "1": IDS_A[3:]}, seed=1)
    truth_b = _write_sweep(store, "sb", {"0": IDS_B}, seed=7)
    metrics = pa.concat_tables([truth_a["metrics"], truth_b["metrics"]])

    flt = (pc.field("step") >= 3) & pc.field("run_id").isin(["a1", "a4", "b2"])
    got = store.metrics(columns=["run_id", "step", "sweep"], filter=flt)
    expected = metrics.filter(flt).select(["run_id", "step", "sweep"])
    assert got.num_rows == 6
    assert sort(got).equals(sort(expected))

    # sweep selection: a name, a list, and a filter on the partition column agree
    only_b = store.metrics(sweep="sb")
    assert set(only_b.column("sweep").to_pylist()) == {"sb"} and only_b.num_rows == len(IDS_B) * 5
    both = store.metrics(sweep=["sa", "sb"])
    assert both.num_rows == metrics.num_rows
    by_filter = store.metrics(filter=pc.field("sweep") == "sb")
    assert sort(by_filter).equals(sort(only_b))
    # float filter pushed into a metric column
    loss_flt = pc.field("loss") < 0.25
    assert sort(store.metrics(filter=loss_flt)).equals(sort(metrics.filter(loss_flt)))


def test_sweep_selection_does_not_open_other_sweeps(store: Store):
    _write_sweep(store, "good", {"0": IDS_A})
    _write_sweep(store, "bad", {"0": IDS_B})
    write_bytes(store, "metrics/sweep=bad/part-0.parquet", b"not parquet at all")
    # only the good sweep's directory is listed and opened: no warning about the bad file
    assert store.metrics(sweep="good").num_rows == len(IDS_A) * 5
    with pytest.warns(StoreWarning, match="sweep=bad"):
        store.metrics()


# ---------------------------------------------------------------------- atomic replace
def test_rewriting_a_part_replaces_it(store: Store):
    store.write_part("metrics", "s1", "7", make_metrics(IDS_A, steps=10))
    store.write_part("metrics", "s1", "7", make_metrics(IDS_A[:2], steps=3))
    got = store.metrics()
    assert got.num_rows == 6
    assert sorted(set(got.column("run_id").to_pylist())) == ["a0", "a1"]
    assert files(store) == ["metrics/sweep=s1/part-7.parquet"]  # one part, no tmp left behind


def test_write_part_sweep_column_must_match(store: Store):
    t = make_metrics(IDS_A).append_column("sweep", pa.array(["s1"] * 30))
    store.write_part("metrics", "s1", "0", t)
    assert store.metrics().num_rows == 30
    bad = make_metrics(IDS_A).append_column("sweep", pa.array(["s1"] * 29 + ["s2"]))
    with pytest.raises(StoreError, match=r"'s2'.*sweep 's1'"):
        store.write_part("metrics", "s1", "1", bad)
    assert files(store) == ["metrics/sweep=s1/part-0.parquet"]
    categorical = make_metrics(IDS_A).append_column("sweep", pa.array(["s1"] * 30).dictionary_encode())
    store.write_part("metrics", "s1", "2", categorical)  # e.g. from pandas
    assert store.metrics().schema.field("sweep").type == pa.string()
    with pytest.raises(StoreError, match=r"'sweep' has type list"):
        store.write_part("metrics", "s1", "3", make_metrics(IDS_A).append_column("sweep", pa.array([[1]] * 30)))


# ---------------------------------------------------------------------- commit order
def test_runs_part_is_written_last_and_a_crash_leaves_a_detectable_orphan(store: Store, monkeypatch):
    order: list[str] = []
    real = store._atomic_write_parquet

    def crash_before_runs(relpath: str, data: pa.Table) -> None:
        order.append(relpath.split("/")[0])
        if relpath.startswith("runs/"):
            raise KeyboardInterrupt("simulated crash before the commit marker")
        real(relpath, data)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(store, "_atomic_write_parquet", crash_before_runs)
        store.write_runs(
            "s1", "0", runs=make_runs(IDS_A), metrics=make_metrics(IDS_A), weights=make_weights(IDS_A),
            extra={"hmm_states": pa.table({"run_id": IDS_A, "state": pa.array(range(6), pa.int64())})},
        )
    assert order == ["metrics", "weights", "hmm_states", "runs"]

    reader = open_store(store.uri)  # a separate reader of the same location
    assert reader.runs().num_rows == 0
    assert reader.completed_run_ids("s1") == set()
    assert reader.metrics().num_rows == 30  # the trajectory exists, but no run owns it

    report = reader.check()
    assert not report.ok
    orphans = {(o.table, o.run_id, o.rows) for o in report.orphan_trajectories}
    assert orphans == {("metrics", r, 5) for r in IDS_A} | {("weights", r, 3) for r in IDS_A}
    assert report.orphan_runs == [] and report.unreadable == []
    assert "orphan trajectory" in report.summary()

    fixed = reader.check(repair=True)
    assert {a.split()[1] for a in fixed.actions} == {"metrics/sweep=s1/part-0.parquet", "weights/sweep=s1/part-0.parquet"}
    assert reader.metrics().num_rows == 0 and reader.weights().num_rows == 0
    q = fixed.quarantine
    assert q is not None and q.startswith("_quarantine/")
    assert f"{q}/metrics/sweep=s1/part-0.parquet" in files(reader)
    assert reader.check().ok


# ---------------------------------------------------------------------- schema unification
def test_schema_unification_across_sweeps(store: Store):
    store.write_runs("old", "0", runs=make_runs(IDS_A), metrics=make_metrics(IDS_A))
    store.write_runs("new", "0", runs=make_runs(IDS_B), metrics=make_metrics(IDS_B, extra=("acc",)))
    # an analysis table whose column is int64 in one sweep and float64 in another
    store.write_part("cmd_summary", "old", "0", pa.table({"run_id": IDS_A, "k": pa.array(range(6), pa.int64())}))
    store.write_part("cmd_summary", "new", "0", pa.table({"run_id": IDS_B, "k": pa.array([0.5] * 4), "z": ["x"] * 4}))

    m = store.metrics()
    assert m.schema.field("acc").type == pa.float64()
    acc_by_sweep = {s: m.filter(pc.field("sweep") == s).column("acc") for s in ("old", "new")}
    assert acc_by_sweep["old"].null_count == len(IDS_A) * 5
    assert acc_by_sweep["new"].null_count == 0
    # filter on a column only some sweeps have: rows of the others are null there, so excluded
    assert store.metrics(filter=pc.field("acc") >= 0).num_rows == len(IDS_B) * 5

    c = store.table("cmd_summary")
    assert c.schema.field("k").type == pa.float64() and c.schema.field("z").type == pa.string()
    assert sort(c, "run_id").column("k").to_pylist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 0.5, 0.5, 0.5, 0.5]
    # the same through SQL
    assert store.sql("SELECT count(*) AS n FROM metrics WHERE acc IS NULL").column("n")[0].as_py() == 30


def test_incompatible_types_name_the_column(store: Store):
    store.write_part("hmm_states", "s1", "0", pa.table({"state": pa.array([1, 2], pa.int64())}))
    store.write_part("hmm_states", "s2", "0", pa.table({"state": ["a", "b"]}))
    with pytest.raises(StoreError, match=r"hmm_states.*'state'.*int64.*string"):
        store.table("hmm_states")
    assert store.table("hmm_states", sweep="s2").num_rows == 2


# ---------------------------------------------------------------------- damaged files
def test_corrupt_file_is_skipped_with_a_warning_naming_it(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A[:3], "1": IDS_A[3:]})
    bad = "metrics/sweep=s1/part-1.parquet"
    write_bytes(store, bad, b"PAR1" + b"\x00garbage" * 100)
    with pytest.warns(StoreWarning, match=r"part-1\.parquet") as rec:
        got = store.metrics()
    assert store.location(bad) in str(rec[0].message)
    assert sorted(set(got.column("run_id").to_pylist())) == IDS_A[:3]  # the healthy part still returns
    with pytest.warns(StoreWarning, match=r"part-1\.parquet"):
        n = store.sql("SELECT count(*) AS n FROM metrics").column("n")[0].as_py()
    assert n == 15


def test_damaged_data_page_with_intact_footer_is_skipped(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A[:3], "1": IDS_A[3:]})
    rel = "metrics/sweep=s1/part-0.parquet"
    raw = bytearray(read_bytes(store, rel))
    with store.filesystem.open_input_file(store.path(rel)) as f:
        col = pq.ParquetFile(f).metadata.row_group(0).column(2)  # the loss column's pages
    start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
    mid = start + col.total_compressed_size // 2  # inside the chunk's pages, far from the footer
    raw[mid] ^= 0xFF
    write_bytes(store, rel, bytes(raw))
    with pytest.warns(StoreWarning, match=r"part-0\.parquet"):
        got = store.metrics()
    assert sorted(set(got.column("run_id").to_pylist())) == IDS_A[3:]
    report = store.check()
    assert [u.relpath for u in report.unreadable] == [rel]


def test_truncated_file_is_detected_and_quarantined(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A[:3], "1": IDS_A[3:]})
    rel = "metrics/sweep=s1/part-1.parquet"
    raw = read_bytes(store, rel)
    write_bytes(store, rel, raw[: len(raw) // 2])

    report = store.check()
    assert [u.relpath for u in report.unreadable] == [rel]
    assert report.unreadable[0].reason
    assert not report.ok and rel in report.summary()
    # runs a3..a5 lost their metrics: the completed/diverged ones are orphan runs (a5 failed: not an orphan)
    assert {(o.run_id, o.relpath) for o in report.orphan_runs} == {
        ("a3", "runs/sweep=s1/part-1.parquet"), ("a4", "runs/sweep=s1/part-1.parquet")
    }

    repaired = store.check(repair=True)
    q = repaired.quarantine
    assert read_bytes(store, f"{q}/{rel}") == raw[: len(raw) // 2]  # moved, byte for byte, not deleted
    assert rel not in files(store)
    # readers no longer see (or warn about) the quarantined file
    assert sorted(set(store.metrics().column("run_id").to_pylist())) == IDS_A[:3]
    # orphan runs removed from the runs part (original kept in quarantine) so a resume re-runs them
    assert sorted(store.runs().column("run_id").to_pylist()) == ["a0", "a1", "a2", "a5"]
    assert store.completed_run_ids("s1") == {"a0", "a1"}
    assert f"{q}/runs/sweep=s1/part-1.parquet" in files(store)
    # weights of the removed runs are removed too, leaving the store consistent
    assert sorted(set(store.weights().column("run_id").to_pylist())) == ["a0", "a1", "a2", "a5"]
    assert store.check().ok, store.check().summary()


def test_orphans_inside_a_healthy_multi_run_part_are_rewritten_not_lost(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A})
    # metrics of a1 vanish (e.g. a buggy rewrite): a1 becomes an orphan run; add an orphan trajectory too
    m = store.metrics().drop_columns(["sweep"]).filter(pc.field("run_id") != "a1")
    m = pa.concat_tables([m, make_metrics(["ghost"], seed=3)])
    store.write_part("metrics", "s1", "0", m)

    report = store.check()
    assert [(o.run_id) for o in report.orphan_runs] == ["a1"]
    assert {(o.table, o.run_id) for o in report.orphan_trajectories} == {("metrics", "ghost")}
    fixed = store.check(repair=True)
    assert any(a.startswith("rewrote runs/sweep=s1/part-0.parquet without 1 orphan row") for a in fixed.actions)
    assert any(a.startswith("rewrote metrics/sweep=s1/part-0.parquet without 5 orphan row") for a in fixed.actions)
    assert sorted(store.runs().column("run_id").to_pylist()) == ["a0", "a2", "a3", "a4", "a5"]
    assert "ghost" not in store.metrics().column("run_id").to_pylist()
    assert "a1" not in store.weights().column("run_id").to_pylist()
    # originals kept in quarantine, untouched
    q = fixed.quarantine
    with store.filesystem.open_input_file(store.path(f"{q}/runs/sweep=s1/part-0.parquet")) as f:
        assert pq.ParquetFile(f).read().num_rows == 6
    assert store.check().ok


def test_duplicate_runs_are_reported_not_repaired(store: Store):
    store.write_runs("s1", "0", runs=make_runs(IDS_A[:2]), metrics=make_metrics(IDS_A[:2]))
    store.write_runs("s1", "1", runs=make_runs(IDS_A[:1]), metrics=make_metrics(IDS_A[:1]))
    report = store.check(repair=True)
    assert [(d.run_id, d.relpaths) for d in report.duplicate_runs] == [
        ("a0", ("runs/sweep=s1/part-0.parquet", "runs/sweep=s1/part-1.parquet"))
    ]
    assert report.actions == [] and "not repaired" in report.summary()
    assert store.runs().num_rows == 3


def test_tmp_files_are_invisible_to_readers_and_stale_ones_reported(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A})
    # a complete parquet file and a half one, both still under their tmp names
    whole = read_bytes(store, "metrics/sweep=s1/part-0.parquet")
    write_bytes(store, "metrics/sweep=s1/.tmp-1-0123abcd.parquet", whole)
    write_bytes(store, "metrics/sweep=s1/.tmp-2-4567ef01.parquet", whole[:100])
    write_bytes(store, "sweeps/s1/.tmp-sweep.json-89ab", b"{")
    assert store.metrics().num_rows == 30  # no warnings (they are errors here), no extra rows
    assert store.sql("SELECT count(*) AS n FROM metrics").column("n")[0].as_py() == 30
    assert store.tables() == ["metrics", "runs", "weights"]

    assert store.check().ok  # fresh tmp files may belong to a live writer
    report = store.check(stale_tmp_minutes=0)
    assert sorted(t.relpath for t in report.stray_tmp) == [
        "metrics/sweep=s1/.tmp-1-0123abcd.parquet",
        "metrics/sweep=s1/.tmp-2-4567ef01.parquet",
        "sweeps/s1/.tmp-sweep.json-89ab",
    ]
    store.check(repair=True, stale_tmp_minutes=0)
    assert not [f for f in files(store) if ".tmp-" in f and not f.startswith("_quarantine/")]
    assert len([f for f in files(store) if f.startswith("_quarantine/")]) == 3
    assert store.check(stale_tmp_minutes=0).ok


# ---------------------------------------------------------------------- SQL
def test_sql_views_and_join(store: Store):
    truth = _write_sweep(store, "sa", {"0": IDS_A[:3], "1": IDS_A[3:]}, seed=1)
    truth_b = _write_sweep(store, "sb", {"0": IDS_B}, seed=2)
    got = store.sql(
        """
        SELECT r.sweep, r.run_id, r.lr, avg(m.loss) AS mean_loss, count(*) AS n
        FROM runs r JOIN metrics m ON m.run_id = r.run_id AND m.sweep = r.sweep
        WHERE m.step >= 2 AND r.status IN ('completed', 'diverged')
        GROUP BY ALL ORDER BY r.sweep, r.run_id
        """
    )
    runs = pa.concat_tables([truth["runs"], truth_b["runs"]])
    metrics = pa.concat_tables([truth["metrics"], truth_b["metrics"]])
    keep = runs.filter(pc.field("status").isin(["completed", "diverged"]))
    expected = []
    for sweep, rid, lr in zip(*(keep.column(c).to_pylist() for c in ("sweep", "run_id", "lr"))):
        loss = metrics.filter((pc.field("run_id") == rid) & (pc.field("sweep") == sweep) & (pc.field("step") >= 2))
        expected.append((sweep, rid, lr, float(np.mean(loss.column("loss").to_numpy())), 3))
    rows = list(zip(*(got.column(c).to_pylist() for c in got.column_names)))
    assert [r[:3] + (r[4],) for r in rows] == [e[:3] + (e[4],) for e in sorted(expected)]
    np.testing.assert_allclose([r[3] for r in rows], [e[3] for e in sorted(expected)], rtol=1e-12)


def test_sql_quoted_table_names_and_absent_core_tables(store: Store):
    store.write_part("koopman-spectra.v2", "s1", "0", pa.table({"x": [1.0, 2.0, 3.0]}))
    assert store.sql('SELECT sum(x) AS s FROM "koopman-spectra.v2"').column("s")[0].as_py() == 6.0
    # weights never written: the view exists and is empty with contract columns
    w = store.sql("SELECT run_id, step, weights, sweep FROM weights")
    assert w.num_rows == 0


def test_sql_errors_are_store_errors(store: Store):
    _write_sweep(store, "s1", {"0": IDS_A})
    with pytest.raises(StoreError, match="(?i)syntax error"):
        store.sql("SELEC * FROM runs")
    with pytest.raises(StoreError, match="nope"):
        store.sql("SELECT * FROM nope")
    with pytest.raises(StoreError, match="no_such_col"):
        store.sql("SELECT no_such_col FROM runs")


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO runs SELECT * FROM runs",
        "UPDATE runs SET lr = 0",
        "DELETE FROM runs",
        "CREATE TABLE t AS SELECT 1",
        "CREATE VIEW v AS SELECT 1",
        "DROP VIEW runs",
        "ATTACH 'other.db'",
        "PRAGMA enable_profiling",
        "SET threads = 1",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SELECT 1; DROP VIEW runs",
    ],
)
def test_sql_refuses_statements_that_modify(store: Store, statement: str):
    _write_sweep(store, "s1", {"0": IDS_A[:2]})
    with pytest.raises(StoreError, match="raydyn query is read-only"):
        store.sql(statement)
    assert store.runs().num_rows == 2


def test_sql_has_no_file_access(store: Store, tmp_path):
    _write_sweep(store, "s1", {"0": IDS_A[:2]})
    target = tmp_path / "leak.csv"
    with pytest.raises(StoreError, match="read-only"):
        store.sql(f"COPY (SELECT * FROM runs) TO '{target}'")
    assert not target.exists()
    secret = tmp_path / "secret.csv"
    secret.write_text("a,b\n1,2\n")
    for query in (
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM '{secret}'",
        f"SELECT * FROM read_parquet('{tmp_path}/**/*.parquet')",
    ):
        with pytest.raises(StoreError):
            store.sql(query)


# ---------------------------------------------------------------------- missing things
def test_missing_tables_read_empty_and_missing_columns_raise(store: Store):
    assert store.tables() == [] and store.sweeps() == []
    runs = store.runs()
    assert runs.num_rows == 0 and {"run_id", "status", "seed", "sweep"} <= set(runs.column_names)
    assert runs.schema.field("seed").type == pa.int64()
    empty = store.table("hmm_states", columns=["run_id", "state"], filter=pc.field("state") > 1)
    assert empty.num_rows == 0 and empty.column_names == ["run_id", "state"]

    _write_sweep(store, "s1", {"0": IDS_A})
    with pytest.raises(StoreError, match=r"no column\(s\) \['lss'\].*available.*'loss'"):
        store.metrics(columns=["run_id", "lss"])
    with pytest.raises(StoreError, match="lss"):
        store.metrics(filter=pc.field("lss") > 0)
    assert store.metrics(sweep="not-there").num_rows == 0
    assert store.sweep_meta("s1") is None and store.sweep_text("s1") is None


def test_unopened_location_is_empty_until_written(store_uri):
    reader = open_store(store_uri)  # no write: nothing created
    assert not reader.exists()
    assert reader.tables() == [] and reader.runs().num_rows == 0 and reader.check().ok
    reader.write_part("metrics", "s1", "0", make_metrics(IDS_A))  # first write creates the root
    assert reader.exists() and reader.tables() == ["metrics"]


# ---------------------------------------------------------------------- sweep records
def test_put_sweep_round_trips_text_and_json_meta(store: Store):
    text = "# grid\nlr: [0.1, 0.01]   \nname: 'β-sweep'\n\n"
    rec = store.put_sweep("s1", text, {"seed": 3, "git": {"sha": "abc"}})
    assert store.sweep_text("s1") == text
    meta = store.sweep_meta("s1")
    assert meta == rec
    assert meta["seed"] == 3 and meta["git"] == {"sha": "abc"} and meta["schema_version"] == SCHEMA_VERSION
    assert meta["sha256"] == __import__("hashlib").sha256(text.encode()).hexdigest()
    assert "pyarrow" in meta["versions"] and "created_utc" in meta
    assert json.loads(read_bytes(store, "sweeps/s1/sweep.json")) == meta  # plain JSON on disk
    assert files(store) == ["sweeps/s1/sweep.json", "sweeps/s1/sweep.yaml"]
    assert store.sweeps() == ["s1"]

    again = store.put_sweep("s1", text, {"seed": 3, "resumed": True})  # same text: creation time kept
    assert again["created_utc"] == meta["created_utc"] and again["resumed"] is True
    with pytest.raises(StoreError, match="different sweep file"):
        store.put_sweep("s1", text + "x: 1\n", {})
    store.put_sweep("s1", "x: 1\n", {}, overwrite=True)
    assert store.sweep_text("s1") == "x: 1\n"
    with pytest.raises(StoreError, match="JSON"):
        store.put_sweep("s2", "a: 1\n", {"bad": object()})
    with pytest.raises(StoreError, match="JSON"):
        store.put_sweep("s2", "a: 1\n", {"bad": float("nan")})
    with pytest.raises(StoreError, match="'sha256' is computed"):
        store.put_sweep("s2", "a: 1\n", {"sha256": "forged"})
    assert store.sweep_text("s2") is None


# ---------------------------------------------------------------------- names
@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "_x", "a b", "β", "x" * 201, "sweep=1"])
def test_bad_names_are_rejected_naming_the_value(store: Store, bad: str):
    t = make_metrics(IDS_A[:1])
    for call in (
        lambda: store.write_part(bad, "s", "p", t),
        lambda: store.write_part("metrics", bad, "p", t),
        lambda: store.write_part("metrics", "s", bad, t),
        lambda: store.table(bad),
        lambda: store.metrics(sweep=[bad]),
        lambda: store.put_sweep(bad, "x", {}),
        lambda: store.sweep_meta(bad),
    ):
        with pytest.raises(StoreError) as info:
            call()
        assert repr(bad)[:40].rstrip("'") in str(info.value)
    assert files(store) == []


def test_reserved_table_name(store: Store):
    with pytest.raises(StoreError, match="'sweeps'"):
        store.write_part("sweeps", "s", "p", make_metrics(IDS_A[:1]))
    with pytest.raises(StoreError, match="core table"):
        store.write_runs("s", "p", runs=make_runs(IDS_A[:1]), extra={"metrics": make_metrics(IDS_A[:1])})


def test_write_runs_checks_everything_before_writing(store: Store):
    with pytest.raises(StoreError, match="missing column 'population'"):
        store.write_runs("s1", "0", runs=make_runs(IDS_A).drop_columns(["population"]), metrics=make_metrics(IDS_A))
    with pytest.raises(StoreError, match=r"run_id\(s\) \['zz'\]"):
        store.write_runs("s1", "0", runs=make_runs(IDS_A), metrics=make_metrics(IDS_A + ["zz"]))
    with pytest.raises(StoreError, match="'loss'.*float64"):
        m = make_metrics(IDS_A)
        store.write_runs("s1", "0", runs=make_runs(IDS_A), metrics=m.set_column(2, "loss", pc.cast(m["loss"], pa.float32())))
    assert files(store) == []


# ---------------------------------------------------------------------- concurrency
def test_concurrent_writers_in_threads_do_not_clobber(store_uri):
    def work(k: int) -> None:
        s = open_store(store_uri, write=True)  # each writer its own Store, as separate workers would
        ids = [f"w{k}-{i}" for i in range(3)]
        s.write_runs(f"s{k % 2}", f"part{k}", runs=make_runs(ids, seed=k), metrics=make_metrics(ids, seed=k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = open_store(store_uri)
    runs = store.runs()
    assert runs.num_rows == 24
    assert sorted(runs.column("run_id").to_pylist()) == sorted(f"w{k}-{i}" for k in range(8) for i in range(3))
    for k in range(8):
        sub = store.metrics(sweep=f"s{k % 2}", filter=pc.field("run_id").isin([f"w{k}-{i}" for i in range(3)]))
        expected = make_metrics([f"w{k}-{i}" for i in range(3)], seed=k)
        assert sort(sub.drop_columns(["sweep"])).equals(sort(expected))
    assert store.check().ok


def test_reader_never_sees_a_half_written_part(store: Store, backend: str):
    if backend == "s3":
        # Real S3 replaces an object atomically (a GET sees the old or the new body); the local moto
        # server used here does not, and a reader racing a replace can get a truncated body (seen once
        # in ~4 fresh-clone runs). This test would measure moto, not raydyn: the property is checked on
        # the other backends, and the s3 code path's writes and reads by every other test here.
        pytest.skip("moto's S3 server does not replace objects atomically, unlike S3")
    small, big = make_metrics(IDS_A, steps=50), make_metrics(IDS_A, steps=400)
    store.write_part("metrics", "s1", "0", small)
    stop = threading.Event()
    errors: list[BaseException] = []
    writes = 0

    def writer() -> None:
        nonlocal writes
        try:
            while not stop.is_set():
                store.write_part("metrics", "s1", "0", big if writes % 2 == 0 else small)
                writes += 1
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    seen: set[int] = set()
    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(25):
            seen.add(store.metrics(columns=["step"]).num_rows)  # a warning here would be an error
            seen.add(store.sql("SELECT count(*) AS n FROM metrics").column("n")[0].as_py())
    finally:
        stop.set()
        t.join()
    assert not errors
    assert writes >= 10, "the writer should overlap the reader"
    assert seen <= {small.num_rows, big.num_rows}
    assert store.metrics().num_rows in (small.num_rows, big.num_rows)
    assert files(store) == ["metrics/sweep=s1/part-0.parquet"]


def test_rewrite_failure_leaves_the_old_part_and_no_tmp(store: Store, monkeypatch):
    store.write_part("metrics", "s1", "0", make_metrics(IDS_A))
    faulty = pafs.PyFileSystem(FailingMoveHandler(store.filesystem))
    with monkeypatch.context() as m, pytest.raises(StoreError, match=r"part-0\.parquet.*disk full"):
        m.setattr(store, "_fs", faulty)
        store.write_part("metrics", "s1", "0", make_metrics(IDS_A[:1]))
    assert store.metrics().num_rows == 30
    assert files(store) == ["metrics/sweep=s1/part-0.parquet"]
