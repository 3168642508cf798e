"""Analysis jobs: the glue between the store, the pure math in raydyn.analysis and the Ray fan-out.

A job plans units of work (a run, or a group of runs), computes one unit on a Ray worker (read the
unit's trajectories from the store, call the math, return Arrow tables), and finishes on the driver
(e.g. pairwise distances, clustering). Every job writes its tables to the store under the sweep,
including a ``<job>_summary`` table keyed by ``run_id`` whose columns become phase-map metrics.

Adding an analysis = one pure module (``raydyn.analysis``), one job module with its options dataclass,
and one :func:`register` call (:mod:`raydyn.jobs.registry`; docs/DESIGN.md, "Adding an analysis").
This package's names are the public API for analyses written outside raydyn.
"""
from __future__ import annotations

from raydyn.jobs.base import Job, Unit, run_job
from raydyn.jobs.options import Options, comma_list, option
from raydyn.jobs.registry import Analysis, analyses, register

__all__ = ["Job", "Unit", "run_job", "Options", "option", "comma_list", "Analysis", "register", "analyses"]
