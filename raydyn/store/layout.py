"""Where things live under a store root, and which names are allowed.

::

    <root>/
      <table>/sweep=<sweep>/part-<part>.parquet     data (hive-partitioned by sweep)
      <table>/sweep=<sweep>/.tmp-<part>-<uuid>.parquet   in-flight write, ignored by readers
      sweeps/<sweep>/sweep.yaml                      exact sweep-file text
      sweeps/<sweep>/sweep.json                      hash, created time, versions, caller meta
      _quarantine/<UTC timestamp>/<relative path>    files moved aside by Store.check(repair=True)

All paths inside the store use ``/`` whatever the platform (pyarrow filesystem
paths).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from raydyn.errors import StoreError

SWEEPS_DIR = "sweeps"
QUARANTINE_DIR = "_quarantine"
PART_PREFIX = "part-"
TMP_PREFIX = ".tmp-"
PARQUET_SUFFIX = ".parquet"
SWEEP_YAML = "sweep.yaml"
SWEEP_JSON = "sweep.json"

#: Table names that would collide with the store's own directories.
RESERVED_TABLES = frozenset({SWEEPS_DIR})

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_PART_RE = re.compile(rf"{re.escape(PART_PREFIX)}(?P<part>.+){re.escape(PARQUET_SUFFIX)}")


def validate_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid table/sweep/part name, else raise StoreError.

    Allowed: 1-200 characters from letters, digits, ``-``, ``_`` and ``.``,
    starting with a letter or digit (so no hidden files, no ``..``, no path
    separators). Table names must also not be ``sweeps``.
    """
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise StoreError(
            f"invalid {kind} name {value!r}: use 1-200 letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    if kind == "table" and value in RESERVED_TABLES:
        raise StoreError(f"invalid table name {value!r}: reserved for the store's own files")
    return value


def join(root: str, relpath: str) -> str:
    """The filesystem path of ``relpath`` (``/``-separated) under ``root``."""
    if not root:
        return relpath
    return root.rstrip("/") + "/" + relpath


def part_relpath(table: str, sweep: str, part: str) -> str:
    return f"{table}/sweep={sweep}/{PART_PREFIX}{part}{PARQUET_SUFFIX}"


def sweep_dir_relpath(table: str, sweep: str) -> str:
    return f"{table}/sweep={sweep}"


@dataclass(frozen=True)
class PartPath:
    """A data file's place in the layout, parsed from its path relative to the root."""

    table: str
    sweep: str
    part: str
    relpath: str


def parse_relpath(relpath: str) -> PartPath | None:
    """Parse ``<table>/sweep=<sweep>/part-<part>.parquet``; None for anything else
    (tmp files, quarantine, sweep metadata, foreign files)."""
    pieces = relpath.split("/")
    if len(pieces) != 3:
        return None
    table, sweep_dir, fname = pieces
    if not sweep_dir.startswith("sweep="):
        return None
    m = _PART_RE.fullmatch(fname)
    if m is None:
        return None
    sweep, part = sweep_dir[len("sweep=") :], m.group("part")
    for value in (table, sweep, part):
        if not _NAME_RE.fullmatch(value):
            return None
    if table in RESERVED_TABLES:
        return None
    return PartPath(table, sweep, part, relpath)


def is_tmp_name(fname: str) -> bool:
    return fname.startswith(TMP_PREFIX)
