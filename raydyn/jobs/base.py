"""The Job contract and its runner (the runner delegates every Ray call to raydyn.fanout)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
import pyarrow.compute as pc

from raydyn.errors import RaydynError
from raydyn.jobs.options import Options
from raydyn.store.schema import WeightsLayout


@dataclass(frozen=True)
class Unit:
    """One unit of work: a key (used in messages and tables), its run ids, and group values."""

    key: str
    run_ids: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


class Job:
    """Subclass per analysis. ``compute`` runs on Ray workers and must be picklable (module-level class).

    ``name`` is the analysis' name (``raydyn analyze <name>``, its tables' prefix); ``Options`` its options
    dataclass (a :class:`raydyn.jobs.options.Options`). ``Job(options)`` or ``Job(field=value, ...)``;
    the job reads ``self.options.<field>``. Register it once with :func:`raydyn.jobs.registry.register`.
    """

    name: str = ""
    Options: type = Options

    def __init__(self, options: Options | None = None, /, **fields: Any):
        if options is None:
            options = self.Options(**fields)
        elif fields or not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__}: give one {self.Options.__name__} or its fields as keywords")
        self.options = options

    # driver -----------------------------------------------------------------
    def plan(self, store, sweep: str) -> list[Unit]:
        raise NotImplementedError

    def finish(self, store, sweep: str, tables: dict[str, pa.Table], results: list[tuple[Unit, Any]]
               ) -> dict[str, pa.Table]:
        """Combine on the driver. ``tables``: the units' table results concatenated by name;
        ``results``: every successful (unit, value) pair, for jobs whose units return other
        things than tables (e.g. one HMM fit). Default: nothing more."""
        return {}

    # worker -----------------------------------------------------------------
    def compute(self, store, sweep: str, unit: Unit) -> Any:
        """One unit on a Ray worker: a dict of table name -> Arrow table, or any picklable value."""
        raise NotImplementedError


def group_units(runs: pa.Table, group_by: list[str] | None, status: tuple[str, ...] = ("completed",)) -> list[Unit]:
    """Units from the runs table: one per run (no group_by) or one per distinct group_by value."""
    for g in group_by or []:
        if g not in runs.column_names:
            raise RaydynError(f"--group-by {g!r} is not a column of the runs table; columns: {', '.join(runs.column_names)}")
    d = runs.to_pydict()
    keep = [i for i, s in enumerate(d["status"]) if s in status]
    if not group_by:
        return [Unit(d["run_id"][i], (d["run_id"][i],), {}) for i in keep]
    groups: dict[tuple, list[str]] = {}
    for i in keep:
        groups.setdefault(tuple(d[g][i] for g in group_by), []).append(d["run_id"][i])
    return [Unit(",".join(f"{g}={v}" for g, v in zip(group_by, key)), tuple(ids), dict(zip(group_by, key)))
            for key, ids in sorted(groups.items(), key=lambda kv: str(kv[0]))]


def _compute_unit(payload: tuple[Job, Unit], shared: dict[str, Any]) -> Any:
    from raydyn.store import open_store

    job, unit = payload
    return job.compute(open_store(shared["store_uri"]), shared["sweep"], unit)


@dataclass
class JobOutcome:
    units: int
    failed: dict[str, str]
    tables: dict[str, int]


def run_job(job: Job, store, sweep: str, *, progress: Callable[[int, int, int], None] | None = None,
            tag: str = "main") -> JobOutcome:
    """Plan, fan out, finish, and write every table of ``job`` for ``sweep`` (part ``tag``).

    Re-running a job with the same tag replaces its previous tables (atomically per table).
    """
    from raydyn import fanout

    if sweep not in store.sweeps():
        known = store.sweeps()
        raise RaydynError(f"no sweep named {sweep!r} in store {store.uri}"
                          + (f"; sweeps there: {', '.join(known)}" if known else ""))
    units = job.plan(store, sweep)
    if not units:
        raise RaydynError(f"{job.name}: nothing to analyse in sweep {sweep!r} (no completed runs match)")
    outcomes = fanout.map_tasks(_compute_unit, [(job, u) for u in units],
                                shared={"store_uri": store.uri, "sweep": sweep}, progress=progress)
    failed = {units[o.index].key: o.error for o in outcomes if o.error}
    parts: dict[str, list[pa.Table]] = {}
    results = [(units[o.index], o.value) for o in outcomes if not o.error]
    for _, value in results:
        if isinstance(value, dict):
            for name, t in value.items():
                if isinstance(t, pa.Table):
                    parts.setdefault(name, []).append(t)
    tables = {name: pa.concat_tables(ts, promote_options="permissive") for name, ts in parts.items()}
    tables.update(job.finish(store, sweep, tables, results))
    opts = json.dumps(job.options.record(), sort_keys=True, default=str)
    for name, t in tables.items():
        if t.num_rows:
            t = t.append_column("options_json", pa.array([opts] * t.num_rows, pa.string()))
        store.write_part(name, sweep, tag, t)
    return JobOutcome(len(units), failed, {k: v.num_rows for k, v in tables.items()})


def run_filter(run_ids) -> pc.Expression:
    return pc.field("run_id").isin(list(run_ids))


def run_config(store, sweep: str, run_id: str) -> tuple[dict[str, Any], WeightsLayout]:
    """A run's ``(config, weights_layout)`` from its runs row."""
    row = store.table("runs", sweep=sweep, columns=["run_id", "config_json", "weights_layout"],
                      filter=run_filter([run_id])).to_pylist()[0]
    return json.loads(row["config_json"]), WeightsLayout.from_json(row["weights_layout"])


def rebuilt_model(cfg: dict[str, Any], layout: WeightsLayout, run_id: str, store=None, sweep: str | None = None):
    """``(model, data)`` of a run, built from its config, its parameter order checked against the
    snapshot layout (RaydynError when the snapshots cannot be loaded back into it). With ``store`` and
    ``sweep``, relative data paths resolve against the directory the sweep was launched from."""
    from raydyn.tasks.build import check_param_order
    from raydyn.train.replay import run_model

    meta = (store.sweep_meta(sweep) or {}) if store is not None and sweep else {}
    model, data = run_model(cfg, base_dir=meta.get("base_dir"))
    try:
        check_param_order(model, layout, f"run {run_id}")
    except ValueError as e:
        raise RaydynError(str(e)) from None
    return model, data


def load_buffers(store, sweep: str, run_id: str) -> "np.ndarray | None":
    """A run's stored buffer snapshots (T, B) in step order (the weights table's ``buffers`` column: batch
    norm running statistics), or None when the run has none."""
    import numpy as np

    w = store.table("weights", sweep=sweep, filter=run_filter([run_id]))
    if "buffers" not in w.column_names or w.num_rows == 0 or w.column("buffers").null_count == w.num_rows:
        return None
    order = np.argsort(w.column("step").to_numpy())
    flat = w.column("buffers").combine_chunks()
    dim = len(flat[0])
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)[order].astype(np.float64)


def load_trajectories(store, sweep: str, run_ids, layers: list[str] | None = None, keep_dtype: bool = False,
                      ) -> dict[str, tuple["np.ndarray", "np.ndarray", WeightsLayout]]:
    """Weight trajectories of runs: run_id -> (steps (T,), weights (T, D) float64, layout).

    ``layers`` keeps only stored parameters whose names start with one of the prefixes
    (possible when the run stored full parameter vectors, not a sketch). ``keep_dtype``: the
    weights in their stored precision (float32 unless ``train.weights.dtype: float64``), so
    an analysis can tell rounding noise from signal (the Koopman DMD rank cutoff does).
    """
    import numpy as np

    runs = store.table("runs", sweep=sweep, columns=["run_id", "weights_layout"], filter=run_filter(run_ids))
    layouts = {r: WeightsLayout.from_json(lay)
               for r, lay in zip(runs.column("run_id").to_pylist(), runs.column("weights_layout").to_pylist())}
    w = store.table("weights", sweep=sweep, columns=["run_id", "step", "weights"], filter=run_filter(run_ids))
    if w.num_rows == 0:
        raise RaydynError(f"sweep {sweep!r} has no weight snapshots for runs {', '.join(list(run_ids)[:3])}...: "
                          "record them with `train.record: [weights]`")
    out = {}
    rid = np.array(w.column("run_id").to_pylist(), dtype=object)
    steps = w.column("step").to_numpy()
    flat = w.column("weights").combine_chunks()
    dim = len(flat[0])
    mat = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    for r in run_ids:
        sel = np.nonzero(rid == r)[0]
        if not len(sel):
            continue
        order = sel[np.argsort(steps[sel])]
        x = mat[order] if keep_dtype else mat[order].astype(np.float64)
        layout = layouts.get(r, WeightsLayout())
        if layers:
            if layout.is_sketch:
                raise RaydynError(f"run {r}: --layers needs full snapshots, but this run stored a CountSketch "
                                  f"({layout.dim} dims); record fewer parameters with train.weights.layers")
            keep = layout.select(layers)
            if not keep:
                raise RaydynError(f"--layers {layers} match no stored parameter of run {r}; "
                                  f"stored: {', '.join(layout.names)}")
            x = np.concatenate([x[:, p.cols] for p in keep], axis=1)
        out[r] = (steps[order], x, layout)
    return out


# ------------------------------------------------------------------------------ runs trained outside raydyn
def __getattr__(name: str):
    """``REBUILD_NEEDS`` and ``rebuild_config``: the rule lives with the model builders (``Store.model`` uses
    it too), imported on first use so that listing the analyses does not import torch."""
    if name in ("REBUILD_NEEDS", "rebuild_config"):
        from raydyn.tasks import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def plugin_paths(cfg: dict[str, Any]) -> list[str]:
    """Folders the driver imported a run's plug-in model/data-set modules from (given to Ray workers, which
    may not find a module of the directory the command was run in; a tracked sweep records no base_dir)."""
    from raydyn.tasks import registry
    from raydyn.tasks.plugins import is_import_path, search_paths

    names = []
    for key, lookup in (("model", registry.model), ("dataset", registry.dataset)):
        v = cfg.get(key)
        if isinstance(v, str) and is_import_path(v):
            names.append(v)
            try:
                lookup(v)  # imports the module here (from the working directory too)
            except Exception:  # the worker says what is wrong with it
                pass
    return search_paths(*names)
