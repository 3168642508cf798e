"""The result store: Parquet files on any pyarrow filesystem, read with push-down, queried with SQL."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import uuid
import warnings
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TYPE_CHECKING, Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raydyn.errors import StoreError
from raydyn.store import directio, layout
from raydyn.store.layout import PartPath, validate_name
from raydyn.store.schema import (
    CORE_TABLES,
    FINISHED_STATUSES,
    READ_ATTEMPTS,
    SCHEMA_VERSION,
    SWEEP_LIBRARIES,
    empty_table,
    file_metadata,
    library_versions,
    metrics_schema_check,
    runs_schema_check,
    weights_schema_check,
)

if TYPE_CHECKING:  # pragma: no cover
    from raydyn.store.check import CheckReport

__all__ = ["Store", "StoreWarning", "open_store", "DEFAULT_STORE", "STORE_ENV"]

#: Environment variable naming the default store.
STORE_ENV = "RAYDYN_STORE"
#: Store used when neither an argument nor $RAYDYN_STORE names one.
DEFAULT_STORE = "./raydyn-results"

#: Target bytes per Parquet row group (rows are sized from the table's average row).
_ROW_GROUP_BYTES = 64 * 1024 * 1024
_MAX_ROW_GROUP_ROWS = 1_000_000
#: The same for tables with float list columns (weight snapshots): Parquet builds the list's repetition and
#: definition levels (4 bytes per value) for a whole row group at once; 16 MB groups keep those buffers small
#: (a trial's 230 MB of snapshots wrote in ~0.45 s of CPU against ~0.65 s with 64 MB groups, in a fresh process)
_FLOAT_LIST_ROW_GROUP_BYTES = 16 * 1024 * 1024
#: Footers are read in parallel; this bounds the threads (helps object stores most).
_FOOTER_THREADS = 16

_WRITE_POOL: list[pa.MemoryPool | None] = []


def _write_pool() -> pa.MemoryPool | None:
    """The memory pool Parquet writes encode in: Arrow's jemalloc pool where the build has it, else the default.

    Encoding a table of weight snapshots allocates and frees the pages and level buffers of every row group
    (~150 MB of short-lived buffers for a trial's 230 MB of snapshots). Arrow's default pool (mimalloc) gets
    them as transparent huge pages, each first touched by zeroing 2 MB in the kernel; on a VM whose host
    takes back freed memory, that zeroing is what the write spent its time on (85% of 1.0-3.5 s in a trial
    process) against 0.6-0.9 s with jemalloc's 4 KB pages. In a fresh process both wrote in 0.5-0.7 s.
    """
    if not _WRITE_POOL:
        try:
            _WRITE_POOL.append(pa.jemalloc_memory_pool())
        except NotImplementedError:  # (ArrowNotImplementedError is one) a build without jemalloc
            _WRITE_POOL.append(None)
    return _WRITE_POOL[0]


_ERRORS = (OSError, pa.ArrowException)
#: What reading a damaged file can raise (a garbled footer can also give undecodable names).
_READ_ERRORS = (OSError, pa.ArrowException, ValueError)
#: Part schemas remembered per Store (keyed by path, size, mtime); cleared when full.
_SCHEMA_CACHE_SIZE = 50_000


class StoreWarning(UserWarning):
    """Something in the store was skipped (e.g. an unreadable file); the message names it."""


def _fs_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """Resolve a non-local URI to (filesystem, path). The single hook for s3://, gs://, hdfs://...

    Tests replace this function to route a ``mock://`` URI to pyarrow's in-memory
    mock filesystem, so that the mock runs exactly the code path of a remote store.
    """
    return pafs.FileSystem.from_uri(uri)


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def open_store(
    uri: str | os.PathLike[str] | None = None,
    *,
    write: bool = False,
    filesystem: pafs.FileSystem | None = None,
) -> Store:
    """Open the store at ``uri``.

    Parameters
    ----------
    uri:
        A local path, a ``file://`` URI, or any URI pyarrow understands
        (``s3://bucket/prefix``, ``gs://bucket/prefix``, ...). None means
        ``$RAYDYN_STORE`` or, if unset, ``./raydyn-results``. With
        ``filesystem`` given, ``uri`` is the root path inside that filesystem.
    write:
        Prepare for writing now: create the root and prove it writable
        (:meth:`Store.ensure_writable`), raising :class:`StoreError` naming the
        path and the OS reason before anything else happens. A store opened
        without ``write`` makes the same check on its first write.
    filesystem:
        An explicit pyarrow filesystem (e.g. an fsspec one wrapped in
        ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``).
    """
    if uri is None:
        uri = os.environ.get(STORE_ENV) or DEFAULT_STORE
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise StoreError(f"store location must be a non-empty path or URI, got {uri!r}")
    if filesystem is not None:
        store = Store(filesystem, uri, uri=f"{filesystem.type_name}://{uri.lstrip('/')}")
    elif "://" not in uri or _WINDOWS_DRIVE.match(uri):
        path = os.path.abspath(os.path.expanduser(uri))
        store = Store(pafs.LocalFileSystem(), path.replace(os.sep, "/"), uri=Path(path).as_uri())
    elif uri.startswith("file://"):
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except _ERRORS as e:
            raise StoreError(f"cannot open store {uri!r}: {e}") from None
        store = Store(fs, path, uri=uri)
    else:
        try:
            fs, path = _fs_from_uri(uri)
        except _ERRORS as e:
            raise StoreError(f"cannot open store {uri!r}: {e}") from None
        store = Store(fs, path, uri=uri.rstrip("/"))
    if write:
        store.ensure_writable()
    return store


class Store:
    """raydyn's result store: a directory of hive-partitioned Parquet files.

    Open one with :func:`open_store`. Every backend (local path, ``file://``,
    any pyarrow filesystem such as S3 or GCS) meets this contract; the
    conformance suite in ``tests/store/`` runs it against each.

    Layout (``/`` separated, relative to the root; see :mod:`raydyn.store.layout`)::

        <table>/sweep=<sweep>/part-<part>.parquet   any table: runs, metrics, weights, koopman_spectra, ...
        sweeps/<sweep>/sweep.yaml                   the exact sweep-file text
        sweeps/<sweep>/sweep.json                   sha256, created_utc, versions, caller metadata
        _quarantine/<UTC timestamp>/<relpath>       files moved aside by check(repair=True)

    Names: table, sweep and part names are 1-200 characters of letters, digits,
    ``-``, ``_``, ``.``, starting with a letter or digit; ``sweeps`` is not a
    table name. Anything else raises :class:`StoreError` naming the value.

    Files: every data file carries the schema metadata
    ``{"raydyn.schema_version": "1", "raydyn.table": <table>}``, zstd
    compression and page checksums. The ``sweep`` column is never stored in a
    file; it comes from the partition directory. The column contract of
    runs/metrics/weights is in :mod:`raydyn.store.schema`. Nothing is pickled:
    data is Parquet, metadata is JSON.

    Atomicity: a part is written to ``.tmp-<part>-<uuid>.parquet`` in its final
    directory and then renamed over ``part-<part>.parquet`` (``os.replace``
    semantics on local disks; a single object PUT on object stores). A reader
    opens each part once and reads its footer and data through that handle, so
    it sees the old part or the new one, never a half-written file (a part
    replaced between listing and reading makes the read start over), and
    re-writing a part replaces it rather than adding rows. Writers of different
    parts or sweeps never touch each other's files. Two writers of the SAME part
    race: the last rename wins (still a whole file). Renames are not fsync'ed;
    atomic visibility, not power-loss durability, is promised.

    Commit order: :meth:`write_runs` writes metrics, weights and extra tables
    first and the ``runs`` part last. The runs table is authoritative: a run
    exists when its runs row exists (:meth:`completed_run_ids` drives resume).
    A crash between the two leaves trajectories without a run, which readers of
    ``runs`` never see and :meth:`check` reports as orphan trajectories.

    Reading: :meth:`table` reads only ``part-*.parquet`` files (tmp files, the
    quarantine and foreign files are invisible), pushes column selection and
    filters down to Parquet (row groups and sweep partitions are pruned), and
    remembers each part's schema per (path, size, mtime) for the life of the
    Store object, unifies schemas across parts and sweeps (int64 + float64 -> float64,
    null -> typed, string -> large_string; a column missing from some files is
    null there; incompatible types raise StoreError naming the column and
    files). The ``sweep`` column is a string column at the end. An unreadable
    file (corrupt, truncated, permission denied) is skipped with a
    :class:`StoreWarning` naming its path; the healthy data is still returned.

    Missing data is not an error: a table with no files (in the requested
    sweeps) reads as an empty table. Its columns are the requested ``columns``
    (or, if none were requested, the table's contract columns for
    runs/metrics/weights plus ``sweep``), typed by the contract where known and
    ``null`` otherwise; a filter on it is not evaluated. When the table has
    data, asking for a column it does not have raises :class:`StoreError`
    naming the column and the available ones, and so does a filter on a
    missing field.

    SQL: :meth:`sql` runs one SELECT statement in a fresh in-memory DuckDB
    connection where every store table mentioned in the query is a view over
    its pyarrow dataset (filters and projections are pushed down, any
    filesystem works). External access is disabled and the configuration
    locked before the query runs, so file reads/writes, ATTACH, INSTALL/LOAD
    fail; any non-SELECT statement is refused with ``StoreError("raydyn query
    is read-only ...")`` before it runs.

    Integrity: :meth:`check` reports unreadable files, orphan runs/trajectories,
    duplicate run ids and stale tmp files; ``check(repair=True)`` moves files
    into the quarantine and never deletes anything (see
    :class:`raydyn.store.check.CheckReport`).

    Args:
        filesystem: the pyarrow filesystem holding the store.
        root: the root directory inside ``filesystem``.
        uri: how to name the store to humans (defaults to ``root``).
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str, *, uri: str | None = None) -> None:
        if not isinstance(filesystem, pafs.FileSystem):
            raise TypeError(f"filesystem must be a pyarrow.fs.FileSystem, got {type(filesystem).__name__}")
        root = root if root == "/" else root.rstrip("/")
        self._fs = filesystem
        self._root = root
        self._uri = uri if uri is not None else root
        self._local = isinstance(filesystem, pafs.LocalFileSystem)
        self._writable_checked = False
        self._schema_cache: dict[tuple[str, tuple[int, int]], pa.Schema] = {}

    # ------------------------------------------------------------------ basics
    @property
    def uri(self) -> str:
        """The store's URI (``file:///abs/path`` for local stores)."""
        return self._uri

    @property
    def root(self) -> str:
        """The root directory inside :attr:`filesystem`."""
        return self._root

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self._fs

    def __repr__(self) -> str:
        return f"Store({self._uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for shipping to Ray workers; the writability proof is per process.
        state = self.__dict__.copy()
        state["_writable_checked"] = False
        state["_schema_cache"] = {}
        return state

    def path(self, relpath: str) -> str:
        """The filesystem path of ``relpath`` (``/``-separated, relative to the root)."""
        return layout.join(self._root, relpath)

    def local_path(self) -> str | None:
        """The root as an OS path for stores on the local filesystem, else None."""
        return self.location() if self._local else None

    def location(self, relpath: str = "") -> str:
        """A human-readable name of ``relpath`` for messages: an OS path for local stores, else a URI."""
        if self._local:
            p = self.path(relpath) if relpath else self._root
            return p.replace("/", os.sep) if os.sep != "/" else p
        base = self._uri.split("?", 1)[0]  # drop URI options such as ?region=
        return f"{base}/{relpath}" if relpath else base

    def _relpath(self, path: str) -> str:
        prefix = self._root.rstrip("/") + "/" if self._root else ""
        if prefix and not path.startswith(prefix):
            raise StoreError(f"path {path!r} is outside the store root {self._root!r}")  # pragma: no cover
        return path[len(prefix) :]

    def exists(self) -> bool:
        """Whether the store's root directory exists."""
        try:
            return self._fs.get_file_info(self._root).type == pafs.FileType.Directory
        except _ERRORS:
            return False

    def ensure_writable(self) -> None:
        """Create the root if needed and prove it writable by writing and removing a probe file.

        Raises :class:`StoreError` naming the path and the OS reason.
        """
        loc = self.location()
        try:
            self._fs.create_dir(self._root, recursive=True)
        except _ERRORS as e:
            raise StoreError(f"cannot create store directory {loc}: {e}") from None
        try:
            info = self._fs.get_file_info(self._root)
        except _ERRORS as e:
            raise StoreError(f"cannot inspect store directory {loc}: {e}") from None
        if info.type != pafs.FileType.Directory:
            raise StoreError(f"store location {loc} exists but is not a directory")
        probe = self.path(f"{layout.TMP_PREFIX}probe-{uuid.uuid4().hex}")
        try:
            with self._fs.open_output_stream(probe) as f:
                f.write(b"raydyn write probe\n")
            self._fs.delete_file(probe)
        except _ERRORS as e:
            raise StoreError(f"store directory {loc} is not writable: {e}") from None
        self._writable_checked = True

    def _before_write(self) -> None:
        if not self._writable_checked:
            self.ensure_writable()

    # ------------------------------------------------------------------ writing
    def write_part(self, table: str, sweep: str, part: str, data: pa.Table) -> str:
        """Atomically write (or replace) ``<table>/sweep=<sweep>/part-<part>.parquet``.

        ``data`` may carry a ``sweep`` column only if every value equals ``sweep``;
        it is dropped (the partition directory holds it). Returns the relative path.
        """
        validate_name("table", table)
        validate_name("sweep", sweep)
        validate_name("part", part)
        data = self._prepare(table, sweep, data)
        self._before_write()
        relpath = layout.part_relpath(table, sweep, part)
        self._atomic_write_parquet(relpath, data)
        return relpath

    def _prepare(self, table: str, sweep: str, data: pa.Table) -> pa.Table:
        if isinstance(data, pa.RecordBatch):
            data = pa.Table.from_batches([data])
        if not isinstance(data, pa.Table):
            raise TypeError(f"data for table {table!r} must be a pyarrow.Table, got {type(data).__name__}")
        if "sweep" in data.column_names:
            col = data.column("sweep")
            try:
                values = pc.cast(col, pa.string())  # also decodes pandas categoricals
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                raise StoreError(f"table {table!r}: column 'sweep' has type {col.type}, expected string") from None
            distinct = set(pc.unique(values).to_pylist())
            if distinct - {sweep}:
                bad = sorted(map(str, distinct - {sweep}))[:5]
                raise StoreError(
                    f"table {table!r}: column 'sweep' holds {bad} but the rows are being written "
                    f"to sweep {sweep!r}; drop the column or fix its values"
                )
            data = data.drop_columns(["sweep"])
        meta = dict(data.schema.metadata or {})
        meta.pop(b"pandas", None)  # index bookkeeping of one part means nothing for the whole table
        meta.update(file_metadata(table))
        return data.replace_schema_metadata(meta)

    def _atomic_write(self, relpath: str, tmp_name: str, write: Callable[[str], None]) -> None:
        """Write through ``write(tmp_path)`` into a temp file beside ``relpath``, then rename over it.

        On any failure the temp file is removed; filesystem errors become StoreError naming the file.
        """
        directory = relpath.rsplit("/", 1)[0]
        tmp = self.path(f"{directory}/{tmp_name}")
        try:
            self._fs.create_dir(self.path(directory), recursive=True)
            write(tmp)
            self._fs.move(tmp, self.path(relpath))
        except BaseException as e:
            try:
                self._fs.delete_file(tmp)
            except _ERRORS:
                pass
            if isinstance(e, _ERRORS):
                raise StoreError(f"cannot write store file {self.location(relpath)}: {e}") from None
            raise

    def _atomic_write_parquet(self, relpath: str, data: pa.Table) -> None:
        fname = relpath.rsplit("/", 1)[1]
        stem = fname[len(layout.PART_PREFIX) : -len(layout.PARQUET_SUFFIX)]
        row_bytes = data.nbytes / max(data.num_rows, 1)
        # float vectors (weight snapshots) dominate write time and compress little: no compression (measured on
        # a trained population's 230 MB of snapshots: snappy saved nothing for +0.1 s, lz4 3%, zstd 22% at twice
        # the time, byte_stream_split + zstd(1) 35% at 1.4x) and no dictionary attempt for them, zstd for
        # everything else. Per-column options name a nested column by its Parquet leaf path
        # (``weights.list.element``): a top-level name matches nothing
        floats = [f.name for f in data.schema if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))
                  and pa.types.is_floating(f.type.value_type)]
        group_bytes = _FLOAT_LIST_ROW_GROUP_BYTES if floats else _ROW_GROUP_BYTES
        rows_per_group = int(max(1, min(_MAX_ROW_GROUP_ROWS, group_bytes // max(row_bytes, 1))))
        compression = ({**{f.name: "zstd" for f in data.schema if f.name not in floats},
                        **{f"{name}.list.element": "none" for name in floats}} if floats else "zstd")
        dictionary = [f.name for f in data.schema if f.name not in floats] if floats else True

        # nor min/max statistics for them: no reader filters on a weight value, and they cost ~10% of the write
        statistics = [f.name for f in data.schema if f.name not in floats] if floats else True

        options = dict(compression=compression, use_dictionary=dictionary, write_statistics=statistics,
                       row_group_size=rows_per_group, write_page_checksum=True, memory_pool=_write_pool())

        def write(tmp: str) -> None:
            # big snapshot tables on a local disk go around the page cache (see raydyn.store.directio)
            sink = directio.open_direct(tmp) if floats and self._local and data.nbytes >= directio.MIN_BYTES else None
            if sink is not None:
                try:
                    pq.write_table(data, sink, **options)
                    sink.close()
                    return
                except OSError as e:
                    sink.abort()
                    if e.errno != errno.EINVAL:  # EINVAL: the filesystem took O_DIRECT but not these writes
                        raise
            pq.write_table(data, tmp, filesystem=self._fs, **options)

        self._atomic_write(relpath, f"{layout.TMP_PREFIX}{stem}-{uuid.uuid4().hex}{layout.PARQUET_SUFFIX}", write)

    def _atomic_write_bytes(self, relpath: str, payload: bytes) -> None:
        fname = relpath.rsplit("/", 1)[1]

        def write(tmp: str) -> None:
            with self._fs.open_output_stream(tmp) as f:
                f.write(payload)

        self._atomic_write(relpath, f"{layout.TMP_PREFIX}{fname}-{uuid.uuid4().hex}", write)

    def write_runs(
        self,
        sweep: str,
        part: str,
        *,
        runs: pa.Table,
        metrics: pa.Table | None = None,
        weights: pa.Table | None = None,
        extra: dict[str, pa.Table] | None = None,
    ) -> None:
        """Write one part of a sweep's results, runs LAST (the commit marker).

        All tables are checked before anything is written: runs/metrics/weights
        against the column contract (:mod:`raydyn.store.schema`), and every
        ``run_id`` in metrics/weights/extra tables that have one must be a run
        of this part. Then metrics, weights and ``extra`` (table name -> table)
        are written under the same part name, and finally ``runs``.
        """
        validate_name("sweep", sweep)
        validate_name("part", part)
        runs = self._prepare("runs", sweep, runs)
        runs_schema_check(runs)
        others: dict[str, pa.Table] = {}
        if metrics is not None:
            others["metrics"] = self._prepare("metrics", sweep, metrics)
            metrics_schema_check(others["metrics"])
        if weights is not None:
            others["weights"] = self._prepare("weights", sweep, weights)
            weights_schema_check(others["weights"])
        for name, t in (extra or {}).items():
            validate_name("table", name)
            if name in CORE_TABLES:
                raise StoreError(f"extra table {name!r} is a core table; pass it as the {name}= argument")
            others[name] = self._prepare(name, sweep, t)
        known = set(runs.column("run_id").to_pylist())
        for name, t in others.items():
            if "run_id" in t.column_names:
                unknown = sorted({str(v) for v in pc.unique(t.column("run_id")).to_pylist()} - known)
                if unknown:
                    raise StoreError(
                        f"table {name!r} has rows for run_id(s) {unknown[:5]} that are not in the runs "
                        f"table of sweep {sweep!r} part {part!r}"
                    )
        self._before_write()
        for name, t in others.items():
            self._atomic_write_parquet(layout.part_relpath(name, sweep, part), t)
        self._atomic_write_parquet(layout.part_relpath("runs", sweep, part), runs)

    def put_sweep(self, sweep: str, text: str, meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
        """Record a sweep's file text and metadata (both written atomically, JSON only).

        ``sweeps/<sweep>/sweep.json`` gets ``sweep``, ``sha256`` (of the UTF-8
        text), ``created_utc`` (ISO 8601; kept from the existing record when the
        text is unchanged, so resuming keeps the creation time),
        ``schema_version``, ``versions`` (python and installed library versions)
        and then every key of ``meta`` (which wins on conflict). Re-putting a
        different text for an existing sweep raises StoreError unless
        ``overwrite``. Returns the record written.
        """
        validate_name("sweep", sweep)
        if not isinstance(text, str):
            raise TypeError(f"sweep text must be str, got {type(text).__name__}")
        meta = dict(meta or {})
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        existing = self.sweep_meta(sweep)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if existing is not None:
            if existing.get("sha256") == digest:
                created = existing.get("created_utc", created)
            elif not overwrite:
                raise StoreError(
                    f"sweep {sweep!r} already exists in {self.location()} with a different sweep file "
                    f"(sha256 {str(existing.get('sha256'))[:12]}... vs {digest[:12]}...); "
                    "choose another sweep name or pass overwrite=True"
                )
        record: dict[str, Any] = {
            "sweep": sweep,
            "sha256": digest,
            "created_utc": created,
            "schema_version": SCHEMA_VERSION,
            "versions": library_versions(SWEEP_LIBRARIES, python=True, missing=None),
        }
        for key in ("sweep", "sha256"):
            if key in meta and meta[key] != record[key]:
                raise StoreError(f"sweep {sweep!r} metadata key {key!r} is computed by the store; got {meta[key]!r}")
        record.update(meta)
        try:
            payload = json.dumps(record, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise StoreError(f"sweep {sweep!r} metadata is not JSON-serialisable: {e}") from None
        self._before_write()
        self._atomic_write_bytes(f"{layout.SWEEPS_DIR}/{sweep}/{layout.SWEEP_YAML}", text.encode("utf-8"))
        self._atomic_write_bytes(f"{layout.SWEEPS_DIR}/{sweep}/{layout.SWEEP_JSON}", payload)
        return record

    # ------------------------------------------------------------------ listing
    def _list_files(self, reldir: str, recursive: bool) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.path(reldir) if reldir else self._root, recursive=recursive, allow_not_found=True)
        try:
            return self._fs.get_file_info(sel)
        except _ERRORS as e:
            raise StoreError(f"cannot list {self.location(reldir)}: {e}") from None

    def _listing(self, table: str, sweeps: list[str] | None) -> dict[PartPath, tuple[int, int]]:
        """The table's part files (in the given sweeps) -> (size, mtime_ns) as listed."""
        if sweeps is None:
            infos = self._list_files(table, recursive=True)
        else:
            infos = [i for s in sweeps for i in self._list_files(layout.sweep_dir_relpath(table, s), False)]
        found = {}
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            pp = layout.parse_relpath(self._relpath(info.path))
            if pp is not None and pp.table == table:
                found[pp] = (info.size, info.mtime_ns)
        return dict(sorted(found.items(), key=lambda kv: kv[0].relpath))

    def _list_parts(self, table: str, sweeps: list[str] | None) -> list[PartPath]:
        return list(self._listing(table, sweeps))

    def parts(self, table: str, sweep: str, prefix: str = "") -> list[str]:
        """Names of ``table``'s part files in ``sweep`` (``part-<name>.parquet``) that start with ``prefix``, sorted."""
        validate_name("table", table)
        validate_name("sweep", sweep)
        return sorted(p.part for p in self._listing(table, [sweep]) if p.part.startswith(prefix))

    def delete_part(self, table: str, sweep: str, part: str) -> bool:
        """Remove one part file (a writer's own uncommitted part, e.g. the snapshots of a flush that crashed
        before its commit marker). Returns whether it existed."""
        for kind, value in (("table", table), ("sweep", sweep), ("part", part)):
            validate_name(kind, value)
        relpath = layout.part_relpath(table, sweep, part)
        if self._stamp(relpath) is None:
            return False
        self._before_write()
        try:
            self._fs.delete_file(self.path(relpath))
        except _ERRORS as e:
            raise StoreError(f"cannot delete store file {self.location(relpath)}: {e}") from None
        return True

    def delete_sweep(self, sweep: str) -> dict[str, int]:
        """Delete a sweep: its parts in every table (runs first, the commit markers, so an interrupted delete
        leaves orphan trajectories that :meth:`check` reports, never runs without them), each table's
        ``sweep=<sweep>`` directory with anything left in it (in-flight tmp files), and last its
        ``sweeps/<sweep>/`` record, so a delete cut short can be run again. Tracked sweeps too. Returns the
        parts deleted per table. Raises StoreError, listing the sweeps, for a name the store does not have."""
        validate_name("sweep", sweep)
        known = self.sweeps()
        if sweep not in known:
            raise StoreError(f"no sweep named {sweep!r} in store {self.location()}"
                             + (f"; sweeps there: {', '.join(known)}" if known else " (the store has no sweeps)"))
        self._before_write()
        tables = self._table_dirs()
        deleted: dict[str, int] = {}
        for table in sorted(tables, key=lambda t: t != "runs"):
            parts = self.parts(table, sweep)
            for part in parts:
                self.delete_part(table, sweep, part)
            if parts:
                deleted[table] = len(parts)
            self._delete_dir(layout.sweep_dir_relpath(table, sweep))
        self._delete_dir(f"{layout.SWEEPS_DIR}/{sweep}")
        return deleted

    def _delete_dir(self, reldir: str) -> None:
        """Remove a directory (prefix) and everything under it; nothing when it is not there."""
        try:
            if self._fs.get_file_info(self.path(reldir)).type != pafs.FileType.Directory:
                return
            self._fs.delete_dir(self.path(reldir))
        except FileNotFoundError:
            return
        except _ERRORS as e:
            raise StoreError(f"cannot delete store directory {self.location(reldir)}: {e}") from None

    def _stamp(self, relpath: str) -> tuple[int, int] | None:
        """(size, mtime_ns) of a file now, None if it is gone."""
        try:
            info = self._fs.get_file_info(self.path(relpath))
        except _ERRORS:
            return None
        if info.type != pafs.FileType.File:
            return None
        return (info.size, info.mtime_ns)

    def _table_dirs(self) -> list[str]:
        names = []
        for info in self._list_files("", recursive=False):
            name = info.base_name
            if info.type == pafs.FileType.Directory and name not in layout.RESERVED_TABLES:
                if layout._NAME_RE.fullmatch(name):
                    names.append(name)
        return sorted(names)

    def tables(self) -> list[str]:
        """Names of tables that have at least one part file, sorted."""
        return [t for t in self._table_dirs() if self._list_parts(t, None)]

    def sweeps(self) -> list[str]:
        """Names of sweeps that have data in any table or a ``sweeps/<sweep>/`` record, sorted."""
        found = {p.sweep for t in self._table_dirs() for p in self._list_parts(t, None)}
        for info in self._list_files(layout.SWEEPS_DIR, recursive=False):
            if info.type == pafs.FileType.Directory and layout._NAME_RE.fullmatch(info.base_name):
                found.add(info.base_name)
        return sorted(found)

    # ------------------------------------------------------------------ reading
    def _part_schemas(
        self, listing: dict[PartPath, tuple[int, int]]
    ) -> list[tuple[PartPath, pa.Schema | None, BaseException | None]]:
        """Each listed part's Arrow schema (from its footer), or the error reading it.

        Footers are read in parallel (object stores pay a round trip each) and
        remembered per (path, size, mtime) for the life of this Store object, so
        repeated queries only list the directory.
        """
        fmt = _parquet_format()

        def one(item: tuple[PartPath, tuple[int, int]]):
            pp, stamp = item
            key = (pp.relpath, stamp)
            cached = self._schema_cache.get(key)
            if cached is not None:
                return pp, cached, None
            try:
                frag = fmt.make_fragment(self.path(pp.relpath), filesystem=self._fs)
                schema = frag.physical_schema
                schema.names  # noqa: B018 -- a garbled footer can hold undecodable names
            except _READ_ERRORS as e:
                return pp, None, e
            if len(self._schema_cache) >= _SCHEMA_CACHE_SIZE:
                self._schema_cache.clear()
            self._schema_cache[key] = schema
            return pp, schema, None

        items = list(listing.items())
        if sum(1 for pp, st in items if (pp.relpath, st) not in self._schema_cache) <= 2:
            return [one(it) for it in items]
        with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, len(items))) as pool:
            return list(pool.map(one, items))

    def _skip(self, relpath: str, err: BaseException) -> None:
        warnings.warn(StoreWarning(f"skipping unreadable store file {self.location(relpath)}: {err}"), stacklevel=4)

    def _scan(self, table: str, sweeps: list[str] | None) -> _Scan | None:
        """The table's dataset over its readable parts, with the unified schema (None if no parts).

        The dataset's fragments are plain paths: a scan opens each file once and
        reads its footer and data through that one handle, so a part replaced
        by a concurrent writer is read whole, old or new. A part that vanished
        since the listing (a rewrite's rename, a repair) is ignored; a part whose
        footer cannot be read is skipped with a StoreWarning.
        """
        listing = self._listing(table, sweeps)
        good = []
        for pp, schema, err in self._part_schemas(listing):
            if err is None:
                good.append((pp, schema))
            elif self._stamp(pp.relpath) is not None:
                self._skip(pp.relpath, err)
        if not good:
            return None
        unified = self._unify(table, good)
        fmt = _parquet_format()
        frags = [
            fmt.make_fragment(self.path(pp.relpath), filesystem=self._fs, partition_expression=pc.field("sweep") == pp.sweep)
            for pp, _ in good
        ]
        dataset = ds.FileSystemDataset(frags, unified, fmt, self._fs)
        return _Scan(dataset, list(zip([pp for pp, _ in good], frags)), listing)

    def _dataset(self, table: str, sweeps: list[str] | None) -> ds.FileSystemDataset | None:
        scan = self._scan(table, sweeps)
        return None if scan is None else scan.dataset

    def _unify(self, table: str, schemas: list[tuple[PartPath, pa.Schema]]) -> pa.Schema:
        plain = []
        for _, s in schemas:
            s = s.remove_metadata()
            if "sweep" in s.names:
                s = s.remove(s.get_field_index("sweep"))
            plain.append(s)
        try:
            unified = pa.unify_schemas(plain, promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
            by_col: dict[str, dict[str, str]] = {}
            for (pp, _), s in zip(schemas, plain):
                for f in s:
                    by_col.setdefault(f.name, {}).setdefault(str(f.type), pp.relpath)
            clashes = {c: t for c, t in by_col.items() if len(t) > 1 and c in str(e)}
            detail = "; ".join(
                f"column {c!r}: " + ", ".join(f"{ty} in {self.location(p)}" for ty, p in t.items())
                for c, t in clashes.items()
            )
            raise StoreError(f"table {table!r} has incompatible column types across files: {detail or e}") from None
        unified = unified.append(pa.field("sweep", pa.string()))
        return unified.with_metadata(file_metadata(table))

    def table(
        self,
        name: str,
        sweep: str | list[str] | None = None,
        columns: list[str] | None = None,
        filter: pc.Expression | None = None,
    ) -> pa.Table:
        """Read table ``name`` (all sweeps, one, or a list), with column and filter push-down.

        Args:
            name: table name (``runs``, ``metrics``, ``koopman_spectra``, ...).
            sweep: None for every sweep, a sweep name, or a list of names; only
                their partition directories are listed and read.
            columns: column names to read (``sweep`` may be one of them); None for all.
            filter: a ``pyarrow.compute`` expression, e.g.
                ``pc.field("step") >= 100``; pushed down to row groups and
                partitions (``pc.field("sweep") == "a"`` prunes directories).

        Returns:
            A ``pyarrow.Table``; see the class docstring for schema unification,
            unreadable files and missing tables.
        """
        validate_name("table", name)
        sweeps = _sweep_list(sweep)
        if columns is not None:
            if isinstance(columns, str) or not all(isinstance(c, str) for c in columns):
                raise TypeError(f"columns must be a list of column names, got {columns!r}")
            columns = list(columns)
        if filter is not None and not isinstance(filter, pc.Expression):
            raise TypeError(f"filter must be a pyarrow.compute.Expression, got {type(filter).__name__}")
        for attempt in range(READ_ATTEMPTS):
            scan = self._scan(name, sweeps)
            if scan is None:
                return empty_table(name, columns)
            if attempt == 0:
                self._validate_request(name, scan.dataset.schema, columns, filter)
            try:
                return scan.dataset.to_table(columns=columns, filter=filter)
            except _READ_ERRORS:
                pass
            # Some part failed: replaced since the listing with a version whose columns
            # no longer fit the unified schema (start over), or damaged data pages
            # (read part by part and skip the damaged ones with a warning).
            if scan.changed(self) and attempt + 1 < READ_ATTEMPTS:
                continue
            pieces = []
            for pp, frag in scan.parts:
                one = ds.FileSystemDataset([frag], scan.dataset.schema, _parquet_format(), self._fs)
                try:
                    pieces.append(one.to_table(columns=columns, filter=filter))
                except _READ_ERRORS as e:
                    if self._stamp(pp.relpath) is not None:
                        self._skip(pp.relpath, e)
            if pieces:
                return pa.concat_tables(pieces)
            empty = scan.dataset.schema.empty_table()
            return empty.select(columns) if columns is not None else empty
        raise AssertionError("unreachable")  # pragma: no cover

    def _validate_request(
        self, name: str, schema: pa.Schema, columns: list[str] | None, filter: pc.Expression | None
    ) -> None:
        if columns is not None:
            missing = [c for c in columns if c not in schema.names]
            if missing:
                raise StoreError(
                    f"table {name!r} in {self.location()} has no column(s) {missing}; "
                    f"available: {schema.names}"
                )
        if filter is not None:
            try:  # bind against an empty table of the same schema: a cheap, exact validation
                ds.dataset(schema.empty_table()).to_table(filter=filter)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
                raise StoreError(f"invalid filter {filter} for table {name!r}: {e}") from None

    def runs(self, sweep: str | list[str] | None = None, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """``table("runs", ...)``."""
        return self.table("runs", sweep, columns, filter)

    def metrics(self, sweep: str | list[str] | None = None, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """``table("metrics", ...)``."""
        return self.table("metrics", sweep, columns, filter)

    def weights(self, sweep: str | list[str] | None = None, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """``table("weights", ...)``."""
        return self.table("weights", sweep, columns, filter)

    # ------------------------------------------------------------------ models back from the store
    # The one place the store reaches into the rest of raydyn, lazily (building a model needs torch and
    # the model registry): everything is in raydyn.tasks.build, these are conveniences.
    def data(self, run_id: str, sweep: str | None = None):
        """The run's data set (:class:`raydyn.tasks.data.Dataset`), rebuilt from its config; see
        :func:`raydyn.tasks.build.stored_data`."""
        from raydyn.tasks.build import stored_data

        return stored_data(self, run_id, sweep)

    def model(self, run_id: str, step: int | None = None, sweep: str | None = None):
        """The run's ``nn.Module`` with its stored weights (and buffers: batch norm running statistics) at
        ``step`` (default: its last snapshot) loaded, in ``eval()`` mode; needs full snapshots. See
        :func:`raydyn.tasks.build.stored_model`."""
        from raydyn.tasks.build import stored_model

        return stored_model(self, run_id, step, sweep)

    def completed_run_ids(self, sweep: str) -> set[str]:
        """run_ids of ``sweep`` whose runs row has status ``completed``, ``diverged`` or ``stopped`` (early
        stopping ended it: finished, not trained again)."""
        validate_name("sweep", sweep)
        t = self.table(
            "runs", sweep, columns=["run_id", "status"], filter=pc.field("status").isin(sorted(FINISHED_STATUSES))
        )
        return {str(v) for v in t.column("run_id").to_pylist() if v is not None}

    def sweep_meta(self, sweep: str) -> dict[str, Any] | None:
        """The ``sweep.json`` record of ``sweep``, or None if there is none."""
        raw = self._read_small(f"{layout.SWEEPS_DIR}/{validate_name('sweep', sweep)}/{layout.SWEEP_JSON}")
        if raw is None:
            return None
        try:
            out = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreError(f"sweep metadata {self.location(f'{layout.SWEEPS_DIR}/{sweep}/{layout.SWEEP_JSON}')} is not valid JSON: {e}") from None
        if not isinstance(out, dict):
            raise StoreError(f"sweep metadata of {sweep!r} is not a JSON object")
        return out

    def sweep_text(self, sweep: str) -> str | None:
        """The exact sweep-file text stored for ``sweep``, or None."""
        relpath = f"{layout.SWEEPS_DIR}/{validate_name('sweep', sweep)}/{layout.SWEEP_YAML}"
        raw = self._read_small(relpath)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise StoreError(f"sweep file {self.location(relpath)} is not UTF-8: {e}") from None

    def _read_small(self, relpath: str) -> bytes | None:
        try:
            with self._fs.open_input_stream(self.path(relpath)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        except _ERRORS as e:
            if self._fs.get_file_info(self.path(relpath)).type == pafs.FileType.NotFound:
                return None
            raise StoreError(f"cannot read {self.location(relpath)}: {e}") from None

    # ------------------------------------------------------------------ SQL
    def sql(self, query: str) -> pa.Table:
        """Run one read-only SELECT over the store's tables (each a DuckDB view named after it).

        Views are created for the store tables the query text mentions (whole-word,
        case-insensitive match), so a query does not open the footers of every
        table in the store; absent core tables (runs/metrics/weights) are empty
        views with their contract columns. Table names containing ``-`` or ``.``
        must be double-quoted in SQL.
        Raises StoreError for non-SELECT statements ("raydyn query is
        read-only"), more than one statement, syntax errors and unknown
        tables, with DuckDB's message.
        """
        from raydyn.store._sql import run_readonly

        return run_readonly(self, query)

    # ------------------------------------------------------------------ integrity
    def check(self, repair: bool = False, *, stale_tmp_minutes: float = 60.0) -> CheckReport:
        """Scan every file; report (and with ``repair``, quarantine) problems.

        See :class:`raydyn.store.check.CheckReport` for what is reported and what
        repair does. Nothing is ever deleted: bad files are moved to
        ``_quarantine/<UTC timestamp>/<relpath>``.
        """
        from raydyn.store.check import check_store

        return check_store(self, repair=repair, stale_tmp_minutes=stale_tmp_minutes)


# ---------------------------------------------------------------------- helpers
@dataclass
class _Scan:
    """One read's view of a table: the dataset, its opened parts, and the listing it came from."""

    dataset: ds.FileSystemDataset
    parts: list[tuple[PartPath, Any]]
    listing: dict[PartPath, tuple[int, int]]

    def changed(self, store: Store) -> bool:
        """Whether any opened part was replaced or removed since it was listed."""
        return any(store._stamp(pp.relpath) != self.listing[pp] for pp, _ in self.parts)


def _parquet_format() -> ds.ParquetFileFormat:
    # Page checksums (written by the store) are verified on every read: a damaged
    # page is an error, and the reader skips that file with a warning.
    return ds.ParquetFileFormat(
        default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True)
    )


def _sweep_list(sweep: str | Iterable[str] | None) -> list[str] | None:
    if sweep is None:
        return None
    if isinstance(sweep, str):
        return [validate_name("sweep", sweep)]
    try:
        items = list(sweep)
    except TypeError:
        raise TypeError(f"sweep must be None, a name or a list of names, got {sweep!r}") from None
    return [validate_name("sweep", s) for s in dict.fromkeys(items)]
