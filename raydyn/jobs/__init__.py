"""Analysis jobs: the glue between the store, the pure math in raydyn.analysis and the Ray fan-out.

A job plans units of work (a run, or a group of runs), computes one unit on a
Ray worker (read the unit's trajectories from the store, call the math, return
Arrow tables), and finishes on the driver (e.g. pairwise distances, clustering).
Every job writes its tables to the store under the sweep, including a
``<job>_summary`` table keyed by ``run_id`` whose columns become phase-map metrics.
Adding an analysis = one pure module + one job module + one entry in JOBS.
"""
from __future__ import annotations

from raydyn.jobs.base import Job, Unit, run_job

JOBS: dict[str, type[Job]] = {}


def register(cls: type[Job]) -> type[Job]:
    JOBS[cls.name] = cls
    return cls


# job modules; each defines a Job subclass and `register_cli(analyze_app)` adding its command
MODULES: tuple[str, ...] = ("hmm", "koopman", "phase", "cmd", "symmetry", "neurons")


def load_all() -> None:
    """Import every job module (they register their CLI command and report section)."""
    import importlib

    for m in MODULES:
        importlib.import_module(f"raydyn.jobs.{m}")


def cli_commands():
    """The `register_cli` functions of every job module (imported lazily by the CLI)."""
    import importlib

    return [importlib.import_module(f"raydyn.jobs.{m}").register_cli for m in MODULES]


__all__ = ["Job", "Unit", "run_job", "JOBS", "register", "MODULES", "cli_commands", "load_all"]
