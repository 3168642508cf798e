"""Build a run's model and data from its config (the one place that turns a config into tensors).

Used by the population trainer, the reference loop, the analyses that load weights back
(CMD, neurons) and :meth:`raydyn.store.Store.model`, so all of them build the same thing.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from raydyn.tasks import registry
from raydyn.tasks.data import Dataset

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily set torch's default floating dtype (models are built in the run's ``dtype``)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_data(cfg: dict[str, Any], base_dir: str | None = None) -> Dataset:
    """The run's data set in the run's ``dtype`` (on the CPU). Relative paths in ``cfg['data']`` are
    resolved against ``base_dir`` (the directory the sweep was launched from; default: here)."""
    data = registry.dataset(cfg["dataset"]).load(cfg["data"], base_dir)
    return data.to(DTYPES[cfg["dtype"]])


def init_model(cfg: dict[str, Any], data: Dataset) -> torch.nn.Module:
    """The run's initial model on the CPU: built under ``torch.manual_seed(seed)`` in the run's dtype
    (the registry entry's build, then raydyn's init options), exactly as a bare PyTorch loop would."""
    dtype = DTYPES[cfg["dtype"]]
    with default_dtype(dtype):
        torch.manual_seed(cfg["seed"])
        model = registry.model(cfg["model"]).build(cfg, data.input_shape, data.out_dim, data.vocab)
    # a plug-in may create tensors in a fixed dtype; the run's dtype is what is trained
    return model.to(dtype)


# ----------------------------------------------------------------------------- runs back from a store
#: what a tracked run's config needs for the analyses that rebuild its model (CMD evaluation, neurons)
REBUILD_NEEDS = ("config['model'] = 'module:callable' (your factory, called as factory(input_shape=..., "
                 "out_dim=..., **config['model_options'], plus config's depth/width/activation when it takes "
                 "them) to return the nn.Module) and config['dataset'] naming a data set raydyn can load (a "
                 "built-in name or your loader 'module:callable', its options in config['data'])")
_LOSSES = ("cross_entropy", "mse", "hinge")


def rebuild_config(store, sweep: str, cfg: dict[str, Any], layout: dict[str, Any]
                   ) -> tuple[dict[str, Any] | None, str | None]:
    """``(config, None)``: the config to rebuild a run's model and data from; ``(None, why)`` when it cannot.

    A run of a sweep file holds raydyn's full config: returned as it is. A run logged with
    :func:`raydyn.track` (or imported) holds its user's config, which names a model only under the
    plug-in contract: ``config["model"] = "module:callable"`` and ``config["dataset"]`` (+ ``config["data"]``)
    a data set raydyn can load. Then raydyn's own keys get their defaults: ``dtype`` from the snapshots,
    ``data`` options resolved, ``depth``/``width``/``activation`` passed to the factory only when it takes
    them (in a user's config they may be labels), ``loss`` kept only when it is one of raydyn's. ``why``
    is one sentence without the run id (runs alike share it)."""
    from raydyn.errors import RaydynError
    from raydyn.tasks.plugins import is_import_path

    if (store.sweep_meta(sweep) or {}).get("kind") != "tracked":
        return cfg, None

    name, dname = cfg.get("model"), cfg.get("dataset")
    if not (isinstance(name, str) and is_import_path(name)):
        return None, ("its config names no model factory" if name is None else
                      f"its config['model'] = {name!r} is not a model factory 'module:callable'")
    if not isinstance(dname, str) or not dname:
        return None, f"its config names the model factory {name!r} but no data set (config['dataset'])"
    data = cfg.get("data") or {}
    if not isinstance(data, dict):
        return None, f"its config['data'] = {data!r:.60} is not a mapping of the data set's options"
    try:
        entry, dentry = registry.model(name), registry.dataset(dname)
        dentry.validate(data)
    except (RaydynError, ValueError) as e:
        return None, f"its model or data set cannot be loaded: {e}"
    out = dict(cfg)
    out["data"] = dentry.resolved(data)
    if out.get("dtype") not in DTYPES:
        out["dtype"] = layout.get("dtype") if layout.get("dtype") in DTYPES else "float32"
    if out.get("loss") not in _LOSSES:
        out.pop("loss", None)
    if not isinstance(out.get("model_options"), dict):
        out["model_options"] = {}
    for k in ("depth", "width", "activation"):
        if k in out and not (entry.open_kwargs or k in entry.accepts):
            out.pop(k)
    return out, None


def _run_row(store, run_id: str, sweep: str | None) -> dict[str, Any]:
    import pyarrow.compute as pc

    from raydyn.errors import StoreError

    t = store.table("runs", sweep=sweep, columns=["run_id", "sweep", "config_json", "weights_layout"],
                    filter=pc.field("run_id") == run_id)
    if t.num_rows == 0:
        raise StoreError(f"no run {run_id!r} in store {store.uri}" + (f" (sweep {sweep!r})" if sweep else ""))
    return t.to_pylist()[0]


def _stored_config(store, row: dict[str, Any]) -> dict[str, Any]:
    """The config a stored run's model and data are rebuilt from (a tracked run's completed by
    :func:`rebuild_config`); StoreError saying what is missing when there is none."""
    import json

    from raydyn.errors import StoreError

    cfg, why = rebuild_config(store, row["sweep"], json.loads(row["config_json"]), json.loads(row["weights_layout"] or "{}"))
    if cfg is None:
        raise StoreError(f"run {row['run_id']} (logged with raydyn.track, sweep {row['sweep']!r}) cannot be rebuilt: "
                         f"{why}. A run names its model with {REBUILD_NEEDS}")
    return cfg


def stored_data(store, run_id: str, sweep: str | None = None) -> Dataset:
    """A stored run's data set, rebuilt from its config (relative paths resolved against the directory its
    sweep was launched from; plug-in loaders imported from there too)."""
    from raydyn.tasks.plugins import add_search_path

    row = _run_row(store, run_id, sweep)
    base_dir = (store.sweep_meta(row["sweep"]) or {}).get("base_dir")
    add_search_path(base_dir)
    return load_data(_stored_config(store, row), base_dir)


def stored_model(store, run_id: str, step: int | None = None, sweep: str | None = None) -> torch.nn.Module:
    """A stored run's ``nn.Module`` with its weights at ``step`` (default: the last snapshot) and, when
    recorded, its buffers (batch norm running statistics) loaded, in ``eval()`` mode.

    Needs full snapshots (``train.record: [weights]``, no sketch, no layer subset): a
    :class:`~raydyn.errors.StoreError` names the run otherwise, or the step when it was not recorded.
    """
    import json

    import numpy as np
    import pyarrow.compute as pc

    from raydyn.errors import StoreError
    from raydyn.train.replay import check_param_order, load_snapshot

    row = _run_row(store, run_id, sweep)
    layout = json.loads(row["weights_layout"] or "{}")
    if layout.get("kind") != "full":
        raise StoreError(f"run {run_id}: its snapshots are {layout.get('kind')!r} (a subset of the parameters or a "
                         "CountSketch of them), not every parameter; a model cannot be rebuilt from them. Record "
                         "full snapshots (train.weights.max_size above the parameter count, no weights.layers)")
    w = store.table("weights", sweep=row["sweep"], filter=pc.field("run_id") == run_id)
    if w.num_rows == 0:
        raise StoreError(f"run {run_id} has no weight snapshots: record them with `train.record: [weights]`")
    steps = w.column("step").to_numpy()
    if step is None:
        k = int(np.argmax(steps))
    else:
        hits = np.flatnonzero(steps == int(step))
        if not hits.size:
            shown = ", ".join(map(str, sorted(steps.tolist())[:12]))
            raise StoreError(f"run {run_id} has no snapshot at step {step}; recorded steps: {shown}"
                             + (" ..." if len(steps) > 12 else ""))
        k = int(hits[0])
    model = init_model(_stored_config(store, row), stored_data(store, run_id, row["sweep"]))
    try:
        check_param_order(model, layout, f"run {run_id}")
    except ValueError as e:
        raise StoreError(str(e)) from None
    weights = np.asarray(w.column("weights")[k].as_py())
    buffers = (np.asarray(w.column("buffers")[k].as_py())
               if "buffers" in w.column_names and w.column("buffers")[k].is_valid else None)
    return load_snapshot(model, layout, weights, buffers).eval()
