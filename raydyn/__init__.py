"""raydyn: sweep-scale training dynamics on Ray.

The package root stays import-light (no torch, no ray) so that ``import raydyn``
and ``raydyn.open_store`` are cheap for people who only query results.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "open_store", "RaydynError", "Sweep", "SweepSummary", "run_sweep", "track"]

from raydyn.errors import RaydynError


def open_store(uri: str | None = None):
    """Open a raydyn store (a directory or pyarrow filesystem URI) for reading."""
    from raydyn.store import open_store as _open

    return _open(uri)


def __getattr__(name: str):
    """``raydyn.Sweep``, ``raydyn.run_sweep`` and ``raydyn.SweepSummary`` load on first use (they need Ray);
    so does ``raydyn.track`` (:mod:`raydyn.track`: call it to log a run trained anywhere)."""
    if name == "track":
        import importlib

        return importlib.import_module("raydyn.track")
    if name in ("Sweep", "SweepSummary", "run_sweep"):
        from raydyn import api

        return getattr(api, name)
    raise AttributeError(f"module 'raydyn' has no attribute {name!r}")
