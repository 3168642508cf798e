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
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import Job, Unit, group_units, run_filter

DEFAULT_FEATURES = ("w_l1", "w_l2", "w_trace", "w_spectral", "w_l1_l2", "w_trace_spectral", "sv_mean", "sv_var",
                    "w_mean", "w_median", "w_var", "b_mean", "b_median", "b_var")


class HMMJob(Job):
    name = "hmm"

    def __init__(self, group_by: list[str] | None = None, features: list[str] | None = None, max_states: int = 8,
                 restarts: int = 5, covariance_type: str = "full", held_out: float = 0.2, random_state: int = 0,
                 convergence_metric: str = "test_acc", convergence_threshold: float = 0.9,
                 convergence_mode: str = "above", alpha: float = 0.05, standardize: str = "global",
                 selection: str = "bic", correction: str = "holm"):
        super().__init__(group_by=group_by, features=features, max_states=max_states, restarts=restarts,
                         covariance_type=covariance_type, held_out=held_out, random_state=random_state,
                         convergence_metric=convergence_metric, convergence_threshold=convergence_threshold,
                         convergence_mode=convergence_mode, alpha=alpha, standardize=standardize,
                         selection=selection, correction=correction)
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
        if not o["features"] and not any(f in m.column_names for f in DEFAULT_FEATURES):
            m = _with_snapshot_stats(store, sweep, unit.run_ids, m)
        cols = m.column_names
        feats = o["features"] or [f for f in DEFAULT_FEATURES if f in cols]
        missing = [f for f in feats if f not in cols]
        if not feats or missing:
            raise RaydynError(
                f"hmm: features {missing or list(DEFAULT_FEATURES)} are not in the metrics of sweep {sweep!r}; "
                "record them with `train.record: [weight_stats]` or pass --features from: "
                + ", ".join(c for c in cols if c not in ("run_id", "step", "weight_norms")))
        conv = o["convergence_metric"]
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
        data = prepare(seqs, held_out=o["held_out"], random_state=o["random_state"], feature_names=feats,
                       standardize=o.get("standardize", "global"))
        if o.get("selection", "bic") == "heldout" and len(data.heldout_index) == 0:
            raise RaydynError(f"hmm: --selection heldout needs held-out runs, but group {unit.key} holds none out "
                              f"({len(seqs)} runs, --held-out {o['held_out']}); raise --held-out or use --selection bic")
        return {"data": data, "steps": steps, "conv": conv_seqs, "run_ids": run_ids, "unit": unit}

    def plan(self, store, sweep: str) -> list[Unit]:
        from raydyn.analysis.hmm import fit_plan

        runs = store.table("runs", sweep=sweep)
        group_by = self.options["group_by"]
        if group_by is None:  # all seeds of one configuration
            from raydyn.spec import parse_stored, parse_sweep

            spec = parse_stored(store, sweep) or parse_sweep("", sweep)
            group_by = [a for a in spec.axes() if a != "seed"] or None
        groups = group_units(runs, group_by)
        if not group_by and groups:  # no axis but seed: one group of every run
            groups = [Unit("all", tuple(r for g in groups for r in g.run_ids), {})]
        plan = fit_plan(self.options["max_states"], self.options["restarts"], self.options["random_state"])
        units = []
        for g in groups:
            if len(g.run_ids) < 2:
                raise RaydynError(f"hmm: group {g.key} has {len(g.run_ids)} run; an HMM needs several runs per group "
                                  "(seeds): sweep more seeds or pass a coarser --group-by")
            self._groups[g.key] = self._read_group(store, sweep, g)
            train = self._groups[g.key]["data"].train_sequences
            units += [Unit(f"{g.key}|k={k}|seed={seed}", g.run_ids, {"group": g.key, "k": k, "seed": seed,
                                                                     "train": train}) for k, seed in plan]
        return units

    # ------------------------------------------------------------------ worker
    def compute(self, store, sweep: str, unit: Unit) -> Any:
        from raydyn.analysis.hmm import fit_one

        return fit_one(unit.info["train"], unit.info["k"], unit.info["seed"], self.options["covariance_type"])

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
            res = select(g["data"], fits[key], o.get("selection", "bic"))
            tmap = training_map(res)
            conv = convergence_steps([c[1] for c in g["conv"]], o["convergence_threshold"], o["convergence_mode"],
                                     steps=[c[0] for c in g["conv"]])
            det = detour_analysis(res.states, conv, n_states=res.n_states, alpha=o["alpha"],
                                  correction=o.get("correction", "holm"))
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


def register_cli(analyze_app) -> None:
    import typer

    @analyze_app.command("hmm")
    def hmm(
        sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
        group_by: Optional[str] = typer.Option(None, "--group-by", help="Comma-separated runs columns (default: every "
                                               "swept axis but seed, i.e. all seeds of one configuration)."),
        features: Optional[str] = typer.Option(None, "--features", help="Comma-separated metrics columns (default: "
                                               "the weight_stats features recorded)."),
        max_states: int = typer.Option(8, "--max-states", help="Largest number of hidden states tried."),
        restarts: int = typer.Option(5, "--restarts", help="EM restarts per k."),
        covariance: str = typer.Option("full", "--covariance", help="full | diag"),
        held_out: float = typer.Option(0.2, "--held-out", help="Fraction of runs held out (held-out likelihood)."),
        conv_metric: str = typer.Option("test_acc", "--convergence-metric", help="Metric defining convergence."),
        conv_threshold: float = typer.Option(0.9, "--convergence-threshold", help="Level it must cross."),
        conv_mode: str = typer.Option("above", "--convergence-mode", help="above | below"),
        standardize: str = typer.Option("global", "--standardize", help="global: one mean/std per feature pooled "
                                        "over the group's training runs (default) | run: each run z-scored "
                                        "on its own (Hu et al.) | none"),
        selection: str = typer.Option("bic", "--selection", help="bic: per k the best training likelihood, k by "
                                      "training BIC (default) | heldout: per k the best held-out likelihood, k by "
                                      "held-out BIC (Hu et al.)"),
        correction: str = typer.Option("holm", "--correction", help="Adjustment of the detour p-values for testing "
                                       "every state: holm (default) | bh (Benjamini-Hochberg) | none"),
        alpha: float = typer.Option(0.05, "--alpha", help="Significance level for detours (on adjusted p-values)."),
        seed: int = typer.Option(0, "--seed", help="Seed for the run split and the EM restarts."),
        store: Optional[str] = typer.Option(None, "--store", help="Store URI (default: $RAYDYN_STORE or ./raydyn-results)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local)."),
    ) -> None:
        """Gaussian HMMs over metric sequences: states, BIC, training maps, detour states (Hu et al. 2023)."""
        from raydyn.cli import run_analysis

        if covariance not in ("full", "diag"):
            raise RaydynError(f"--covariance {covariance!r}: allowed values are full, diag")
        if conv_mode not in ("above", "below"):
            raise RaydynError(f"--convergence-mode {conv_mode!r}: allowed values are above, below")
        from raydyn.analysis.hmm import CORRECTIONS, SELECTIONS, STANDARDIZE

        for flag, value, allowed in (("--standardize", standardize, STANDARDIZE), ("--selection", selection, SELECTIONS),
                                     ("--correction", correction, CORRECTIONS)):
            if value not in allowed:
                raise RaydynError(f"{flag} {value!r}: allowed values are {', '.join(allowed)}")
        if not 0 < alpha < 1:
            raise RaydynError(f"--alpha {alpha}: must be in (0, 1)")
        job = HMMJob(group_by=group_by.split(",") if group_by else None,
                     features=features.split(",") if features else None, max_states=max_states, restarts=restarts,
                     covariance_type=covariance, held_out=held_out, random_state=seed, convergence_metric=conv_metric,
                     convergence_threshold=conv_threshold, convergence_mode=conv_mode, alpha=alpha,
                     standardize=standardize, selection=selection, correction=correction)
        run_analysis(job, sweep, store, address)


def report_section(store, sweep: str) -> list[tuple[str, bytes]]:
    """Training maps of up to six groups, and the BIC curves."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydyn.analysis.hmm import MapEdge, MapNode, TrainingMap

    out = []
    models = store.table("hmm_models", sweep=sweep).to_pandas()
    trans = store.table("hmm_transitions", sweep=sweep).to_pandas()
    states = store.table("hmm_states", sweep=sweep).to_pandas()
    summary = store.table("hmm_summary", sweep=sweep).to_pandas()
    detours = store.table("hmm_detours", sweep=sweep).to_pandas() if "hmm_detours" in store.tables() else []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for g, d in models.groupby("group"):
        ax.plot(d.k, d.bic, marker="o", label=g)
    ax.set_xlabel("hidden states k")
    ax.set_ylabel("BIC (lower is better)")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    out.append(("HMM model selection: BIC per group", buf.getvalue()))
    from raydyn.plots.hmm import plot_training_map

    for g in list(models.group.unique())[:6]:
        chosen = models[(models.group == g) & models.chosen].iloc[0]
        feats = tuple(json.loads(chosen.features))
        k = int(chosen.k)
        runs = summary[summary.hmm_group == g].run_id
        st = states[states.run_id.isin(runs)]
        first = st.sort_values("step").groupby("run_id").state.first()
        nodes = tuple(MapNode(s, float((st.state == s).mean()), int((st.state == s).sum()),
                              float(st.groupby("run_id").state.apply(lambda x: s in set(x)).mean()),
                              float((first == s).mean())) for s in range(k))
        means = np.array(json.loads(chosen.means))
        edges = []
        for e in (trans[trans.group == g] if len(trans) else trans).itertuples():
            change = means[e.dst] - means[e.src]
            order = np.argsort(-np.abs(change))
            edges.append(MapEdge(int(e.src), int(e.dst), float(e.prob), int(e.count), int(e.n_runs), change, order,
                                 tuple((feats[i], float(change[i])) for i in order)))
        buf = io.BytesIO()
        det = detours[(detours.group == g) & detours.detour].state.astype(int).tolist() if len(detours) else []
        fig = plot_training_map(TrainingMap(nodes, tuple(edges), feats), title=f"{g}: {k} states", detours=det)
        fig = getattr(fig, "figure", fig)
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        out.append((f"training map {g}", buf.getvalue()))
    return out


from raydyn.report.html import SECTIONS  # noqa: E402

SECTIONS["hmm_"] = report_section


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
        if "countsketch" in layout.get("kind", "") or not layout.get("names"):
            return metrics
        offs = layout["offsets"]
        params = {n: torch.from_numpy(np.ascontiguousarray(x[:, offs[i]:offs[i + 1]])).reshape(len(x), *shape)
                  for i, (n, shape) in enumerate(zip(layout["names"], layout["shapes"]))}
        try:
            stats = weight_stats(params)
        except ValueError:  # no weight matrix among the stored parameters
            return metrics
        rows.append(pa.table({"run_id": [rid] * len(steps), "step": pa.array(steps, pa.int64()),
                              **{f: stats[f].double().numpy() for f in FEATURES}}))
    if not rows:
        return metrics
    stats_table = pa.concat_tables(rows)
    keep = [c for c in metrics.column_names if c not in FEATURES and c != "sweep"]
    return stats_table.join(metrics.select(keep), ["run_id", "step"], join_type="full outer")
