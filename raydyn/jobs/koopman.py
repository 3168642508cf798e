"""Koopman conjugacy over a sweep (Redman et al., NeurIPS 2024), fanned out on Ray.

Units are groups of runs (``--group-by``; default: each run alone) treated as nearby
initialisations of one system, optionally cut into step windows (``--windows``): one DMD
spectrum per group (and window) from its runs' weight trajectories, as stored (float32
snapshots get float32's rank cutoff), computed on Ray workers. The driver then computes every
pairwise Wasserstein distance between spectra in blocks on Ray actors (spectra put in the
object store once; with ``--continuous`` imaginary parts compared modulo 2 pi / dt, dt each
group's own recording interval) and clusters the distance matrix into conjugacy classes only
against a scale: ``--threshold``/``--classes``, or, when ``--group-by`` includes ``seed``,
mean + 3 SD of the seed-to-seed distances; otherwise every group is one class.

Tables: ``koopman_spectra`` (group, eigenvalue index, real, imag, |lambda|, delays, dt,
precision), ``koopman_distances`` (group_a, group_b, distance), ``koopman_summary`` (run_id,
koopman_group, koopman_class, koopman_class_rule, koopman_max_abs_eig, koopman_n_eigs): the
phase-map metrics (with ``--windows``: ``koopman_windows``, one row per run and window, instead).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import Job, Unit, group_units, load_trajectories, run_filter
from raydyn.jobs.options import Options, comma_list, option
from raydyn.jobs.registry import Analysis, register

SEED = "seed"


def _window_key(w: tuple[int, int]) -> str:
    return f"steps={w[0]}-{w[1]}"


@dataclass(frozen=True)
class KoopmanOptions(Options):
    group_by: Optional[list[str]] = option(None, "Comma-separated runs columns; the runs of a group are nearby "
                                           "initialisations of one system (default: each run).", parse=comma_list)
    layers: Optional[list[str]] = option(None, "Comma-separated parameter-name prefixes to use.", parse=comma_list)
    delays: int = option(4, "Time delays in the Hankel embedding.")
    embed_dim: Optional[int] = option(None, "Instead of --delays: per group, the delays d with (d + 1) x state "
                                      "dimension closest to this (Redman et al. scale delays so across widths, e.g. "
                                      "2000 gives d = 39, 19, 4 for 50, 100, 400 weights).")
    rank: Any = option(None, "DMD rank: integer, energy fraction, 'optimal' or full.", parse=lambda t: _parse_rank(t))
    pca: Optional[int] = option(None, "Project weights on their top-k principal components first.")
    continuous: bool = option(False, "Compare log(lambda)/dt (independent of record_every).", flag="--continuous")
    threshold: Optional[float] = option(None, "Distance below which groups are one class.")
    n_classes: Optional[int] = option(None, "Number of conjugacy classes (instead of threshold).", flag="--classes")
    windows: Optional[tuple[tuple[int, int], ...]] = option(
        None, "Step windows, e.g. 0-100,100-200: one spectrum per group and window (both ends included), for "
        "comparing phases of training (Redman et al.'s early-training CNN experiment).",
        parse=lambda t: _parse_windows(t))
    p: float = option(1.0, "Order of the Wasserstein distance.", cli=False)

    def check(self) -> None:
        if self.embed_dim is not None and self.embed_dim < 1:
            raise RaydynError(f"--embed-dim must be a positive integer, got {self.embed_dim}")
        if self.windows is not None:
            object.__setattr__(self, "windows", tuple(tuple(w) for w in self.windows))


class KoopmanJob(Job):
    """Koopman spectra per run/group, pairwise Wasserstein distances, conjugacy classes (Redman et al. 2024)."""

    name = "koopman"
    Options = KoopmanOptions

    def plan(self, store, sweep: str) -> list[Unit]:
        runs = store.table("runs", sweep=sweep)
        units = group_units(runs, self.options.group_by)
        if not self.options.windows:
            return units
        return [Unit(f"{u.key}|{_window_key(w)}", u.run_ids, {**u.info, "window": tuple(w)})
                for u in units for w in self.options.windows]

    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        from raydyn.analysis.koopman import spectrum

        o = self.options
        # as stored: float32 snapshots keep float32 precision, which sets the DMD rank cutoff
        trajs = load_trajectories(store, sweep, unit.run_ids, o.layers, keep_dtype=True)
        if not trajs:
            raise ValueError(f"group {unit.key}: no weight snapshots")
        # dt: this group's recording interval (record_every may be swept), one per group
        runs = store.table("runs", sweep=sweep, columns=["run_id", "record_every"], filter=run_filter(list(trajs)))
        every = sorted(set(runs.column("record_every").to_pylist()))
        if len(every) != 1:
            raise RaydynError(f"group {unit.key}: its runs were recorded every {every} steps; one DMD needs one "
                              "recording interval (add record_every to --group-by)")
        dt = float(every[0])
        window = unit.info.get("window")
        trajs = {rid: _on_grid(rid, st, x, int(every[0]), window, unit.key) for rid, (st, x, _) in trajs.items()}
        arrays = [x for _, x in trajs.values()]
        for rid, (_, x) in trajs.items():
            if not np.isfinite(x).all():
                raise ValueError(f"run {rid} has NaN/inf weights (diverged?); exclude it or record fewer steps")
        delays = o.delays
        if o.embed_dim:  # delays per group so that (delays + 1) x state dimension ~ embed_dim
            state = o.pca or arrays[0].shape[1]
            delays = max(0, int(round(o.embed_dim / state)) - 1)
            shortest = min(len(x) for x in arrays)
            if delays + 2 > shortest:
                raise ValueError(f"group {unit.key}: --embed-dim {o['embed_dim']} needs {delays} delays for state "
                                 f"dimension {state}, more than its shortest trajectory ({shortest} steps) allows")
        eigs = spectrum(arrays, delays, o.rank, dt=dt, continuous=o.continuous, pca=o.pca)
        n = len(eigs)
        spectra = pa.table({
            "group": [unit.key] * n,
            "index": np.arange(n, dtype=np.int64),
            "real": eigs.real.astype(np.float64),
            "imag": eigs.imag.astype(np.float64),
            "abs": np.abs(eigs).astype(np.float64),
            "run_ids": [json.dumps(list(trajs))] * n,
            "delays": np.full(n, delays, dtype=np.int64),
            "dt": np.full(n, dt, dtype=np.float64),
            "precision": pa.array([str(np.result_type(*arrays))] * n, pa.string()),
            "group_values": pa.array([json.dumps({k: v for k, v in unit.info.items() if k != "window"},
                                                 default=str)] * n, pa.string()),
            "window": pa.array([_window_key(window) if window else None] * n, pa.string()),
        })
        return {"koopman_spectra": spectra}

    def finish(self, store, sweep: str, tables: dict[str, pa.Table], results) -> dict[str, pa.Table]:
        from raydyn import fanout
        from raydyn.analysis.koopman import conjugacy_classes, seed_threshold

        sp = tables.get("koopman_spectra")
        if sp is None or sp.num_rows == 0:
            return {}
        o = self.options
        d = sp.to_pydict()
        groups: dict[str, dict[str, Any]] = {}
        for i, (g, re_, im, rids) in enumerate(zip(d["group"], d["real"], d["imag"], d["run_ids"])):
            e = groups.setdefault(g, {"eigs": [], "runs": json.loads(rids), "dt": d["dt"][i],
                                      "values": json.loads(d["group_values"][i]), "window": d["window"][i]})
            e["eigs"].append(complex(re_, im))
        names = sorted(groups)
        spectra = [np.array(groups[g]["eigs"]) for g in names]
        periods = [2 * np.pi / groups[g]["dt"] for g in names] if o.continuous else None
        if len(names) > 1:
            dist = fanout.pairwise_distance_matrix(spectra, p=o.p, imag_period=periods)
        else:
            dist = np.zeros((1, 1))
        labels, rule = self._classes(names, groups, dist, conjugacy_classes, seed_threshold)
        ia, ib = np.triu_indices(len(names), 1)
        distances = pa.table({"group_a": [names[i] for i in ia], "group_b": [names[j] for j in ib],
                              "distance": dist[ia, ib].astype(np.float64)})
        windowed = bool(o.windows)
        rows = {"run_id": [], "koopman_group": [], "koopman_class": [], "koopman_class_rule": [],
                "koopman_max_abs_eig": [], "koopman_n_eigs": [], **({"koopman_window": []} if windowed else {})}
        for k, g in enumerate(names):
            e = spectra[k]
            for r in groups[g]["runs"]:
                rows["run_id"].append(r)
                rows["koopman_group"].append(g)
                rows["koopman_class"].append(int(labels[k]))
                rows["koopman_class_rule"].append(rule)
                rows["koopman_max_abs_eig"].append(float(np.abs(e).max()) if len(e) else float("nan"))
                rows["koopman_n_eigs"].append(len(e))
                if windowed:
                    rows["koopman_window"].append(groups[g]["window"])
        schema = [("run_id", pa.string()), ("koopman_group", pa.string()), ("koopman_class", pa.int64()),
                  ("koopman_class_rule", pa.string()), ("koopman_max_abs_eig", pa.float64()),
                  ("koopman_n_eigs", pa.int64())] + ([("koopman_window", pa.string())] if windowed else [])
        summary = pa.table(rows).cast(pa.schema(schema))
        # one row per run and window is not a phase-map summary (those have one row per run)
        return {"koopman_distances": distances, ("koopman_windows" if windowed else "koopman_summary"): summary}

    def _classes(self, names, groups, dist, conjugacy_classes, seed_threshold) -> tuple[np.ndarray, str]:
        """Class labels and the rule that cut them: only against a scale (threshold, count, or the
        seed-to-seed distances); with none of them every group is one class."""
        o = self.options
        n = len(names)
        if n == 1:
            return np.zeros(1, dtype=int), "one group"
        if o.n_classes is not None:
            return conjugacy_classes(dist, n_classes=o.n_classes), f"--classes {o.n_classes}"
        if o.threshold is not None:
            return conjugacy_classes(dist, threshold=o.threshold), f"--threshold {o.threshold:g}"
        within = []
        if SEED in (o.group_by or []):
            cond = [json.dumps({k: v for k, v in groups[g]["values"].items() if k != SEED}, sort_keys=True)
                    + f"|{groups[g]['window']}" for g in names]
            within = [dist[i, j] for i in range(n) for j in range(i + 1, n) if cond[i] == cond[j]]
        if len(within) >= 2:
            t = seed_threshold(within)
            return (conjugacy_classes(dist, threshold=t),
                    f"seed-to-seed: mean + 3 SD of {len(within)} distances = {t:.4g}")
        return np.zeros(n, dtype=int), ("one class: no scale to split against (pass --threshold or --classes, or "
                                        "group by seed as well, with >= 2 seeds per condition)")


def _on_grid(rid: str, steps: np.ndarray, x: np.ndarray, every: int, window, key: str):
    """The snapshots on the run's record_every grid (evaluation steps can add off-grid records, and
    a DMD needs one time step between snapshots), cut to the window [start, end] if given."""
    keep = steps % every == 0
    if window is not None:
        keep &= (steps >= window[0]) & (steps <= window[1])
    st = steps[keep]
    if len(st) < 2:
        raise RaydynError(f"group {key}: run {rid} has {len(st)} snapshots on its record_every={every} grid"
                          + (f" in steps {window[0]}-{window[1]}" if window is not None else ""))
    gaps = np.flatnonzero(np.diff(st) != every)
    if len(gaps):
        raise RaydynError(f"group {key}: run {rid} has no snapshot between steps {st[gaps[0]]} and "
                          f"{st[gaps[0] + 1]} (record_every={every}); a DMD needs evenly spaced snapshots")
    return st, x[keep]


def _parse_rank(rank: Optional[str]) -> Any:
    if rank is None or rank == "full":
        return None
    if rank == "optimal":
        return "optimal"
    try:
        v = float(rank)
    except ValueError:
        from raydyn.errors import RaydynError

        raise RaydynError(f"--rank {rank!r}: give an integer, an energy fraction in (0, 1), 'optimal' or 'full'") from None
    return int(v) if v >= 1 else v


def _parse_windows(text: Optional[str]) -> list[tuple[int, int]] | None:
    if not text:
        return None
    out = []
    for part in text.split(","):
        try:
            a, b = (int(v) for v in part.split("-"))
        except ValueError:
            raise RaydynError(f"--windows {text!r}: give step ranges START-END separated by commas, e.g. 0-100,100-200") from None
        if a < 0 or b <= a:
            raise RaydynError(f"--windows: window {part!r} must have 0 <= START < END")
        out.append((a, b))
    return out


def print_classes(store, sweep: str, options: KoopmanOptions):
    """After `raydyn analyze koopman`: the rule that cut the conjugacy classes."""
    table = "koopman_windows" if options.windows else "koopman_summary"
    rules = set(store.table(table, sweep=sweep, columns=["koopman_class_rule"]).column(0).to_pylist())
    return [f"conjugacy classes: {r}" for r in sorted(rules)]


register(Analysis(KoopmanJob, report="raydyn.plots.koopman:report_section", after=print_classes))
