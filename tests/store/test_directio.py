"""Big snapshot tables are written around the page cache (O_DIRECT) where the filesystem allows it.

What matters: the file is byte for byte the one a buffered write gives, whatever the sizes of the
writer's pieces; a filesystem that refuses the direct writes gets the buffered write instead; a real
write error still becomes a StoreError naming the file and leaves no temp file behind.
"""
from __future__ import annotations

import errno
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydyn.errors import StoreError
from raydyn.store import directio, open_store
from raydyn.store import store as store_mod


def _direct_ok(d) -> bool:
    f = directio.open_direct(str(d / "probe"))
    if f is None:
        return False
    f.close()
    os.remove(d / "probe")
    return True


@pytest.fixture
def direct_dir(tmp_path):
    if not _direct_ok(tmp_path):  # a platform without O_DIRECT (macOS, Windows) or a filesystem refusing it
        pytest.skip("no O_DIRECT on this platform or filesystem; stores there write through the page cache")
    return tmp_path


def _snapshots(rows: int = 500, dim: int = 8970, seed: int = 0) -> pa.Table:
    vals = np.random.default_rng(seed).standard_normal(rows * dim).astype(np.float32)
    offsets = pa.array(np.arange(0, rows * dim + 1, dim, dtype=np.int32))
    return pa.table({"run_id": pa.array([f"run-{i % 7}" for i in range(rows)]),
                     "step": pa.array(np.arange(rows), pa.int64()),
                     "weights": pa.ListArray.from_arrays(offsets, pa.array(vals))})


@pytest.mark.parametrize("sizes", [[1], [4095, 1, 4096], [directio._CHUNK], [directio._CHUNK - 3, 7, 10_000],
                                   [3 * directio._CHUNK + 5]])
def test_direct_file_holds_exactly_the_bytes_written(direct_dir, sizes):
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    f = directio.open_direct(str(direct_dir / "out.bin"))
    for p in pieces:
        assert f.write(p) == len(p)
    assert f.tell() == sum(sizes)
    f.close()
    assert (direct_dir / "out.bin").read_bytes() == b"".join(pieces)


def test_snapshot_table_goes_direct_and_matches_a_buffered_write(direct_dir, monkeypatch):
    table = _snapshots()
    assert table.nbytes >= directio.MIN_BYTES
    opened = []
    real_open = directio.open_direct
    monkeypatch.setattr(directio, "open_direct", lambda p: opened.append(p) or real_open(p))
    open_store(str(direct_dir / "a"))._atomic_write_parquet("w/part-x.parquet", table)
    assert len(opened) == 1  # the direct path was taken
    monkeypatch.setenv(directio.ENV, "0")
    open_store(str(direct_dir / "b"))._atomic_write_parquet("w/part-x.parquet", table)
    a = (direct_dir / "a" / "w" / "part-x.parquet").read_bytes()
    assert a == (direct_dir / "b" / "w" / "part-x.parquet").read_bytes()
    assert pq.read_table(direct_dir / "a" / "w" / "part-x.parquet").equals(table)
    assert sorted(os.listdir(direct_dir / "a" / "w")) == ["part-x.parquet"]  # no temp file left


def test_small_and_non_snapshot_tables_are_written_as_usual(direct_dir, monkeypatch):
    calls = []
    monkeypatch.setattr(directio, "open_direct", lambda p: calls.append(p))
    st = open_store(str(direct_dir / "s"))
    st._atomic_write_parquet("w/part-small.parquet", _snapshots(rows=20))
    st._atomic_write_parquet("w/part-metrics.parquet", pa.table({"step": np.arange(3_000_000)}))
    assert calls == []


def test_a_filesystem_refusing_the_direct_writes_gets_a_buffered_write(direct_dir, monkeypatch):
    table = _snapshots(seed=1)
    refused = []

    def einval(fd, data):
        refused.append(len(data))
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(directio.os, "write", einval)
    open_store(str(direct_dir / "s"))._atomic_write_parquet("w/part-x.parquet", table)
    assert refused  # the direct write was tried, and refused
    assert pq.read_table(direct_dir / "s" / "w" / "part-x.parquet").equals(table)
    assert sorted(os.listdir(direct_dir / "s" / "w")) == ["part-x.parquet"]


def test_a_full_disk_is_a_store_error_and_leaves_nothing(direct_dir, monkeypatch):
    st = open_store(str(direct_dir / "s"))
    st._atomic_write_parquet("w/part-old.parquet", _snapshots(rows=20))

    def enospc(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(directio.os, "write", enospc)
    with pytest.raises(StoreError, match=r"part-x\.parquet.*No space left"):
        st._atomic_write_parquet("w/part-x.parquet", _snapshots(seed=2))
    assert sorted(os.listdir(direct_dir / "s" / "w")) == ["part-old.parquet"]  # the earlier part is intact


def test_direct_io_can_be_turned_off(tmp_path, monkeypatch):
    monkeypatch.setenv(directio.ENV, "0")
    assert directio.open_direct(str(tmp_path / "x")) is None
    assert not (tmp_path / "x").exists()


def test_parquet_writes_encode_in_jemalloc_where_arrow_has_it(tmp_path, monkeypatch):
    try:
        expected = pa.jemalloc_memory_pool().backend_name
    except NotImplementedError:
        expected = None  # a build without jemalloc: the default pool
    pools = []
    real = pq.write_table
    monkeypatch.setattr(store_mod.pq, "write_table",
                        lambda *a, **k: pools.append(k.get("memory_pool")) or real(*a, **k))
    st = open_store(str(tmp_path / "s"))
    st._atomic_write_parquet("w/part-x.parquet", _snapshots(rows=20))
    st._atomic_write_parquet("w/part-y.parquet", pa.table({"step": np.arange(10)}))
    assert [getattr(p, "backend_name", None) for p in pools] == [expected, expected]
