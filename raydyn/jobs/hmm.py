"""Latent-state training maps (Hu, Chen, Saphra, Cho, TMLR 2023), fitted on Ray.

Groups of runs (default: all seeds of one configuration = every swept axis but seed)
are modelled together. The driver reads each group's metric sequences and prepares
them (runs split into train/held-out, then z-scored with one mean/std per feature pooled
over the group's training runs, or per run with ``--standardize run``); every
(group, k, restart) EM fit is one Ray task; the driver then selects k per group (training
BIC, or Hu et al.'s held-out selection), decodes every run (Viterbi), builds the training
map and runs the detour analysis (p-values adjusted for testing every state).

Tables: ``hmm_models`` (group, k, bic, heldout_bic, train/held-out log-likelihood, chosen),
``hmm_states`` (run_id, step, state), ``hmm_transitions`` (group, src, dst, prob,
count, n_runs, top features), ``hmm_detours`` (group, state, visit_fraction, r, p, p_adj,
obligatory, detour), ``hmm_summary`` (run_id, hmm_group, hmm_n_states, hmm_has_detour,
hmm_visits_detour, convergence_step): the phase-map metrics.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.analysis.hmm import CORRECTIONS, SELECTIONS, STANDARDIZE
from raydyn.jobs.base import Job, Unit, group_units, run_filter
from raydyn.jobs.options import Options, comma_list, option
from raydyn.jobs.registry import Analysis, register

DEFAULT_FEATURES = ("w_l1", "w_l2", "w_trace", "w_spectral", "w_l1_l2", "w_trace_spectral", "sv_mean", "sv_var",
                    "w_mean", "w_median", "w_var", "b_mean", "b_median", "b_var")


@dataclass(frozen=True)
class HMMOptions(Options):
    group_by: Optional[list[str]] = option(None, "Comma-separated runs columns (default: every swept axis but seed, "
                                           "i.e. all seeds of one configuration).", parse=comma_list)
    features: Optional[list[str]] = option(None, "Comma-separated metrics columns (default: the weight_stats "
                                           "features recorded).", parse=comma_list)
    max_states: int = option(8, "Largest number of hidden states tried.")
    restarts: int = option(5, "EM restarts per k.")
    covariance_type: str = option("full", "full | diag", flag="--covariance", choices=("full", "diag"))
    held_out: float = option(0.2, "Fraction of runs held out (held-out likelihood).")
    convergence_metric: str = option("test_acc", "Metric defining convergence.")
    convergence_threshold: float = option(0.9, "Level it must cross.")
    convergence_mode: str = option("above", "above | below", choices=("above", "below"))
    standardize: str = option("global", "global: one mean/std per feature pooled over the group's training runs "
                              "(default) | run: each run z-scored on its own (Hu et al.) | none", choices=STANDARDIZE)
    selection: str = option("bic", "bic: per k the best training likelihood, k by training BIC (default) | heldout: "
                            "per k the best held-out likelihood, k by held-out BIC (Hu et al.)", choices=SELECTIONS)
    correction: str = option("holm", "Adjustment of the detour p-values for testing every state: holm (default) | "
                             "bh (Benjamini-Hochberg) | none", choices=CORRECTIONS)
    alpha: float = option(0.05, "Significance level for detours (on adjusted p-values).")
    random_state: int = option(0, "Seed for the run split and the EM restarts.", flag="--seed")

    def check(self) -> None:
        if not 0 < self.alpha < 1:
            raise RaydynError(f"--alpha {self.alpha}: must be in (0, 1)")


class HMMJob(Job):
    """Gaussian HMMs over metric sequences: states, BIC, training maps, detour states (Hu et al. 2023)."""

    name = "hmm"
    Options = HMMOptions

    def __init__(self, options: HMMOptions | None = None, /, **fields: Any):
        super().__init__(options, **fields)
        self._groups: dict[str, dict[str, Any]] = {}

    def __getstate__(self):  # shipped with every unit: leave the driver's group data behind
        state = self.__dict__.copy()
        state["_groups"] = {}
        return state

    # ------------------------------------------------------------------ driver
    def _read_group(self, store, sweep: str, unit: Unit) -> dict[str, Any]:
        from raydyn.analysis.hmm import prepare

        o = self.options
        m = store.table("metrics", sweep=sweep, filter=run_filter(unit.run_ids))
        if not o.features and not any(f in m.column_names for f in DEFAULT_FEATURES):
            m = _with_snapshot_stats(store, sweep, unit.run_ids, m)
        cols = m.column_names
        feats = o.features or [f for f in DEFAULT_FEATURES if f in cols]
        missing = [f for f in feats if f not in cols]
        if not feats or missing:
            raise RaydynError(
                f"hmm: features {missing or list(DEFAULT_FEATURES)} are not in the metrics of sweep {sweep!r}; "
                "record them with `train.record: [weight_stats]` or pass --features from: "
                + ", ".join(c for c in cols if c not in ("run_id", "step", "weight_norms")))
        conv = o.convergence_metric
        if conv not in cols:
            raise RaydynError(f"hmm: --convergence-metric {conv!r} is not a metrics column of sweep {sweep!r}")
        d = m.to_pandas()
        seqs, conv_seqs, steps, run_ids = [], [], [], []
        for rid in unit.run_ids:
            r = d[d.run_id == rid].sort_values("step")
            x = r[feats].to_numpy(dtype=np.float64)
            keep = np.isfinite(x).all(axis=1)  # e.g. bias features are NaN for bias-free models
            if not keep.any():
                keep_cols = np.isfinite(x).any(axis=0)
                raise RaydynError(f"hmm: run {rid} has no step where every feature is finite; features with NaN: "
                                  f"{[f for f, k in zip(feats, keep_cols) if not k]} (drop them with --features)")
            seqs.append(x[keep])
            steps.append(r.step.to_numpy()[keep])
            c = r[[conv, "step"]].dropna()
            conv_seqs.append((c.step.to_numpy(), c[conv].to_numpy(dtype=np.float64)))
            run_ids.append(rid)
        data = prepare(seqs, held_out=o.held_out, random_state=o.random_state, feature_names=feats,
                       standardize=o.standardize)
        if o.selection == "heldout" and len(data.heldout_index) == 0:
            raise RaydynError(f"hmm: --selection heldout needs held-out runs, but group {unit.key} holds none out "
                              f"({len(seqs)} runs, --held-out {o.held_out}); raise --held-out or use --selection bic")
        return {"data": data, "steps": steps, "conv": conv_seqs, "run_ids": run_ids, "unit": unit}

    def plan(self, store, sweep: str) -> list[Unit]:
        from raydyn.analysis.hmm import fit_plan

        runs = store.table("runs", sweep=sweep)
        group_by = self.options.group_by
        if group_by is None:  # all seeds of one configuration
            from raydyn.spec import parse_sweep
            from raydyn.track import parse_stored

            spec = parse_stored(store, sweep) or parse_sweep("", sweep)
            group_by = [a for a in spec.axes() if a != "seed"] or None
        groups = group_units(runs, group_by)
        if not group_by and groups:  # no axis but seed: one group of every run
            groups = [Unit("all", tuple(r for g in groups for r in g.run_ids), {})]
        plan = fit_plan(self.options.max_states, self.options.restarts, self.options.random_state)
        units = []
        for g in groups:
            if len(g.run_ids) < 2:
                raise RaydynError(f"hmm: group {g.key} has {len(g.run_ids)} run; an HMM needs several runs per group "
                                  "(seeds): sweep more seeds or pass a coarser --group-by")
            self._groups[g.key] = self._read_group(store, sweep, g)
            train = self._groups[g.key]["data"].train_sequences
            units += [Unit(f"{g.key}|k={k}|seed={seed}", g.run_ids, {"group": g.key, "k": k, "seed": seed,
                                                                     "train": train}) for k, seed in plan]
        # largest k first (EM time grows with k): the fits left for the end are the short ones, so
        # no core idles while another finishes a long one (benchmarks/hmm_fits.py). The tables do not
        # depend on this order (finish goes by group, select sorts the fits).
        units.sort(key=lambda u: -u.info["k"])
        return units

    # ------------------------------------------------------------------ worker
    def compute(self, store, sweep: str, unit: Unit) -> Any:
        from raydyn.analysis.hmm import fit_one

        return fit_one(unit.info["train"], unit.info["k"], unit.info["seed"], self.options.covariance_type)

    # ------------------------------------------------------------------ driver
    def finish(self, store, sweep: str, tables, results) -> dict[str, pa.Table]:
        from raydyn.analysis.hmm import convergence_steps, detour_analysis, select, training_map

        o = self.options
        fits: dict[str, list] = {}
        for unit, fit in results:
            fits.setdefault(unit.info["group"], []).append(fit)
        models, states, transitions, detours, summary = [], [], [], [], []
        for key, g in self._groups.items():
            if key not in fits:
                continue
            res = select(g["data"], fits[key], o.selection)
            tmap = training_map(res)
            conv = convergence_steps([c[1] for c in g["conv"]], o.convergence_threshold, o.convergence_mode,
                                     steps=[c[0] for c in g["conv"]])
            det = detour_analysis(res.states, conv, n_states=res.n_states, alpha=o.alpha,
                                  correction=o.correction)
            for k in sorted(res.bic):
                models.append({"group": key, "k": k, "bic": res.bic[k], "heldout_bic": res.heldout_bic.get(k, np.nan),
                               "train_loglik": res.train_loglik.get(k, np.nan),
                               "heldout_loglik": res.heldout_loglik.get(k, np.nan), "chosen": k == res.n_states,
                               "transmat": json.dumps(res.transmat.tolist()) if k == res.n_states else None,
                               "means": json.dumps(res.means.tolist()) if k == res.n_states else None,
                               "features": json.dumps(list(res.feature_names or []))})
            for rid, st, s in zip(g["run_ids"], g["steps"], res.states):
                states += [{"run_id": rid, "step": int(a), "state": int(b)} for a, b in zip(st, s)]
            for e in tmap.edges:
                transitions.append({"group": key, "src": e.src, "dst": e.dst, "prob": float(e.prob), "count": e.count,
                                    "n_runs": e.n_runs, "top_features": json.dumps(
                                        [[n, round(float(v), 4)] for n, v in e.ranked_features[:3]])})
            for s in range(res.n_states):
                detours.append({"group": key, "state": s, "visit_fraction": float(det.visit_fraction[s]),
                                "r": float(det.r[s]), "p": float(det.p[s]), "p_adj": float(det.p_adjusted[s]),
                                "correction": det.correction, "obligatory": bool(det.obligatory[s]),
                                "detour": bool(det.detour[s])})
            detour_set = set(det.detour_states.tolist())
            for i, rid in enumerate(g["run_ids"]):
                visited = set(np.unique(res.states[i]).tolist())
                summary.append({"run_id": rid, "hmm_group": key, "hmm_n_states": int(res.n_states),
                                "hmm_has_detour": int(bool(detour_set)),
                                "hmm_visits_detour": int(bool(visited & detour_set)),
                                "convergence_step": float(conv[i])})
        out = {}
        for name, rows in (("hmm_models", models), ("hmm_states", states), ("hmm_transitions", transitions),
                           ("hmm_detours", detours), ("hmm_summary", summary)):
            if rows:
                out[name] = pa.Table.from_pylist(rows)
        return out


register(Analysis(HMMJob, report="raydyn.plots.hmm:report_section"))


def _with_snapshot_stats(store, sweep: str, run_ids, metrics: pa.Table) -> pa.Table:
    """``metrics`` with Hu et al.'s weight statistics computed from the runs' stored snapshots, at the
    snapshot steps (for runs that did not record ``weight_stats`` while training: runs logged with
    raydyn.track or imported). Unchanged when the runs have no snapshots or only sketched ones."""
    import torch

    from raydyn.analysis.weight_stats import FEATURES, weight_stats
    from raydyn.jobs.base import load_trajectories

    try:
        trajs = load_trajectories(store, sweep, list(run_ids))
    except RaydynError:
        return metrics  # no snapshots: the caller's message says what to record
    rows = []
    for rid, (steps, x, layout) in trajs.items():
        if layout.is_sketch or not layout.names:
            return metrics
        params = {p.name: torch.from_numpy(np.ascontiguousarray(x[:, p.cols])).reshape(len(x), *p.shape)
                  for p in layout.select()}
        try:
            stats = weight_stats(params)
        except ValueError:  # no weight matrix among the stored parameters
            return metrics
        rows.append(pa.table({"run_id": [rid] * len(steps), "step": pa.array(steps, pa.int64()),
                              **{f: stats[f].double().numpy() for f in FEATURES}}))
    if not rows:
        return metrics
    stats_table = pa.concat_tables(rows)
    # list columns (weight_norms, neuron_opt: never HMM features) cannot ride through Arrow's join
    keep = [c for c in metrics.column_names
            if c not in FEATURES and c != "sweep" and not pa.types.is_nested(metrics.schema.field(c).type)]
    return stats_table.join(metrics.select(keep), ["run_id", "step"], join_type="full outer")
