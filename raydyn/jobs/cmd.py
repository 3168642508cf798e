"""Correlation mode decomposition of every run of a sweep, fanned out on Ray (one run per task).

For each completed run: its weight snapshots (``weights`` table, every parameter or a
layer subset; a CountSketch is refused) go through :func:`raydyn.analysis.cmd.decompose`
with the parameter tensors of ``runs.weights_layout`` as layers (layer-balanced sampling,
per-layer errors). When the snapshots hold every parameter, the reconstructed weights at
each recorded step are loaded back into the run's model (built from ``runs.config_json``,
parameter order checked against the layout) and evaluated on its test set, next to the
real snapshots evaluated the same way. Runs logged with :func:`raydyn.track` (or imported) are
evaluated only when their config names a model factory and a data set (the plug-in contract,
:func:`raydyn.jobs.base.rebuild_config`); otherwise, as for snapshots of a layer subset, the
evaluation is skipped, ``cmd_eval_skipped`` says why and ``raydyn analyze cmd`` prints it once.

Tables (written under the sweep, part ``main``; rerunning replaces them):

* ``cmd_summary`` (one row per run; the phase-map metrics): ``cmd_modes_needed`` (M: the
  fewest modes whose relative error is under ``--tolerance``, or ``--modes``),
  ``cmd_recon_error`` (``||W - W_hat||_F / ||W||_F`` over all parameters and records),
  ``cmd_max_layer_error``, and at the last recorded step ``cmd_test_acc_real``,
  ``cmd_test_acc_recon``, ``cmd_test_loss_real``, ``cmd_test_loss_recon``, ``cmd_test_acc_drop``
  (real minus reconstructed accuracy, a fraction), ``cmd_eval_skipped`` (why those are NaN, or null:
  evaluated or ``--no-eval``);
* ``cmd_modes`` (run x mode): reference parameter, its trajectory, member counts per layer;
* ``cmd_layers`` (run x parameter tensor): size, relative error, modes used;
* ``cmd_curves`` (run x recorded step): test loss/accuracy of real and reconstructed weights.

Online CMD (``train.record: [cmd_online]``, :mod:`raydyn.train.cmd_online`) writes the
``cmd_online_*`` tables during training instead; the report section draws both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import (Job, Unit, group_units, load_trajectories, plugin_paths,
                              rebuilt_model, run_config)
from raydyn.jobs.options import Options, option
from raydyn.jobs.registry import Analysis, register
from raydyn.store.schema import WeightsLayout

SUMMARY_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("cmd_modes_needed", pa.int64()), ("cmd_recon_error", pa.float64()),
    ("cmd_max_layer_error", pa.float64()), ("cmd_test_acc_real", pa.float64()), ("cmd_test_acc_recon", pa.float64()),
    ("cmd_test_loss_real", pa.float64()), ("cmd_test_loss_recon", pa.float64()), ("cmd_test_acc_drop", pa.float64()),
    # models with batch norm running statistics: the real weights with statistics recomputed on the training
    # set, as the reconstruction's are (NaN for models without running statistics)
    ("cmd_test_acc_real_recal", pa.float64()), ("cmd_test_loss_real_recal", pa.float64()),
    # why the run was not evaluated (null: it was, or --no-eval); `raydyn analyze cmd` prints it
    ("cmd_eval_skipped", pa.string()),
])


def sketch_message(run_id: str, layout: WeightsLayout, more: str = "") -> str:
    return (f"run {run_id}{more}: CMD needs the weights themselves, but this run stored a CountSketch of them "
            f"({layout.source_dim} parameters projected to {layout.dim} dimensions). Record full "
            "snapshots (train.weights.max_size above the parameter count, or fewer tensors with "
            "train.weights.layers), or use online CMD during training (train.record: [cmd_online]).")


@dataclass(frozen=True)
class CMDOptions(Options):
    modes: Optional[int] = option(None, "Number of modes M (instead of --tolerance).")
    tolerance: Optional[float] = option(None, "Use the fewest modes whose relative reconstruction error is below "
                                        "this (default 0.01).")
    samples: int = option(1000, "Parameters sampled (layer-balanced) for the clustering.")
    seed: int = option(0, "Seed of the sampling.")
    evaluate: bool = option(True, "Evaluate reconstructed weights on the test set.", flag="--eval/--no-eval")

    def check(self) -> None:
        if self.modes is not None and self.tolerance is not None:
            raise RaydynError("give --modes or --tolerance, not both")
        if self.modes is not None and self.modes < 1:
            raise RaydynError(f"--modes must be a positive integer, got {self.modes}")
        if self.tolerance is not None and not 0 < self.tolerance <= 1:
            raise RaydynError(f"--tolerance must be in (0, 1] (a relative error), got {self.tolerance}")
        if self.samples < 2:
            raise RaydynError(f"--samples must be at least 2, got {self.samples}")
        if self.tolerance is None:  # the default tolerance (with --modes it is not used)
            object.__setattr__(self, "tolerance", 0.01)


class CMDJob(Job):
    """Correlation mode decomposition of each run's weights (Turjeman et al. 2022): modes, errors, accuracy."""

    name = "cmd"
    Options = CMDOptions

    # driver -------------------------------------------------------------------
    def plan(self, store, sweep: str) -> list[Unit]:
        runs = store.table("runs", sweep=sweep, columns=["run_id", "status", "weights_layout"])
        units = group_units(runs, None)
        layouts = {r: WeightsLayout.from_json(lay)
                   for r, lay in zip(runs.column("run_id").to_pylist(), runs.column("weights_layout").to_pylist())}
        sketched = sorted(u.key for u in units if layouts[u.key].is_sketch)
        if units and len(sketched) == len(units):
            more = f" (and {len(sketched) - 1} more of sweep {sweep!r})" if len(sketched) > 1 else ""
            raise RaydynError(sketch_message(sketched[0], layouts[sketched[0]], more))
        from raydyn.track import is_tracked

        if self.options.evaluate and is_tracked(store, sweep):  # plug-in modules the workers may not find
            t = store.table("runs", sweep=sweep, columns=["run_id", "config_json"])
            cfgs = dict(zip(t.column("run_id").to_pylist(), t.column("config_json").to_pylist()))
            units = [Unit(u.key, u.run_ids, {**u.info, "plugin_paths": plugin_paths(json.loads(cfgs[u.key]))})
                     for u in units]
        return units

    # worker -------------------------------------------------------------------
    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        import torch

        from raydyn.analysis.cmd import decompose
        from raydyn.train.cmd_online import layer_slices, layers_table, modes_table

        torch.set_num_threads(1)  # one run per task, one CPU per task
        o = self.options
        (rid,) = unit.run_ids
        cfg, layout = run_config(store, sweep, rid)
        if layout.is_sketch:
            raise RaydynError(sketch_message(rid, layout))
        steps, x, _ = load_trajectories(store, sweep, [rid])[rid]  # (T,), (T, D)
        if not np.isfinite(x).all():
            raise RaydynError(f"run {rid} has NaN/inf weights in its snapshots; CMD needs finite trajectories")
        layers = layer_slices(list(layout.names), list(layout.sizes))
        res = decompose(x.T, n_modes=o.modes, tolerance=o.tolerance, n_samples=o.samples,
                        random_state=o.seed, layers=layers)

        t = len(steps)
        nan = np.full(t, np.nan)
        loss_real = acc_real = loss_rec = acc_rec = loss_recal = acc_recal = nan
        skipped = None
        from raydyn.tasks.build import REBUILD_NEEDS, rebuild_config
        from raydyn.tasks.plugins import add_search_path
        from raydyn.track import is_tracked

        add_search_path(*unit.info.get("plugin_paths", ()))  # a tracked run's plug-in modules, as the driver found them
        if o.evaluate and not layout.is_full:
            skipped = (f"its snapshots are {layout.kind!r} (a subset of the parameters); reconstructions "
                       "are evaluated only from snapshots of every parameter")
        elif o.evaluate:
            cfg, skipped = rebuild_config(store, sweep, cfg, layout)
            if skipped:  # a tracked run whose config cannot rebuild its model
                skipped += f". To evaluate, log the run with {REBUILD_NEEDS}"
        if o.evaluate and not skipped:
            try:
                loss_real, acc_real, loss_rec, acc_rec, loss_recal, acc_recal = self._evaluate(
                    store, sweep, rid, cfg, layout, x, res, t)
            except Exception as e:
                if not is_tracked(store, sweep):  # raydyn's own config: a bug to report, as before
                    raise
                # a tracked run whose config names a factory: the decomposition stands; say why it was not evaluated
                loss_real = acc_real = loss_rec = acc_rec = loss_recal = acc_recal = nan
                skipped = (f"rebuilding and evaluating its model from its config failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}")
        summary = pa.Table.from_pylist([{
            "run_id": rid, "cmd_modes_needed": res.n_modes, "cmd_recon_error": res.error,
            "cmd_max_layer_error": max(res.layer_errors.values()),
            "cmd_test_acc_real": acc_real[-1], "cmd_test_acc_recon": acc_rec[-1],
            "cmd_test_loss_real": loss_real[-1], "cmd_test_loss_recon": loss_rec[-1],
            "cmd_test_acc_drop": (acc_recal[-1] if np.isfinite(acc_recal[-1]) else acc_real[-1]) - acc_rec[-1],
            "cmd_test_acc_real_recal": acc_recal[-1], "cmd_test_loss_real_recal": loss_recal[-1],
            "cmd_eval_skipped": skipped,
        }], schema=SUMMARY_SCHEMA)
        curves = pa.table({
            "run_id": pa.array([rid] * t, pa.string()), "step": pa.array(np.asarray(steps, dtype=np.int64)),
            "test_loss_real": loss_real, "test_acc_real": acc_real,
            "test_loss_recon": loss_rec, "test_acc_recon": acc_rec,
        })
        return {"cmd_summary": summary, "cmd_modes": modes_table(rid, res, steps),
                "cmd_layers": layers_table(rid, res), "cmd_curves": curves}

    @staticmethod
    def _evaluate(store, sweep: str, rid: str, cfg: dict[str, Any], layout: WeightsLayout, x: np.ndarray, res,
                  t: int) -> tuple[np.ndarray, ...]:
        """Test loss and accuracy per recorded step of the real weights, of the reconstruction and of the
        real weights with recomputed batch norm statistics (all NaN for a model without a network)."""
        from raydyn.tasks import registry

        loss_real = acc_real = loss_rec = acc_rec = loss_recal = acc_recal = np.full(t, np.nan)
        if registry.model(cfg["model"]).trainer == "population":
            from raydyn.jobs.base import load_buffers
            from raydyn.train.replay import evaluate_vectors

            model, data = rebuilt_model(cfg, layout, rid, store, sweep)
            # models with running statistics: the real weights with the run's own statistics at each step;
            # a reconstruction has none of its own, so its batch norm statistics are recomputed on the
            # training set (as for averaged weights, torch.optim.swa_utils.update_bn)
            bufs = load_buffers(store, sweep, rid)
            loss_real, acc_real = evaluate_vectors(model, data, cfg.get("loss"), x, bufs, layout)
            loss_rec, acc_rec = evaluate_vectors(model, data, cfg.get("loss"),
                                                 (res.reconstruct_at(k) for k in range(t)), bufs, layout,
                                                 recalibrate=bufs is not None)
            if bufs is not None:  # like for like: the real weights with recomputed statistics too
                loss_recal, acc_recal = evaluate_vectors(model, data, cfg.get("loss"), x, recalibrate=True)
        return loss_real, acc_real, loss_rec, acc_rec, loss_recal, acc_recal


def skipped_lines(store, sweep: str) -> list[str]:
    """One line per distinct reason why runs of ``sweep`` were not evaluated (``cmd_summary.cmd_eval_skipped``)."""
    from raydyn.errors import StoreError

    try:
        rows = store.table("cmd_summary", sweep=sweep, columns=["run_id", "cmd_eval_skipped"]).to_pylist()
    except StoreError:  # no cmd_summary (every unit failed), or one written before the column existed
        return []
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if r["cmd_eval_skipped"]:
            by_reason.setdefault(r["cmd_eval_skipped"], []).append(r["run_id"])
    return [f"CMD evaluation skipped for {len(ids)} of {len(rows)} run(s) (run {sorted(ids)[0]}"
            + (f" and {len(ids) - 1} more" if len(ids) > 1 else "") + f"): {why}. The decomposition tables are "
            "written; the cmd_test_* columns are NaN." for why, ids in sorted(by_reason.items())]


def print_skipped(store, sweep: str, options: CMDOptions) -> list[str]:
    """After `raydyn analyze cmd`: why runs were not evaluated."""
    return skipped_lines(store, sweep)


register(Analysis(CMDJob, report="raydyn.plots.cmd:report_section", after=print_skipped))
