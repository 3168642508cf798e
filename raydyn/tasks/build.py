"""Build a run's model and data from its config (the one place that turns a config into tensors).

Used by the population trainer, the reference loop, the analyses that load weights back
(CMD, neurons) and :meth:`raydyn.store.Store.model`, so all of them build the same thing; a stored
snapshot (the recorder's ``full`` layout) goes back into such a model with :func:`load_snapshot`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.utils import vector_to_parameters

from raydyn.store.schema import WeightsLayout
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


def rebuild_config(store, sweep: str, cfg: dict[str, Any], layout: WeightsLayout | dict[str, Any] | None
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
        stored = WeightsLayout.from_json(layout).dtype
        out["dtype"] = stored if stored in DTYPES else "float32"
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

    cfg, why = rebuild_config(store, row["sweep"], json.loads(row["config_json"]),
                              WeightsLayout.from_json(row["weights_layout"]))
    if cfg is None:
        raise StoreError(f"run {row['run_id']} (logged with raydyn.track, sweep {row['sweep']!r}) cannot be rebuilt: "
                         f"{why}. A run names its model with {REBUILD_NEEDS}")
    return cfg


@torch.no_grad()
def load_snapshot(model: torch.nn.Module, layout: WeightsLayout | dict[str, Any], weights: np.ndarray | torch.Tensor,
                  buffers: np.ndarray | torch.Tensor | None = None) -> torch.nn.Module:
    """Load one stored snapshot into ``model`` in place: the flat parameter vector (D,) (``full`` layout)
    and, when given, the flat vector of its floating buffers (batch norm running statistics) in the order
    of ``layout.buffer_names``. Returns the model."""
    layout = WeightsLayout.from_json(layout)
    names = set(layout.names or [n for n, _ in model.named_parameters()])
    params = [p for n, p in model.named_parameters() if n in names]
    dtype = params[0].dtype
    v = torch.as_tensor(np.array(weights) if not isinstance(weights, torch.Tensor) else weights).to(dtype)
    vector_to_parameters(v, params)
    if buffers is not None and layout.buffer_names:
        # buffers, and parameters the model does not train (requires_grad=False: stored with the buffers)
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        flat = torch.as_tensor(np.array(buffers) if not isinstance(buffers, torch.Tensor) else buffers)
        pos = 0
        for n in layout.buffer_names:
            b = own[n]
            b.copy_(flat[pos:pos + b.numel()].reshape(b.shape).to(b.dtype))
            pos += b.numel()
    return model


def check_param_order(model: torch.nn.Module, layout: WeightsLayout | dict[str, Any], what: str = "run") -> None:
    """Raise ValueError unless the flat vectors of ``layout`` are the model's parameters in its order.

    ``layout`` is a run's ``weights_layout``; it must be the ``full`` kind (all parameters, no
    sketch) and name the same tensors with the same shapes as ``model.named_parameters()``.
    """
    layout = WeightsLayout.from_json(layout)
    if not layout.is_full:
        raise ValueError(f"{what}: snapshots are {layout.kind!r}, not every parameter of the model "
                         "('full'); they cannot be loaded back into it")
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # frozen ones: with the buffers
    names = [n for n, _ in trained]
    shapes = [list(p.shape) for _, p in trained]
    stored = layout.to_dict()  # (the message shows the stored JSON: shapes as lists)
    if list(layout.names) != names or [list(s) for s in layout.shapes] != shapes:
        raise ValueError(f"{what}: snapshot layout {list(zip(stored['names'], stored['shapes']))} does not match "
                         f"the model's parameters {list(zip(names, shapes))} (order or shape)")


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
    import numpy as np
    import pyarrow.compute as pc

    from raydyn.errors import StoreError

    row = _run_row(store, run_id, sweep)
    layout = WeightsLayout.from_json(row["weights_layout"])
    if not layout.is_full:
        raise StoreError(f"run {run_id}: its snapshots are {layout.kind!r} (a subset of the parameters or a "
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
