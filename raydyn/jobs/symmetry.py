"""Broken conservation laws of symmetry (Kunin et al., ICLR 2021) over a sweep, one run per Ray task.

Reads what ``train.record: [symmetry]`` wrote during training (``symmetry_steps``: every
group's quantity and drive at every step; ``symmetry_groups``: units and hyperparameters, see
:mod:`raydyn.train.symmetry`) and, per run and per (kind, layer), predicts each quantity's
trajectory from its value at the first step, the hyperparameters and the recorded drives with
:func:`raydyn.analysis.symmetry.predict`: the exact discrete law of the SGD update and the
paper's continuous modified-gradient-flow solution. Only ``torch.optim.SGD`` semantics without
Nesterov at one constant learning rate are covered: runs with another optimiser, Nesterov,
``fixed_norm``, a schedule or warm-up, or gradient clipping (:func:`~raydyn.analysis.symmetry.
law_refusal`), and layers whose groups mix the ``embed_lr`` and the base param group, are
*refused*: the measured break is written, the errors are NaN and ``refused`` says why. Layers of
the embedding param group are predicted with ``embed_lr`` / ``embed_weight_decay``.

Tables (under the sweep, part ``main``; rerunning replaces them):

* ``symmetry_laws`` (run x kind x layer x method): ``n_units``, ``steps``, ``rel_err_max`` and
  ``rel_err_median`` over the layer's units of :func:`raydyn.analysis.symmetry.relative_error`
  (sup-norm error of the predicted trajectory over the sup norm of the measured one),
  ``break`` (see below) and ``refused`` (why there is no law, or null);
* ``symmetry_summary`` (one row per run; phase-map metrics): ``sym_exact_err`` and
  ``sym_continuous_err`` (largest ``rel_err_max`` over layers), ``sym_refused`` (why the run's
  laws were refused, or null), and per kind
  ``sym_<kind>_break``: how far the quantity moved over training, median over the layer's
  units of ``|q_T - q_0|`` divided by the median of ``|q_0|``, averaged over the kind's layers
  (0 for a conserved quantity; with weight decay alone, translation gives
  ``1 - (1 - lr wd)^T``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.errors import RaydynError
from raydyn.jobs.base import Job, Unit, group_units, run_filter
from raydyn.jobs.options import Options, option
from raydyn.jobs.registry import Analysis, register

METHODS = ("exact", "continuous")
KINDS = ("translation", "scale", "rescale")
SUMMARY_SCHEMA = pa.schema(
    [("run_id", pa.string()), ("sym_exact_err", pa.float64()), ("sym_continuous_err", pa.float64())]
    + [(f"sym_{k}_break", pa.float64()) for k in KINDS] + [("sym_refused", pa.string())]
)
LAWS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("kind", pa.string()), ("layer", pa.string()), ("method", pa.string()),
    ("n_units", pa.int64()), ("steps", pa.int64()), ("rel_err_max", pa.float64()),
    ("rel_err_median", pa.float64()), ("break", pa.float64()), ("refused", pa.string()),
])
NOT_RECORDED = ("sweep {sweep!r} has no symmetry recordings: add `symmetry` to `train.record` in the sweep file "
                "(it records every symmetry group's quantity and gradient norm at every step) and run it")
NOT_RECORDED_TRACKED = (
    "sweep {sweep!r} is a tracked sweep (runs logged with raydyn.track or imported), and its runs {runs} have no "
    "symmetry recordings: the laws need every step's symmetry quantities and gradient norms, which only raydyn's "
    "trainer records (`train.record: [symmetry]` in a sweep file run with `raydyn sweep run`); weight snapshots "
    "logged every few steps cannot stand in for them")


def _layer_key(layer: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in layer.split("."))


def run_series(store, sweep: str, run_id: str) -> list[dict[str, Any]]:
    """One run's recordings: per (kind, layer), steps (T,), q (T, U), drive (T, U), units (U,) and hyperparameters.

    Raises RaydynError when the run has no recordings, or its steps are not consecutive.
    """
    groups = store.table("symmetry_groups", sweep=sweep, filter=run_filter([run_id])).to_pylist()
    if not groups:
        raise RaydynError(f"run {run_id} of sweep {sweep!r} has no symmetry recordings (train.record: [symmetry])")
    t = store.table("symmetry_steps", sweep=sweep, columns=["kind", "layer", "step", "q", "drive"],
                    filter=run_filter([run_id]))
    kinds, layers = t.column("kind").to_pylist(), t.column("layer").to_pylist()
    steps = t.column("step").to_numpy()
    out = []
    for g in sorted(groups, key=lambda g: (KINDS.index(g["kind"]), _layer_key(g["layer"]))):
        sel = np.array([i for i, (k, la) in enumerate(zip(kinds, layers)) if k == g["kind"] and la == g["layer"]],
                       dtype=np.int64)
        if not len(sel):
            continue
        sel = sel[np.argsort(steps[sel], kind="stable")]
        st = steps[sel]
        if len(st) > 1 and not np.all(np.diff(st) == 1):
            gap = int(np.flatnonzero(np.diff(st) != 1)[0])
            raise RaydynError(f"run {run_id}: symmetry recordings of {g['kind']} layer {g['layer']} skip from step "
                              f"{st[gap]} to {st[gap + 1]}; the laws need every step (a corrupt or mixed store part?)")
        sub = t.take(pa.array(sel))
        U = len(g["units"])
        q = np.asarray(sub.column("q").combine_chunks().flatten(), dtype=np.float64).reshape(len(sel), U)
        d = np.asarray(sub.column("drive").combine_chunks().flatten(), dtype=np.float64).reshape(len(sel), U)
        out.append({**g, "steps": st, "q": q, "drive": d, "units": np.asarray(g["units"], dtype=np.int64)})
    return out


def supported(series: dict[str, Any], cfg: dict[str, Any] | None = None) -> str | None:
    """None when the laws cover this run (its recorded optimiser and, given, its config), else why not."""
    from raydyn.analysis.symmetry import law_refusal

    return law_refusal({**(cfg or {}), "optimizer": series["optimizer"], "nesterov": series["nesterov"]})


def predicted(series: dict[str, Any], method: str, cfg: dict[str, Any] | None = None,
              hparams: tuple[float, float] | str | None = None) -> np.ndarray:
    """The law's prediction of ``series['q']`` (T, U) from its first row.

    ``hparams``: the layer's (lr, weight decay) when they differ from the run's (its own param
    group), or the reason it has none. Raises RaydynError naming the reason when there is no law.
    """
    from raydyn.analysis.symmetry import predict

    why = supported(series, cfg) or (hparams if isinstance(hparams, str) else None)
    if why is not None:
        raise RaydynError(f"no symmetry law for this run: {why}")
    lr, wd = hparams if hparams is not None else (series["lr"], series["weight_decay"])
    q, d = series["q"], series["drive"]
    return predict(series["kind"], q[0], len(q) - 1, lr, wd, series["momentum"],
                   sq_norms=d[:-1] if series["kind"] != "translation" else None, method=method,
                   dampening=series["dampening"])


def _nan_if_refused(series: dict[str, Any], method: str) -> np.ndarray:
    try:
        return predicted(series, method)
    except RaydynError:
        return np.full_like(series["q"], np.nan)


def layer_params(cfg: dict[str, Any], series: list[dict[str, Any]], no_model: str | None = None
                 ) -> dict[tuple[str, str], Any]:
    """(kind, layer) -> (lr, weight decay) or a refusal, for runs whose embedding param group has its own
    hyperparameters (the model is rebuilt from the config to see which parameters each group holds).
    ``no_model``: why the config cannot rebuild the model (a tracked run's): every layer is refused with it."""
    from raydyn.analysis.symmetry import find_groups, layer_hyperparameters
    from raydyn.train.replay import run_model

    if cfg.get("embed_lr") is None and cfg.get("embed_weight_decay") is None or not series:
        return {}
    if no_model:
        why = (f"embed_lr/embed_weight_decay are set, but the run's model cannot be rebuilt to find their param "
               f"group: {no_model}")
        return {(s["kind"], s["layer"]): why for s in series}
    model, _ = run_model(cfg)
    return layer_hyperparameters(find_groups(model, "cross_entropy"), cfg, series[0]["lr"], series[0]["weight_decay"])


def broken(q: np.ndarray) -> float:
    """Median over units of |q_T - q_0| over the median of |q_0| (0: conserved)."""
    scale = float(np.median(np.abs(q[0])))
    change = float(np.median(np.abs(q[-1] - q[0])))
    return change / scale if scale > 0 else (0.0 if change == 0 else float("inf"))


def law_traces(store, sweep: str, run_id: str, method: str = "exact"):
    """:class:`~raydyn.analysis.symmetry.LawTrace` per (kind, layer) of one run, for plotting."""
    from raydyn.analysis.symmetry import LawTrace

    return [LawTrace(s["kind"], f"{s['layer']} ({s['module']})" if s.get("module") else s["layer"], s["steps"],
                     s["q"], _nan_if_refused(s, method), s["units"])
            for s in run_series(store, sweep, run_id)]


def _parse_method(text: str) -> tuple[str, ...]:
    if text not in (*METHODS, "both"):
        raise RaydynError(f"--method must be exact, continuous or both, got {text!r}")
    return METHODS if text == "both" else (text,)


@dataclass(frozen=True)
class SymmetryOptions(Options):
    methods: tuple[str, ...] = option(METHODS, "Laws to check: exact (the discrete SGD update), continuous (modified "
                                      "gradient flow), or both.", flag="--method", parse=_parse_method,
                                      cli_default="both")
    plots: Optional[str] = option(None, "Directory for theory-over-measured PNGs (one per run, at most --max-plots).",
                                  record=False)
    max_plots: int = option(4, "Runs to plot with --plots (evenly spread over lr).", record=False)

    def check(self) -> None:
        for m in self.methods:
            _parse_method(m)
        if self.max_plots < 1:
            raise RaydynError(f"--max-plots must be at least 1, got {self.max_plots}")
        object.__setattr__(self, "methods", tuple(self.methods))


class SymmetryJob(Job):
    """Broken conservation laws of symmetry (Kunin et al. 2021): theory vs recorded quantities, per layer.

    Needs `train.record: [symmetry]` in the sweep file. Writes symmetry_laws and symmetry_summary (phase-map
    metrics sym_exact_err, sym_continuous_err, sym_translation_break, sym_scale_break, sym_rescale_break).
    """

    name = "symmetry"
    Options = SymmetryOptions

    # driver -------------------------------------------------------------------
    def plan(self, store, sweep: str) -> list[Unit]:
        have = (set(store.table("symmetry_groups", sweep=sweep, columns=["run_id"]).column("run_id").to_pylist())
                if "symmetry_groups" in store.tables() else set())
        if not have:
            from raydyn.track import is_tracked

            if is_tracked(store, sweep):
                ids = sorted(store.table("runs", sweep=sweep, columns=["run_id"]).column("run_id").to_pylist())
                shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
                raise RaydynError(NOT_RECORDED_TRACKED.format(sweep=sweep, runs=shown or "(none yet)"))
            raise RaydynError(NOT_RECORDED.format(sweep=sweep))
        runs = store.table("runs", sweep=sweep, columns=["run_id", "status"])
        return [u for u in group_units(runs, None, status=("completed", "diverged")) if u.key in have]

    # worker -------------------------------------------------------------------
    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        from raydyn.analysis.symmetry import relative_error
        from raydyn.jobs.base import run_config

        (rid,) = unit.run_ids
        rows = []
        worst = {m: np.nan for m in METHODS}
        breaks: dict[str, list[float]] = {k: [] for k in KINDS}
        from raydyn.tasks.build import rebuild_config

        cfg, layout = run_config(store, sweep, rid)
        series = run_series(store, sweep, rid)
        run_refused = supported(series[0], cfg) if series else None
        model_cfg, no_model = rebuild_config(store, sweep, cfg, layout)  # a tracked run's config may not rebuild it
        per_layer = {} if run_refused else layer_params(model_cfg or cfg, series, no_model)
        refusals = {run_refused} if run_refused else set()
        for s in series:
            q = s["q"]
            if not np.isfinite(q).all():
                bad = int(s["steps"][np.flatnonzero(~np.isfinite(q).all(axis=1))[0]])
                raise RaydynError(f"run {rid}: {s['kind']} quantities of layer {s['layer']} are NaN/inf from step "
                                  f"{bad} (the run diverged there); nothing to compare")
            b = broken(q)
            breaks[s["kind"]].append(b)
            hp = per_layer.get((s["kind"], s["layer"]))
            why = run_refused or (hp if isinstance(hp, str) else None)
            if why:
                refusals.add(why)
            for method in self.options.methods:
                if why:
                    emax = emed = np.nan
                else:
                    err = relative_error(predicted(s, method, cfg, hp), q)
                    emax = float(np.max(err)) if err.size else np.nan
                    emed = float(np.median(err)) if err.size else np.nan
                rows.append({"run_id": rid, "kind": s["kind"], "layer": s["layer"], "method": method,
                             "n_units": int(q.shape[1]), "steps": int(q.shape[0] - 1), "rel_err_max": emax,
                             "rel_err_median": emed, "break": b, "refused": why})
                if np.isfinite(emax):
                    worst[method] = emax if np.isnan(worst[method]) else max(worst[method], emax)
        summary = {"run_id": rid, "sym_exact_err": worst["exact"], "sym_continuous_err": worst["continuous"],
                   "sym_refused": "; ".join(sorted(refusals)) or None}
        for k in KINDS:
            summary[f"sym_{k}_break"] = float(np.mean(breaks[k])) if breaks[k] else np.nan
        return {"symmetry_laws": pa.Table.from_pylist(rows, schema=LAWS_SCHEMA),
                "symmetry_summary": pa.Table.from_pylist([summary], schema=SUMMARY_SCHEMA)}


def refusal_lines(store, sweep: str) -> list[str]:
    """One line per reason why runs got no law (printed after `raydyn analyze symmetry`)."""
    refused = [r for r in store.table("symmetry_summary", sweep=sweep, columns=["sym_refused"]).column(0).to_pylist()
               if r]
    return [f"no law for {refused.count(why)} run(s): {why} (their breaks are measured, errors NaN)"
            for why in sorted(set(refused))]


register(Analysis(SymmetryJob, report="raydyn.plots.symmetry:report_section", after="raydyn.plots.symmetry:after_run"))
