"""Local-disk specifics: store resolution, permissions, other readers of the layout, processes."""
from __future__ import annotations

import ast
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from raydyn.errors import StoreError
from raydyn.store import DEFAULT_STORE, STORE_ENV, open_store

from .helpers import files, make_metrics, make_runs, sort, write_bytes

pytestmark = pytest.mark.filterwarnings("error::raydyn.store.StoreWarning")

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- resolution
def test_default_store_comes_from_env_then_cwd(tmp_path, monkeypatch):
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "from-env"))
    assert open_store().uri == (tmp_path / "from-env").as_uri()
    monkeypatch.delenv(STORE_ENV)
    monkeypatch.chdir(tmp_path)
    s = open_store()
    assert s.uri == (tmp_path / DEFAULT_STORE).resolve().as_uri()
    assert not s.exists()  # opening for reading creates nothing
    open_store(write=True)
    assert (tmp_path / "raydyn-results").is_dir()


def test_path_and_file_uri_name_the_same_store(tmp_path):
    by_path = open_store(str(tmp_path / "s"), write=True)
    by_path.write_runs("s1", "0", runs=make_runs(["a", "b"]), metrics=make_metrics(["a", "b"]))
    by_uri = open_store((tmp_path / "s").as_uri())
    assert by_uri.uri == by_path.uri
    assert by_uri.runs().equals(by_path.runs())
    assert open_store(tmp_path / "s").runs().num_rows == 2  # os.PathLike too


def test_unknown_scheme_is_a_store_error():
    with pytest.raises(StoreError, match="nosuchscheme://x"):
        open_store("nosuchscheme://x/y")


# ---------------------------------------------------------------------- writability
def test_path_under_a_regular_file_fails_before_anything_is_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "store"
    with pytest.raises(StoreError) as info:
        open_store(str(target), write=True)
    msg = str(info.value)
    assert str(target) in msg and "Not a directory" in msg  # the path and the OS reason
    # lazily: the first write checks, and nothing at all is written
    lazy = open_store(str(target))
    with pytest.raises(StoreError, match="Not a directory"):
        lazy.write_runs("s1", "0", runs=make_runs(["a"]), metrics=make_metrics(["a"]))
    with pytest.raises(StoreError, match="Not a directory"):
        lazy.put_sweep("s1", "a: 1\n", {})
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_root_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "store"
    f.write_text("x")
    with pytest.raises(StoreError, match=r"store"):
        open_store(str(f), write=True)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_directory_fails_before_anything_is_written(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError) as info:
            open_store(str(ro / "store"), write=True)
        assert str(ro / "store") in str(info.value) and "Permission denied" in str(info.value)
        existing = ro  # the directory exists but cannot take the probe file
        with pytest.raises(StoreError, match="not writable|Permission denied"):
            open_store(str(existing), write=True)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_read_only_directory_as_root_still_works_or_fails_cleanly(tmp_path):
    """Whoever runs the tests, a 0o500 directory gives a writable store (root) or a StoreError (others)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        try:
            s = open_store(str(ro / "store"), write=True)
        except StoreError as e:
            assert "Permission denied" in str(e)
        else:
            assert os.geteuid() == 0
            assert s.exists() and files(s) == []  # the probe file was removed
    finally:
        ro.chmod(0o700)


# ---------------------------------------------------------------------- other readers
@pytest.fixture
def populated(tmp_path):
    s = open_store(str(tmp_path / "store"), write=True)
    s.write_runs("sa", "0", runs=make_runs(["a0", "a1"]), metrics=make_metrics(["a0", "a1"], seed=1))
    s.write_runs("sa", "1", runs=make_runs(["a2"]), metrics=make_metrics(["a2"], seed=2))
    s.write_runs("sb", "0", runs=make_runs(["b0"]), metrics=make_metrics(["b0"], seed=3))
    s.put_sweep("sa", "a: 1\n", {})
    # things other readers must not trip over: an in-flight tmp file and a quarantine
    write_bytes(s, "metrics/sweep=sa/.tmp-2-deadbeef.parquet", b"half a file")
    write_bytes(s, "_quarantine/20200101T000000Z/metrics/sweep=sa/part-9.parquet", b"junk")
    return s


def _rows(t) -> list[tuple]:
    cols = ["sweep", "run_id", "step", "loss"]
    return sorted(zip(*(list(t[c]) for c in cols)))


def test_layout_is_readable_without_raydyn(populated):
    root = Path(populated.root)
    expected = _rows({c: populated.metrics().column(c).to_pylist() for c in ["sweep", "run_id", "step", "loss"]})
    assert len(expected) == 4 * 5

    d = ds.dataset(root / "metrics", format="parquet", partitioning="hive")  # ignores '.'/'_' files
    t = d.to_table()
    assert _rows({c: t.column(c).to_pylist() for c in t.column_names}) == expected

    df = pd.read_parquet(root / "metrics")
    assert _rows({c: df[c].astype(object if c != "loss" else float).tolist() for c in df.columns}) == expected

    glob = str(root / "metrics" / "sweep=*" / "part-*.parquet")
    lf = pl.scan_parquet(glob, hive_partitioning=True).collect()
    assert _rows({c: lf[c].to_list() for c in lf.columns}) == expected

    rel = duckdb.sql(f"SELECT * FROM read_parquet('{glob}', hive_partitioning = true)").to_arrow_table()
    assert _rows({c: rel.column(c).to_pylist() for c in rel.column_names}) == expected

    # and the file metadata survives a foreign reader
    assert d.schema.metadata is None or d.schema.metadata.get(b"raydyn.table") in (b"metrics", None)


# ---------------------------------------------------------------------- processes
def _write_in_process(args: tuple[str, int]) -> int:
    uri, k = args
    store = open_store(uri, write=True)
    ids = [f"p{k}-{i}" for i in range(4)]
    for rewrite in range(3):  # re-writing its own part must not disturb anyone else's
        store.write_runs(f"s{k % 3}", f"worker{k}", runs=make_runs(ids, seed=k), metrics=make_metrics(ids, seed=k + rewrite))
    return os.getpid()


def test_concurrent_writer_processes_do_not_clobber(tmp_path):
    uri = str(tmp_path / "store")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        pids = pool.map(_write_in_process, [(uri, k) for k in range(8)])
    assert len(set(pids)) > 1
    store = open_store(uri)
    runs = store.runs()
    assert sorted(runs.column("run_id").to_pylist()) == sorted(f"p{k}-{i}" for k in range(8) for i in range(4))
    for k in range(8):
        ids = [f"p{k}-{i}" for i in range(4)]
        got = store.metrics(sweep=f"s{k % 3}", filter=pc.field("run_id").isin(ids)).drop_columns(["sweep"])
        assert sort(got).equals(sort(make_metrics(ids, seed=k + 2)))  # the last rewrite, whole
    assert store.check().ok
    assert not [f for f in files(store) if ".tmp-" in f]


def test_store_pickles_for_workers(tmp_path):
    s = open_store(str(tmp_path / "store"), write=True)
    s.write_runs("s1", "0", runs=make_runs(["a"]), metrics=make_metrics(["a"]))
    s.metrics()  # fill the schema cache
    clone = pickle.loads(pickle.dumps(s))
    assert clone.uri == s.uri and clone.runs().equals(s.runs())


# ---------------------------------------------------------------------- stale tmp age
def test_stale_tmp_age_threshold(tmp_path):
    s = open_store(str(tmp_path / "store"), write=True)
    s.write_part("metrics", "s1", "0", make_metrics(["a"]))
    old = tmp_path / "store" / "metrics" / "sweep=s1" / ".tmp-0-old.parquet"
    new = tmp_path / "store" / "metrics" / "sweep=s1" / ".tmp-0-new.parquet"
    old.write_bytes(b"x")
    new.write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    report = s.check()  # default: older than 60 minutes
    assert [t.relpath for t in report.stray_tmp] == ["metrics/sweep=s1/.tmp-0-old.parquet"]
    assert 7100 < report.stray_tmp[0].age_s < 7400
    assert [t.relpath for t in s.check(stale_tmp_minutes=180).stray_tmp] == []


# ---------------------------------------------------------------------- import hygiene
def test_store_imports_neither_ray_nor_torch():
    code = (
        "import sys, raydyn.store; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'torch')]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_store_imports_nothing_else_from_raydyn():
    """The store stands alone; the one exception is Store.model/Store.data, which import
    raydyn.tasks.build lazily (inside the method) to rebuild a run's model."""
    for path in sorted((REPO / "raydyn" / "store").glob("*.py")):
        tree = ast.parse(path.read_text())
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("model", "data"):
                allowed |= {id(n) for n in ast.walk(node) if isinstance(n, ast.ImportFrom)
                            and n.module == "raydyn.tasks.build"}
        for node in ast.walk(tree):
            if id(node) in allowed:
                continue
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] == "raydyn":
                    assert name == "raydyn.errors" or name.startswith("raydyn.store"), (path.name, name)
                assert name.split(".")[0] not in ("ray", "torch"), (path.name, name)
