"""Neuron transformation modes and attraction basins (after Lin et al. 2025) over a sweep, one run per Ray task.

The definitions are raydyn's own operationalisation (the paper gives no code), documented in
:mod:`raydyn.analysis.neurons`: a ReLU-like neuron is OPT (order-preserving) when its pre-activation
lies in its activation's increasing range (ReLU: > 0) on every sample of a fixed reference set (the
first 256 training inputs), NPT on some, dead on none; the
linearity probe replaces one activation layer by the identity; the sample-space basin is the
median over samples of the largest relative input perturbation that keeps >= 95 % of random
directions' predicted class; the weight-space basin is the largest layer-relative weight noise
that keeps train accuracy within 1 point (median over draws).

For each completed run, the model is rebuilt from ``runs.config_json`` and its stored full
weight snapshots are loaded at the chosen steps (``--steps``: ``last`` by default, ``all``, or a
comma-separated list; the nearest recorded steps are used). Linearity and basins need class
labels (classification or binary tasks) and, for the sample basin, real-valued inputs; other
runs get NaN there. A run logged with :func:`raydyn.track` (or imported) is analysed only when its
config names a model factory and a data set (the plug-in contract,
:func:`raydyn.jobs.base.rebuild_config`); others are refused, naming the run and what is missing.

Tables (under the sweep, part ``main``; rerunning replaces them):

* ``neurons_modes`` (run x step x activation layer): ``opt``, ``npt``, ``dead``, ``lin_dloss``,
  ``lin_dacc`` (linearised minus actual train loss / accuracy on the evaluation samples);
* ``neurons_summary`` (one row per run, at its last chosen step; phase-map metrics):
  ``opt_fraction`` (mean over layers), ``opt_fraction_l0``, ``opt_fraction_l1``, ...,
  ``npt_fraction``, ``dead_fraction``, ``basin_sample``, ``basin_weight``, ``neurons_step``, and
  ``basin_sample_censored`` (fraction of samples whose radius hit the largest one tried) and
  ``basin_weight_censored`` (the largest sigma tried kept the accuracy: e.g. a model at chance).

During training, ``train.record: [neurons]`` records the OPT/NPT/dead fractions at every record
in the ``metrics`` table instead (list columns ``neuron_opt``, ``neuron_npt``, ``neuron_dead``);
the report draws their time course next to test accuracy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import (Job, Unit, group_units, load_buffers, load_trajectories, plugin_paths,
                              rebuilt_model, run_config)
from raydyn.jobs.options import Options, option
from raydyn.jobs.registry import Analysis, register
from raydyn.store.schema import WeightsLayout

MODES_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("step", pa.int64()), ("layer", pa.string()), ("layer_index", pa.int64()),
    ("opt", pa.float64()), ("npt", pa.float64()), ("dead", pa.float64()),
    ("lin_dloss", pa.float64()), ("lin_dacc", pa.float64()),
])


def not_full_message(run_id: str, layout: WeightsLayout) -> str:
    return (f"run {run_id}: the neurons analysis loads the weights back into the model, but this run stored "
            f"{'no' if layout.kind is None else layout.kind!r} snapshots, not every parameter. Record full snapshots "
            "(train.record: [weights], train.weights.max_size above the parameter count, no train.weights.layers), "
            "or record the modes during training with train.record: [neurons].")


def no_model_message(run_id: str, sweep: str, why: str, more: str = "") -> str:
    from raydyn.tasks.build import REBUILD_NEEDS

    return (f"run {run_id}{more}: the neurons analysis loads the snapshots back into the run's model, rebuilt from "
            f"its config, but this run of tracked sweep {sweep!r} (logged with raydyn.track or imported) cannot be "
            f"rebuilt: {why}. Log it with {REBUILD_NEEDS}.")


def pick_steps(available: np.ndarray, steps: str) -> list[int]:
    """Indices into ``available`` (sorted recorded steps) for ``--steps`` (last | all | comma list)."""
    if steps == "last":
        return [len(available) - 1]
    if steps == "all":
        return list(range(len(available)))
    try:
        want = [int(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise RaydynError(f"--steps {steps!r}: give 'last', 'all' or comma-separated step numbers") from None
    return sorted({int(np.argmin(np.abs(available - w))) for w in want})


@dataclass(frozen=True)
class NeuronsOptions(Options):
    steps: str = option("last", "Snapshot steps to analyse: last, all, or e.g. 0,500,1000 (nearest recorded). Basins "
                        "are computed at the last of them.")
    samples: int = option(256, "Training samples whose sample-space basin is measured.")
    directions: int = option(32, "Random input directions per sample.")
    draws: int = option(8, "Weight-noise draws for the weight-space basin.")
    eval_size: int = option(2048, "Training samples the modes and probes are measured on.", cli=False)
    seed: int = option(0, "Seed of directions and noise.")

    def check(self) -> None:
        for name in ("samples", "directions", "draws"):
            if getattr(self, name) < 1:
                raise RaydynError(f"{self.flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.steps not in ("last", "all"):
            pick_steps(np.array([0]), self.steps)  # validates the list


class NeuronsJob(Job):
    """Neuron modes (OPT/NPT/dead), linearity probes and attraction basins per run (after Lin et al. 2025).

    Needs full weight snapshots. Writes neurons_modes and neurons_summary (phase-map metrics opt_fraction,
    opt_fraction_l0, ..., basin_sample, basin_weight).
    """

    name = "neurons"
    Options = NeuronsOptions

    # driver -------------------------------------------------------------------
    def plan(self, store, sweep: str) -> list[Unit]:
        runs = store.table("runs", sweep=sweep, columns=["run_id", "status", "weights_layout"])
        units = group_units(runs, None)
        layouts = {r: WeightsLayout.from_json(lay)
                   for r, lay in zip(runs.column("run_id").to_pylist(), runs.column("weights_layout").to_pylist())}
        full = [u for u in units if layouts[u.key].is_full]
        if units and not full:
            raise RaydynError(not_full_message(units[0].key, layouts[units[0].key])
                              + (f" ({len(units) - 1} more runs of sweep {sweep!r} alike)" if len(units) > 1 else ""))
        from raydyn.track import is_tracked

        if units and is_tracked(store, sweep):  # runs trained outside raydyn: rebuildable only by the plug-in contract
            from raydyn.tasks.build import rebuild_config

            t = store.table("runs", sweep=sweep, columns=["run_id", "config_json"])
            cfgs = {r: json.loads(c) for r, c in zip(t.column("run_id").to_pylist(),
                                                      t.column("config_json").to_pylist())}
            units = [Unit(u.key, u.run_ids, {**u.info, "plugin_paths": plugin_paths(cfgs[u.key])}) for u in units]
            why = {u.key: rebuild_config(store, sweep, cfgs[u.key], layouts[u.key])[1]
                   for u in full}
            if full and all(why.values()):  # not one run to analyse: say so once, before fanning out
                first = sorted(why)[0]
                more = f" (and {len(why) - 1} more that cannot be rebuilt either)" if len(why) > 1 else ""
                raise RaydynError(no_model_message(first, sweep, why[first], more))
        return units

    # worker -------------------------------------------------------------------
    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        import torch
        from torch.nn.utils import vector_to_parameters

        from raydyn.analysis.neurons import linearity_probe, neuron_modes, sample_basin, weight_basin
        from raydyn.train.neurons import REF_SIZE, layer_names
        from raydyn.train.objectives import loss_fn

        torch.set_num_threads(1)  # one run per task, one CPU per task
        o = self.options
        (rid,) = unit.run_ids
        cfg, layout = run_config(store, sweep, rid)
        if not layout.is_full:
            raise RaydynError(not_full_message(rid, layout))
        from raydyn.tasks import registry
        from raydyn.tasks.build import load_snapshot, rebuild_config
        from raydyn.tasks.plugins import add_search_path

        add_search_path(*unit.info.get("plugin_paths", ()))  # a tracked run's plug-in modules, as the driver found them
        cfg, why = rebuild_config(store, sweep, cfg, layout)
        if why:
            raise RaydynError(no_model_message(rid, sweep, why))

        if registry.model(cfg["model"]).trainer != "population":
            raise RaydynError(f"run {rid}: model {cfg['model']!r} (an optimiser on a test function) has no neurons")
        model, data = rebuilt_model(cfg, layout, rid, store, sweep)
        model = model.double().eval()  # running statistics (loaded per step below), no dropout
        data = data.to(torch.float64)
        bufs = load_buffers(store, sweep, rid)
        names = layer_names(model)
        if not names:
            raise RaydynError(f"run {rid}: the model has no ReLU-like activation layer (activation "
                              f"{cfg.get('activation')!r}); OPT/NPT modes are defined for ReLU-like neurons")
        steps, x, _ = load_trajectories(store, sweep, [rid])[rid]
        picks = pick_steps(np.asarray(steps), o.steps)
        params = list(model.parameters())

        labelled = data.kind in ("classification", "binary")
        x_ref, _ = data.head("train", REF_SIZE)
        X, y = data.head("train", o.eval_size)
        if data.kind == "binary":
            y_cls = (y > 0).long()
            loss = lambda out, yy: loss_fn(cfg.get("loss") or data.default_loss, out, yy.double() * 2 - 1)  # noqa: E731
        else:
            y_cls = y
            loss = lambda out, yy: loss_fn(cfg.get("loss") or data.default_loss, out, yy)  # noqa: E731
        rows = []
        basin_s = basin_w = cens_s = float("nan")
        cens_w = None
        for k in picks:
            if not np.isfinite(x[k]).all():
                raise RaydynError(f"run {rid} has NaN/inf weights at step {int(steps[k])} (diverged); choose "
                                  "earlier --steps")
            vector_to_parameters(torch.as_tensor(x[k], dtype=torch.float64), params)
            if bufs is not None:
                load_snapshot(model, layout, x[k], bufs[k])
            modes = neuron_modes(model, x_ref)
            lin = linearity_probe(model, X, y_cls, loss_fn=loss) if labelled else None
            for j, n in enumerate(names):
                opt, npt, dead = modes[n]
                rows.append({"run_id": rid, "step": int(steps[k]), "layer": n, "layer_index": j, "opt": opt,
                             "npt": npt, "dead": dead,
                             "lin_dloss": lin.delta_loss[n] if lin else float("nan"),
                             "lin_dacc": lin.delta_accuracy[n] if lin else float("nan")})
        # basins at the last chosen step (the weights loaded now)
        if labelled:
            n_s = min(o.samples, X.shape[0])
            if X.is_floating_point():
                sb = sample_basin(model, X[:n_s], n_directions=o.directions, seed=o.seed)
                basin_s, cens_s = float(sb.median), float(np.mean(sb.censored))
            wb = weight_basin(model, X, y_cls, n_draws=o.draws, seed=o.seed)
            basin_w, cens_w = float(wb.sigma), bool(wb.censored)
        last = [r for r in rows if r["step"] == int(steps[picks[-1]])]
        summary = {"run_id": rid, "neurons_step": int(steps[picks[-1]]),
                   "opt_fraction": float(np.mean([r["opt"] for r in last])),
                   "npt_fraction": float(np.mean([r["npt"] for r in last])),
                   "dead_fraction": float(np.mean([r["dead"] for r in last])),
                   "basin_sample": basin_s, "basin_weight": basin_w,
                   # censored: the largest radius tried kept the prediction (e.g. a model at chance level)
                   "basin_sample_censored": cens_s, "basin_weight_censored": cens_w}
        for r in last:
            summary[f"opt_fraction_l{r['layer_index']}"] = r["opt"]
        return {"neurons_modes": pa.Table.from_pylist(rows, schema=MODES_SCHEMA),
                "neurons_summary": pa.Table.from_pylist([summary])}


# the probe's columns alone (train.record: [neurons], no `analyze neurons` yet) get a report section too
register(Analysis(NeuronsJob, report="raydyn.plots.neurons:report_section", tables=("neurons_", "metrics")))
