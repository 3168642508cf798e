"""``raydyn sweep refine``: add runs where the phase changes until the boundaries are located.

The loop (all on the sweep's own store, the sweep file unchanged):

1. make sure every run has a phase label (:class:`raydyn.jobs.phase.PhaseJob` writes
   ``phase_summary``; run again whenever runs were added);
2. per *row* -- one combination of the other swept axes (seeds are replicates) --
   collect the labelled points along ``axis`` and feed them to a
   :class:`raydyn.aggregate.bisect.GridRefiner`, which proposes new axis values by
   bisecting the widest unresolved boundary intervals across all rows;
3. train the proposals (every seed of the sweep) as runs of the same sweep through
   the same Tune path as ``sweep run`` (:func:`raydyn.sweep.train_runs`), marked
   ``origin = refine`` in the runs table;
4. repeat until the budget (new runs) is spent or every boundary is within ``tol``
   (or stuck in a band where seeds disagree).

Neither Ray nor the math is imported here directly: this module is glue between
:mod:`raydyn.sweep`, :mod:`raydyn.jobs` and :mod:`raydyn.aggregate`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from raydyn.aggregate.bisect import GridRefiner, dense_grid_size
from raydyn.aggregate.boundary import infer_log
from raydyn.aggregate.categorical import AxisBoundaries, boundaries_along
from raydyn.errors import RaydynError

__all__ = ["RefineOutcome", "refine_sweep", "labelled_runs"]


@dataclass
class RefineOutcome:
    axis: str
    by: list[str]
    tol: float
    log: bool
    grid_runs: int
    refine_runs: int
    rounds: list[list[dict[str, Any]]] = field(default_factory=list)  # proposals per round
    boundaries: list[AxisBoundaries] = field(default_factory=list)
    dense_runs: int = 0  # runs a uniform grid at resolution tol would need (rows x seeds x points)
    resolved: bool = False
    elapsed_s: float = 0.0
    failed_populations: list[str] = field(default_factory=list)
    failures: dict[str, list[str]] = field(default_factory=dict)  # failed trial -> root cause of each attempt


def labelled_runs(store, sweep: str, *, reclassify: bool = False, progress=None):
    """The runs table of ``sweep`` joined with ``phase_summary``; classifies (on Ray) when labels are
    missing or ``reclassify``."""
    from raydyn.aggregate.maps import runs_with_metrics

    runs = runs_with_metrics(store, sweep)
    if reclassify or "phase" not in runs.column_names or runs.column("phase").null_count:
        from raydyn.jobs.phase import classify_sweep

        classify_sweep(store, sweep, progress=progress)
        runs = runs_with_metrics(store, sweep)
    return runs


def _grid_values(spec, axis: str) -> list[float]:
    if axis not in spec.parameters or not spec.parameters[axis].is_list():
        raise RaydynError(f"--axis {axis!r} is not a swept parameter with listed values; swept: "
                          f"{', '.join(spec.parameters) or 'none'}")
    vals = spec.parameters[axis].listed()
    try:
        out = sorted({float(v) for v in vals})
    except (TypeError, ValueError):
        raise RaydynError(f"--axis {axis!r} must be numeric, got values {vals}") from None
    if len(out) < 2:
        raise RaydynError(f"--axis {axis!r} needs at least 2 values in the sweep file to refine between, got {vals}")
    return out


def refine_sweep(
    spec,
    text: str,
    store,
    *,
    axis: str = "lr",
    budget: int,
    tol: float | None = None,
    batch: int | None = None,
    scale: str = "auto",
    address: str | None = None,
    num_cpus: int | None = None,
    on_round: Callable[[int, list[dict[str, Any]]], None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> RefineOutcome:
    """Refine the phase boundaries of a grid sweep along ``axis`` with at most ``budget`` new runs.

    Args:
        spec, text: the sweep (as registered in the store; a changed file is refused).
        axis: swept numeric parameter to refine along.
        budget: most new runs to train (each proposed axis value costs one run per seed).
        tol: target interval width: absolute on a linear axis, relative (upper/lower - 1)
            on a log axis. Default: 1% of the grid's range (linear) or 0.05 (log).
        batch: axis values proposed per round (default: one per CPU of the Ray cluster, >= 2);
            each round is one Tune run.
        scale: ``auto`` (guess from the grid), ``linear`` or ``log``.

    Returns a :class:`RefineOutcome` with the final boundaries per row.
    """
    from raydyn.sweep import ensure_ray, register_sweep, train_runs

    t0 = time.time()
    if spec.method != "grid":
        raise RaydynError(f"sweep {spec.name!r} is a {spec.method} sweep; refine needs a grid (method: grid)")
    if budget < 0:
        raise RaydynError(f"--budget must be >= 0, got {budget}")
    if scale not in ("auto", "linear", "log"):
        raise RaydynError(f"--scale {scale!r}: allowed values are auto, linear, log")
    grid = _grid_values(spec, axis)
    log = infer_log(grid) if scale == "auto" else scale == "log"
    if log and grid[0] <= 0:
        raise RaydynError(f"--scale log needs positive {axis} values, got {grid[0]}")
    if tol is None:
        tol = 0.05 if log else (grid[-1] - grid[0]) / 100
    if not (math.isfinite(tol) and tol > 0):
        raise RaydynError(f"--tol must be > 0, got {tol}")
    is_int = all(float(v).is_integer() and not isinstance(v, float) for v in spec.parameters[axis].listed())
    by = [a for a in spec.axes() if a not in (axis, "seed")]
    constants = {k: p.listed()[0] for k, p in spec.parameters.items()
                 if k not in by and k not in (axis, "seed") and p.is_list()}
    seeds = spec.parameters["seed"].listed() if "seed" in spec.parameters else [spec.train.seed]
    if spec.name not in store.sweeps():
        raise RaydynError(f"sweep {spec.name!r} has no runs in store {store.uri}; run `raydyn sweep run` first")
    store.ensure_writable()
    register_sweep(spec, text, store)
    ensure_ray(address, num_cpus)
    if batch is None:
        import ray

        batch = max(2, int(ray.cluster_resources().get("CPU", 2)))

    out = RefineOutcome(axis, by, float(tol), log, 0, 0)
    used = 0
    runs = labelled_runs(store, spec.name)
    while True:
        d = runs.to_pydict()
        rows = sorted({tuple(d[b][i] for b in by) for i in range(runs.num_rows)}, key=str)
        row_of = {r: float(i) for i, r in enumerate(rows)}
        pts: dict[tuple, list[tuple[float, str]]] = {r: [] for r in rows}
        for i in range(runs.num_rows):
            if d["phase"][i] is not None and d[axis][i] is not None:
                pts[tuple(d[b][i] for b in by)].append((float(d[axis][i]), d["phase"][i]))
        common = sorted(set.intersection(*[{x for x, _ in p} for p in pts.values()]) & set(grid)) if pts else []
        if len(common) < 2:
            raise RaydynError(f"refine needs labelled runs at >= 2 grid values of {axis!r} in every row "
                              f"(combination of {by or 'no other axes'}); run `raydyn sweep run` to finish the grid")
        labels = [[[s for x, s in pts[r] if x == c] for c in common] for r in rows]
        g = GridRefiner(common, [row_of[r] for r in rows], labels, log=log, tol=tol)
        extra = [((x, row_of[r]), s) for r in rows for x, s in pts[r] if x not in common]
        if extra:
            g.tell([p for p, _ in extra], [s for _, s in extra])
        points_left = (budget - used) // len(seeds)
        proposals = g.ask(min(points_left, batch)) if points_left > 0 else []
        proposals = [(float(f"{x:.6g}"), y) for x, y in proposals]  # 2.15, not 2.1500000000000004
        if is_int:
            have = {(x, y) for (x, y), _ in extra} | {(c, row_of[r]) for c in common for r in rows}
            proposals = [(float(round(x)), y) for x, y in proposals]
            proposals = [p for p in dict.fromkeys(proposals) if p not in have]
        if not proposals:
            out.resolved = all(g.rows_[y].is_resolved(b) for y, bs in g.boundaries().items() for b in bs)
            break
        inv = {v: r for r, v in row_of.items()}
        new = []
        for x, y in proposals:
            point = {**constants, **dict(zip(by, inv[y])), axis: int(x) if is_int else x}
            new.append(point)
        if on_round:
            on_round(len(out.rounds) + 1, new)
        out.rounds.append(new)
        configs = [spec.run_config({**p, "seed": s}) for p in new for s in seeds]
        res = train_runs(spec, store, configs, origin="refine", address=address, num_cpus=num_cpus,
                         progress=progress)
        out.failed_populations += res.failed_populations
        out.failures.update(res.failures)
        used += len(configs)
        runs = labelled_runs(store, spec.name, reclassify=True)

    origin = runs.column("origin").to_pylist() if "origin" in runs.column_names else ["grid"] * runs.num_rows
    out.refine_runs = sum(o == "refine" for o in origin)
    out.grid_runs = runs.num_rows - out.refine_runs
    out.boundaries = boundaries_along(runs, "phase", axis, by=by, log=log)
    n_rows = max(1, len({tuple(runs.column(b).to_pylist()[i] for b in by) for i in range(runs.num_rows)}))
    out.dense_runs = dense_grid_size(grid[0], grid[-1], tol, log) * n_rows * len(seeds)
    out.elapsed_s = time.time() - t0
    return out

