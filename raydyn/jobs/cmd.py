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
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import (REBUILD_NEEDS, Job, Unit, group_units, load_trajectories, plugin_paths, rebuild_config,
                              rebuilt_model, run_config)

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


def sketch_message(run_id: str, layout: dict[str, Any], more: str = "") -> str:
    return (f"run {run_id}{more}: CMD needs the weights themselves, but this run stored a CountSketch of them "
            f"({layout.get('source_dim')} parameters projected to {layout.get('dim')} dimensions). Record full "
            "snapshots (train.weights.max_size above the parameter count, or fewer tensors with "
            "train.weights.layers), or use online CMD during training (train.record: [cmd_online]).")


class CMDJob(Job):
    name = "cmd"

    def __init__(self, modes: int | None = None, tolerance: float = 0.01, samples: int = 1000, seed: int = 0,
                 evaluate: bool = True):
        super().__init__(modes=modes, tolerance=tolerance, samples=samples, seed=seed, evaluate=evaluate)

    # driver -------------------------------------------------------------------
    def plan(self, store, sweep: str) -> list[Unit]:
        runs = store.table("runs", sweep=sweep, columns=["run_id", "status", "weights_layout"])
        units = group_units(runs, None)
        layouts = dict(zip(runs.column("run_id").to_pylist(), runs.column("weights_layout").to_pylist()))
        sketched = sorted(u.key for u in units if "countsketch" in json.loads(layouts[u.key] or "{}").get("kind", ""))
        if units and len(sketched) == len(units):
            more = f" (and {len(sketched) - 1} more of sweep {sweep!r})" if len(sketched) > 1 else ""
            raise RaydynError(sketch_message(sketched[0], json.loads(layouts[sketched[0]]), more))
        from raydyn.track import is_tracked

        if self.options["evaluate"] and is_tracked(store, sweep):  # plug-in modules the workers may not find
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
        if "countsketch" in layout.get("kind", ""):
            raise RaydynError(sketch_message(rid, layout))
        steps, x, _ = load_trajectories(store, sweep, [rid])[rid]  # (T,), (T, D)
        if not np.isfinite(x).all():
            raise RaydynError(f"run {rid} has NaN/inf weights in its snapshots; CMD needs finite trajectories")
        offs = layout["offsets"]
        layers = layer_slices(layout["names"], [offs[i + 1] - offs[i] for i in range(len(layout["names"]))])
        res = decompose(x.T, n_modes=o["modes"], tolerance=o["tolerance"], n_samples=o["samples"],
                        random_state=o["seed"], layers=layers)

        t = len(steps)
        nan = np.full(t, np.nan)
        loss_real = acc_real = loss_rec = acc_rec = loss_recal = acc_recal = nan
        skipped = None
        from raydyn.tasks.plugins import add_search_path
        from raydyn.track import is_tracked

        add_search_path(*unit.info.get("plugin_paths", ()))  # a tracked run's plug-in modules, as the driver found them
        if o["evaluate"] and layout.get("kind") != "full":
            skipped = (f"its snapshots are {layout.get('kind')!r} (a subset of the parameters); reconstructions "
                       "are evaluated only from snapshots of every parameter")
        elif o["evaluate"]:
            cfg, skipped = rebuild_config(store, sweep, cfg, layout)
            if skipped:  # a tracked run whose config cannot rebuild its model
                skipped += f". To evaluate, log the run with {REBUILD_NEEDS}"
        if o["evaluate"] and not skipped:
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
    def _evaluate(store, sweep: str, rid: str, cfg: dict[str, Any], layout: dict[str, Any], x: np.ndarray, res,
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


def register_cli(analyze_app) -> None:
    import typer

    @analyze_app.command("cmd")
    def cmd(
        sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
        modes: Optional[int] = typer.Option(None, "--modes", help="Number of modes M (instead of --tolerance)."),
        tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Use the fewest modes whose relative "
                                                  "reconstruction error is below this (default 0.01)."),
        samples: int = typer.Option(1000, "--samples", help="Parameters sampled (layer-balanced) for the clustering."),
        seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
        evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Evaluate reconstructed weights on the test set."),
        store: Optional[str] = typer.Option(None, "--store", help="Store URI (default: $RAYDYN_STORE or ./raydyn-results)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local)."),
    ) -> None:
        """Correlation mode decomposition of each run's weights (Turjeman et al. 2022): modes, errors, accuracy."""
        from raydyn.cli import run_analysis

        if modes is not None and tolerance is not None:
            raise RaydynError("give --modes or --tolerance, not both")
        if modes is not None and modes < 1:
            raise RaydynError(f"--modes must be a positive integer, got {modes}")
        if tolerance is not None and not 0 < tolerance <= 1:
            raise RaydynError(f"--tolerance must be in (0, 1] (a relative error), got {tolerance}")
        if samples < 2:
            raise RaydynError(f"--samples must be at least 2, got {samples}")
        job = CMDJob(modes=modes, tolerance=0.01 if tolerance is None else tolerance, samples=samples, seed=seed,
                     evaluate=evaluate)
        try:
            run_analysis(job, sweep, store, address)
        except typer.Exit:  # some runs failed; the others' tables were written
            print_skipped(store, sweep)
            raise
        print_skipped(store, sweep)


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


def print_skipped(store_uri: str | None, sweep: str) -> None:
    from raydyn.cli import _resolve_sweep, _store, out

    st = _store(store_uri)
    spec, _ = _resolve_sweep(sweep, st)
    for line in skipped_lines(st, spec.name):
        out.print(line, highlight=False, markup=False)


# ------------------------------------------------------------------------------ report
def result_from_tables(modes: Any, layer_errors: dict[str, float] | None = None, error: float = float("nan")):
    """A :class:`~raydyn.analysis.cmd.CMDResult` for drawing, from one run's ``cmd_modes`` rows.

    ``modes``: a pandas frame of ``cmd_modes`` (or ``cmd_online_modes``) rows of one run. The
    per-parameter assignment is rebuilt from the per-layer member counts (order within a layer
    is not stored); ``a``/``b`` are zeros. Returns ``(result, steps)``.
    """
    from raydyn.analysis.cmd import CMDResult

    modes = modes.sort_values("mode")
    refs = np.array([np.asarray(r, dtype=np.float64) for r in modes.reference])
    names = tuple(modes.layer_names.iloc[0])
    counts = np.array([np.asarray(c, dtype=np.int64) for c in modes.layer_members]).T  # (L, M)
    layer_index = np.repeat(np.arange(len(names), dtype=np.int32), counts.sum(axis=1))
    assignment = np.concatenate([np.repeat(np.arange(refs.shape[0]), counts[k]) for k in range(len(names))])
    n = assignment.size
    res = CMDResult(refs, modes.reference_index.to_numpy(np.int64), assignment.astype(np.int64), np.zeros(n),
                    np.zeros(n), float(error), dict(layer_errors or {}), np.array([refs.shape[0]]),
                    np.array([error]), layer_index, names)
    return res, np.asarray(modes.steps.iloc[0], dtype=np.int64)


def report_section(store, sweep: str, max_runs: int = 3) -> list[tuple[str, bytes]]:
    """Per kind (post-hoc, online): accuracy of reconstructed vs real weights over runs, then
    reference trajectories and modes per layer for the runs with the fewest, median and most modes."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydyn.plots.cmd import plot_cmd_layer_modes, plot_cmd_references
    from raydyn.report.html import fig_png as png

    out = []
    tables = set(store.tables())
    for label, pre in (("CMD", "cmd"), ("online CMD", "cmd_online")):
        if f"{pre}_summary" not in tables or f"{pre}_modes" not in tables:
            continue
        summary = store.table(f"{pre}_summary", sweep=sweep).to_pandas()
        if summary.empty:
            continue
        modes = store.table(f"{pre}_modes", sweep=sweep).to_pandas()
        real, rec = summary[f"{pre}_test_acc_real"], summary[f"{pre}_test_acc_recon"]
        if real.notna().any():
            fig, ax = plt.subplots(figsize=(4.6, 4.2))
            sc = ax.scatter(100 * real, 100 * rec, c=summary[f"{pre}_modes_needed"], cmap="viridis", s=22)
            lo, hi = float(np.nanmin(100 * np.r_[real, rec])), float(np.nanmax(100 * np.r_[real, rec]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel("final test accuracy, real weights (%)")
            ax.set_ylabel("reconstructed weights (%)")
            fig.colorbar(sc, ax=ax, label="modes")
            out.append((f"{label}: test accuracy of reconstructed vs real weights, {len(summary)} runs", png(fig)))
        order = summary.sort_values([f"{pre}_modes_needed", "run_id"]).run_id.tolist()
        picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))[:max_runs]
        errs = dict(zip(summary.run_id, summary[f"{pre}_recon_error"]))
        for rid in picks:
            res, steps = result_from_tables(modes[modes.run_id == rid], error=errs[rid])
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.0), gridspec_kw={"width_ratios": [3, 2]})
            plot_cmd_references(res, steps=steps, ax=axes[0])
            plot_cmd_layer_modes(res, ax=axes[1])
            fig.suptitle(f"{label}, run {rid}")
            out.append((f"{label}, run {rid}: reference trajectories and modes per layer", png(fig)))
    return out


from raydyn.report.html import SECTIONS  # noqa: E402

SECTIONS["cmd_"] = report_section
