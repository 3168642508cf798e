"""Read-only SQL over a store through DuckDB.

Defence in depth, in order:
1. the query is parsed first and anything but exactly one SELECT statement is
   refused before it runs ("raydyn query is read-only");
2. each store table the query mentions is registered as a view over its
   pyarrow dataset (so any pyarrow filesystem works and DuckDB pushes filters
   and projections into the Parquet scan);
3. external access is then disabled and the configuration locked, so even a
   SELECT cannot read or write files (read_csv, COPY, ATTACH, INSTALL/LOAD);
4. the connection is a fresh in-memory database, closed after the query.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import duckdb
import pyarrow as pa

from raydyn.errors import StoreError
from raydyn.store.schema import CORE_TABLES, READ_ATTEMPTS, empty_table

if TYPE_CHECKING:  # pragma: no cover
    from raydyn.store.store import Store

READ_ONLY = "raydyn query is read-only"


def _mentioned(query: str, candidates: list[str]) -> list[str]:
    """Candidates that occur in ``query`` as a whole identifier (case-insensitive).

    A superset of the tables the query reads is fine (an unused view costs one
    listing); the point is not to open the footers of every table in the store.
    """
    out = []
    for name in candidates:
        if re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", query, flags=re.IGNORECASE):
            out.append(name)
    return out


_MISSING_TABLE = re.compile(r'Table with name "?([^"\s]+?)"? does not exist')


def _missing_table(err: Exception) -> str | None:
    """The table name of DuckDB's 'Table with name X does not exist' catalog error, else None."""
    if not isinstance(err, duckdb.CatalogException):
        return None
    m = _MISSING_TABLE.search(str(err))
    return m.group(1) if m else None


def _connect() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(
        ":memory:",
        config={"autoinstall_known_extensions": False, "autoload_known_extensions": False},
    )


def check_select(query: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise StoreError unless ``query`` parses as exactly one SELECT statement (nothing is run)."""
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    own = con is None
    con = _connect() if con is None else con
    try:
        try:
            statements = con.extract_statements(query)
        except duckdb.Error as e:
            raise StoreError(f"SQL error: {e}") from None
        if len(statements) != 1:
            raise StoreError(f"{READ_ONLY}: give exactly one SELECT statement (got {len(statements)})")
        kind = statements[0].type
        if kind != duckdb.StatementType.SELECT:
            raise StoreError(f"{READ_ONLY}: {kind.name} statements are not allowed, only SELECT")
    finally:
        if own:
            con.close()


def run_readonly(store: Store, query: str) -> pa.Table:
    if not isinstance(query, str):
        raise TypeError(f"query must be str, got {type(query).__name__}")
    con = _connect()
    try:
        check_select(query, con)

        names = store._table_dirs()
        wanted = _mentioned(query, sorted(set(names) | set(CORE_TABLES)))
        for attempt in range(READ_ATTEMPTS):
            scans = []
            for name in wanted:
                scan = store._scan(name, None) if name in names else None
                if scan is not None:
                    con.register(name, scan.dataset)
                    scans.append(scan)
                elif name in CORE_TABLES:
                    # an absent core table reads as empty with its contract columns
                    con.register(name, empty_table(name, None))
            if attempt == 0:
                con.execute("SET enable_external_access = false")
                con.execute("SET lock_configuration = true")
            try:
                return con.sql(query).to_arrow_table()
            except duckdb.Error as e:
                # a part replaced by a concurrent writer mid-query: re-read; otherwise the query's fault
                if attempt + 1 < READ_ATTEMPTS and any(scan.changed(store) for scan in scans):
                    continue
                missing = _missing_table(e)
                if missing is not None:  # DuckDB would suggest one of its own catalog tables
                    tables = sorted(set(store.tables()) | set(CORE_TABLES))
                    raise StoreError(f"SQL query failed on store {store.location()}: no table named {missing!r}; "
                                     f"tables in this store: {', '.join(tables)} (quote names containing - or . "
                                     'in double quotes, e.g. "my-table")') from None
                raise StoreError(f"SQL query failed on store {store.location()}: {e}") from None
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        con.close()
