"""One registry for models and data sets: built-ins, plug-ins by import path, and entry points.

A sweep file names a model and a data set (``task.model``, ``task.dataset``). The name is
looked up here, in this order:

1. a built-in entry (``mlp``, ``cnn``, ``transformer``, ``uv``, ``toy_grok``, ``none``;
   ``teacher``, ``digits``, ``modular``, ``parity``, ``tan_sum``, ``single``, ``addition``,
   and the data-from-disk kinds ``npz``, ``parquet``, ``image_folder``);
2. an import path ``"package.module:callable"`` (the user's own code, resolved on the
   driver and on every Ray worker);
3. a name registered by an installed package under the entry-point groups
   ``raydyn.models`` / ``raydyn.datasets`` (so a lab can ship its models as a package)::

       [project.entry-points."raydyn.models"]
       lab_resnet = "lab_models.resnet:resnet"

Each entry knows how to build itself, the task fields and options it reads, their
defaults and checks, and which data sets it fits. Nothing else in raydyn branches on a
model's or data set's name.

**The plug-in model contract** (README, "Your own model"): raydyn calls, under
``torch.manual_seed(<run seed>)``::

    factory(input_shape=(C, H, W) or (d,) or (seq,), out_dim=int, **options)

with ``options`` = ``task.depth``, ``task.width``, ``task.activation`` when the sweep
sets them, every key of ``task.model_options``, and ``vocab=`` when the data are token
ids and the factory takes a ``vocab`` argument. It must return a ``torch.nn.Module``.

**The plug-in data-set contract**: ``loader(**data_options)`` returns
``(x_train, y_train, x_test, y_test)`` (numpy arrays or tensors; or a mapping with those
keys); see :mod:`raydyn.tasks.disk` for how labels are read.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

from raydyn.errors import RaydynError
from raydyn.tasks.plugins import PluginError, is_import_path, resolve


class _OnUse:
    """A module imported at the first use of one of its names. Torch and the built-in models and data sets are
    needed to build a model or a data set, not to read a sweep file: the driver of a sweep imports no torch."""

    def __init__(self, load: Callable[[], Any]):
        self._load = load

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load(), name)


def _import_nn() -> Any:
    from torch import nn

    return nn


def _import_data() -> Any:
    from raydyn.tasks import data

    return data


def _import_models() -> Any:
    from raydyn.tasks import models

    return models


nn, _data, _models = _OnUse(_import_nn), _OnUse(_import_data), _OnUse(_import_models)


def _built_in(name: str) -> Callable[..., Any]:
    """The builder ``raydyn.tasks.data.<name>``, imported when a data set is built."""
    def build(**options: Any) -> Any:
        return getattr(_data, name)(**options)

    build.__name__ = build.__qualname__ = name
    return build

ENTRY_POINT_MODELS = "raydyn.models"
ENTRY_POINT_DATASETS = "raydyn.datasets"


class Required:
    """Marker default of a data-set option that must be given (e.g. ``npz``'s ``path``)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = Required()

#: What a data set's inputs are; a model lists the kinds it can read.
#: image: (C, H, W) floats; vector: (d,) floats; tokens: (seq,) int64 ids; scalar: (1,) floats;
#: points: no network input (optimisers as dynamical systems); any: known only once loaded.
INPUT_KINDS = ("image", "vector", "tokens", "scalar", "points", "any")


# ----------------------------------------------------------------------------- data sets
@dataclass(frozen=True)
class DatasetEntry:
    """How to build one data set.

    ``options``: option name -> default (its type is the option's type; ``None`` = any
    type; :data:`REQUIRED` = must be given); ``open_options``: other option names are
    allowed too (a plug-in loader taking ``**kwargs``). ``paths``: options that are file
    or folder paths, resolved against the sweep's base directory when the data are loaded.
    ``check(options) -> message | None`` validates a whole option set.
    """

    name: str
    build: Callable[..., _data.Dataset]
    options: dict[str, Any]
    provides: str = "any"
    paths: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], str | None] | None = None
    open_options: bool = False
    plugin: bool = False
    doc: str = ""
    typed: bool = True  # check option values against their defaults' types

    def validate(self, given: dict[str, Any]) -> None:
        """Raise ValueError naming ``data.<key>`` for an unknown, mistyped or missing option."""
        for key, value in given.items():
            if key not in self.options:
                if self.open_options:
                    continue
                allowed = ", ".join(sorted(self.options)) or "(none)"
                raise ValueError(f"data: unknown option {key!r} for dataset {self.name!r}; allowed: {allowed}")
            default = self.options[key]
            if default is None or isinstance(default, Required) or not self.typed:
                continue
            ok = (isinstance(value, type(default))
                  or (isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool))
                  ) and not (isinstance(value, bool) and not isinstance(default, bool))
            if not ok:
                raise ValueError(f"data.{key}: expected {type(default).__name__}, got {value!r}")
        missing = [k for k, d in self.options.items() if isinstance(d, Required) and k not in given]
        if missing:
            raise ValueError(f"data.{missing[0]}: dataset {self.name!r} needs option {missing[0]!r}"
                             + (f" (required: {', '.join(missing)})" if len(missing) > 1 else ""))
        if self.check is not None:
            msg = self.check(self.resolved(given))
            if msg:
                raise ValueError(msg)

    def resolved(self, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, values coerced to their default's type (an int given for a float option
        becomes a float, so ``n_bits: 10`` and ``10.0`` are one run)."""
        if self.plugin:  # a loader's own defaults apply to what the sweep does not set
            return dict(given)
        out = {k: v for k, v in self.options.items() if not isinstance(v, Required)}
        for k, v in given.items():
            d = self.options.get(k)
            out[k] = type(d)(v) if isinstance(d, (int, float, str)) and not isinstance(d, bool) \
                and isinstance(v, (int, float, str)) and not isinstance(v, bool) else v
        return out

    def load(self, options: dict[str, Any], base_dir: str | None = None) -> _data.Dataset:
        """Build the data set (paths resolved against ``base_dir``, default the working directory)."""
        opts = dict(options)
        for key in self.paths:
            if isinstance(opts.get(key), str):
                opts[key] = resolve_path(opts[key], base_dir)
        return self.build(**opts)


def resolve_path(path: str, base_dir: str | None = None) -> str:
    """``path`` with ``~`` expanded, made absolute against ``base_dir`` (or the working directory).
    URIs (``s3://...``) are returned unchanged."""
    if "://" in path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.abspath(os.path.join(base_dir or os.getcwd(), path))


def _parity_check(o: dict[str, Any]) -> str | None:
    if not 1 <= o["k"] <= o["n_bits"]:
        return f"data.k: parity needs 1 <= k <= n_bits, got k={o['k']}, n_bits={o['n_bits']}"
    return None


def _addition_check(o: dict[str, Any]) -> str | None:
    p, total = o["p"], o["p"] * (o["p"] + 1) // 2
    if p < 2:
        return f"data.p: addition needs p >= 2, got {p}"
    if not 1 <= o["n_train"] < total:
        return f"data.n_train: must be in [1, {total - 1}] for p={p} ({total} pairs), got {o['n_train']}"
    return None


def _tan_sum(grid: int) -> _data.Dataset:
    raise RaydynError("dataset 'tan_sum' has no tensors: it is the test function of the optimisers-as-dynamical-"
                      "systems task (model 'none'), iterated by raydyn.train.dynamics")


_BUILTIN_DATASETS: dict[str, DatasetEntry] = {e.name: e for e in [
    DatasetEntry("teacher", _built_in("teacher"), {"n_train": 512, "n_test": 512, "d_in": 16, "d_out": 1,
                                            "teacher_width": 32, "noise": 0.1, "seed": 0}, "vector",
                 doc="Gaussian teacher-student regression"),
    DatasetEntry("digits", _built_in("digits"), {"test_fraction": 0.2, "seed": 0}, "image",
                 doc="scikit-learn's bundled 8x8 digits, (1, 8, 8) images, 10 classes"),
    DatasetEntry("modular", _built_in("modular"), {"p": 97, "train_fraction": 0.3, "seed": 0}, "tokens",
                 doc="a + b mod p as token sequences [a, b, =]"),
    DatasetEntry("parity", _built_in("parity"),
                 {"n_bits": 40, "k": 3, "n_train": 1000, "n_test": 1000, "seed": 0},
                 "vector", check=_parity_check, doc="sparse parity, labels +-1"),
    # optimiser-as-dynamical-system task (Redman et al. 2024): f(x) = sum tan(x_i), d = 2,
    # initial conditions on a grid x grid lattice (a run's seed indexes it)
    DatasetEntry("tan_sum", _tan_sum, {"grid": 5}, "points", doc="f(x) = sum tan(x_i) for optimisers (model none)"),
    DatasetEntry("single", _built_in("single"), {"x": 1.0, "y": 0.0}, "scalar",
                 doc="one sample (x, y), for the uv model"),
    DatasetEntry("addition", _built_in("addition"), {"p": 10, "n_train": 45, "seed": 0}, "tokens",
                 check=_addition_check, doc="a + b of symbols 0..p-1 (Liu et al. 2022's toy)"),
]}


@lru_cache(maxsize=None)
def _disk_entries() -> dict[str, DatasetEntry]:
    from raydyn.tasks import disk

    out = {}
    for kind, opts in disk.DISK_OPTIONS.items():
        options = {k: (REQUIRED if v is disk.REQUIRED else v) for k, v in opts.items()}
        paths = tuple(k for k in disk.PATH_OPTIONS.get(kind, ()))
        build = (lambda kind: (lambda **o: disk.load(kind, o)))(kind)
        # values are checked by disk.py itself (e.g. image_folder.size: an int or [h, w]), here only the names
        out[kind] = DatasetEntry(kind, build, options, "image" if kind == "image_folder" else "any", paths,
                                 doc=disk.DISK_DOCS.get(kind, ""), typed=False)
    return out


def _plugin_dataset(name: str, loader: Callable[..., Any]) -> DatasetEntry:
    from raydyn.tasks import disk

    params, open_ = _signature(loader)
    options: dict[str, Any] = {k: None for k in params}
    options.update({k: None for k in disk.RESERVED_OPTIONS})
    required = {k for k, p in _parameters(loader).items() if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for k in required:
        options[k] = REQUIRED
    paths = tuple(k for k in params if k in ("path", "root", "file", "dir", "train", "test"))
    return DatasetEntry(name, lambda **o: disk.load_callable(name, **o), options, "any", paths,
                        open_options=open_, plugin=True, doc=(loader.__doc__ or "").strip().split("\n")[0])


# ----------------------------------------------------------------------------- models
#: Task fields every model may read (the first-class model knobs of a sweep file), and their defaults
#: for built-in models (plug-ins get them only when the sweep sets them).
MODEL_FIELDS: dict[str, Any] = {"depth": 2, "width": 64, "activation": "relu"}
#: Task fields only the built-in models read (a plug-in takes its own knobs in ``model_options``).
BUILTIN_ONLY_FIELDS: dict[str, Any] = {"batch_norm": False, "bn_eps": 1e-5, "bias": True, "heads": 4}


@dataclass(frozen=True)
class ModelEntry:
    """How to build one model.

    ``factory``: built-ins ``factory(cfg, input_shape, out_dim, vocab) -> nn.Module``; plug-ins
    the user's ``factory(input_shape=..., out_dim=..., **options)``. ``inputs``: the input kinds
    (:data:`INPUT_KINDS`) it can read. ``reads``: the task fields it takes. ``check(task) ->
    message | None`` validates a task (a dict of the task section). ``trainer``: ``population``
    (a torch.func population) or ``dynamics`` (no network: :mod:`raydyn.train.dynamics`).
    """

    name: str
    factory: Callable[..., nn.Module]
    inputs: frozenset[str]
    reads: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], str | None] | None = None
    trainer: str = "population"
    plugin: bool = False
    accepts: tuple[str, ...] = ()  # plug-in factory's keyword arguments
    open_kwargs: bool = False  # plug-in factory takes **kwargs
    doc: str = ""

    def fits(self, data: DatasetEntry) -> bool:
        return data.provides in self.inputs or (data.provides == "any" and "points" not in self.inputs)

    def options(self, cfg: dict[str, Any], vocab: int = 0) -> dict[str, Any]:
        """The keyword options a plug-in factory is called with (besides input_shape/out_dim)."""
        opts = {k: cfg[k] for k in MODEL_FIELDS if cfg.get(k) is not None}
        opts.update(cfg.get("model_options") or {})
        if vocab and ("vocab" in self.accepts or self.open_kwargs):
            opts["vocab"] = vocab
        return opts

    def build(self, cfg: dict[str, Any], input_shape: tuple[int, ...], out_dim: int, vocab: int = 0) -> nn.Module:
        """A freshly initialised model (seed the global RNG first), then raydyn's generic init options:
        ``init: nanda``, ``init_scale`` x ``fixed_norm``, ``init_perturb``."""
        if not self.plugin:
            model = self.factory(cfg, tuple(input_shape), out_dim, vocab)
        else:
            try:
                model = self.factory(input_shape=tuple(input_shape), out_dim=int(out_dim), **self.options(cfg, vocab))
            except PluginError:
                raise
            except Exception as e:
                raise PluginError(f"task.model {self.name!r}: the factory raised {type(e).__name__}: {e} "
                                  f"(called with input_shape={tuple(input_shape)}, out_dim={out_dim}, "
                                  f"{', '.join(f'{k}={v!r}' for k, v in self.options(cfg, vocab).items())})") from e
            if not isinstance(model, nn.Module):
                raise PluginError(f"task.model {self.name!r} returned a {type(model).__name__}, not a "
                                  "torch.nn.Module")
            if not any(True for _ in model.parameters()):
                raise PluginError(f"task.model {self.name!r} built a module without parameters: nothing to train")
        return _models.post_init(model, cfg)


#: The built-in models' activations: the names of raydyn.tasks.models.ACTIVATIONS, in its order (here without
#: torch; tests/test_driver_imports.py keeps the two equal).
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "linear", "leaky_relu", "sigmoid")


def _check_mlp(t: dict[str, Any]) -> str | None:
    return _check_activation(t)


def _check_activation(t: dict[str, Any]) -> str | None:
    act = t.get("activation")
    if act is not None and act not in ACTIVATIONS:
        return (f"activation: {act!r} is not a built-in activation; allowed: "
                + ", ".join(repr(a) for a in ACTIVATIONS))
    return None


def _check_transformer(t: dict[str, Any]) -> str | None:
    if t["depth"] > 2:
        return f"depth: the transformer has 1 or 2 layers, got {t['depth']}"
    if t["width"] % t["heads"]:
        return f"width (d_model={t['width']}) must be divisible by heads ({t['heads']})"
    return _check_activation(t)


def _mlp(cfg, input_shape, out_dim, vocab):
    args = (cfg["depth"], cfg["width"], cfg["activation"], cfg["batch_norm"], cfg["bias"], cfg.get("bn_eps", 1e-5))
    if vocab:  # token inputs: one-hot, then the MLP
        return nn.Sequential(_models.OneHot(vocab), _models.mlp(input_shape[0] * vocab, out_dim, *args))
    return _models.mlp(math.prod(input_shape), out_dim, *args)


def _cnn(cfg, input_shape, out_dim, vocab):
    if len(input_shape) != 3:
        raise RaydynError(f"model 'cnn' needs (C, H, W) image samples; the data set's samples have shape "
                          f"{tuple(input_shape)}")
    return _models.cnn(input_shape, out_dim, cfg["depth"], cfg["width"], cfg["activation"], cfg["batch_norm"],
                       cfg["bias"], cfg.get("bn_eps", 1e-5))


def _transformer(cfg, input_shape, out_dim, vocab):
    if not vocab:
        raise RaydynError("model 'transformer' reads token ids; this data set has real-valued inputs "
                          "(for disk data with integer token ids set data.tokens: true)")
    return _models.Transformer(vocab, input_shape[0], out_dim, cfg["depth"], cfg["width"], cfg["heads"],
                               cfg["activation"], cfg["bias"])


def _toy_grok(cfg, input_shape, out_dim, vocab):
    return _models.ToyGrok(vocab, out_dim, cfg["depth"], cfg["width"], cfg["activation"], cfg["bias"])


def _none(cfg, input_shape, out_dim, vocab):
    raise RaydynError("model 'none' has no network: its runs are trained by raydyn.train.dynamics")


_REAL = frozenset({"image", "vector", "tokens", "scalar"})
_BUILTIN_MODELS: dict[str, ModelEntry] = {e.name: e for e in [
    ModelEntry("mlp", _mlp, _REAL, ("depth", "width", "activation", "batch_norm", "bn_eps", "bias"), _check_mlp,
               doc="Flatten -> depth x [Linear(width) (-> BatchNorm1d) -> act] -> Linear(out_dim)"),
    ModelEntry("cnn", _cnn, frozenset({"image"}), ("depth", "width", "activation", "batch_norm", "bn_eps", "bias"),
               _check_activation, doc="depth x [Conv3x3(width) (-> BatchNorm2d) -> act] -> avg pool -> Linear"),
    ModelEntry("transformer", _transformer, frozenset({"tokens"}),
               ("depth", "width", "heads", "activation", "bias"), _check_transformer,
               doc="1-2 block decoder-only transformer on token sequences (Nanda et al. 2023)"),
    ModelEntry("uv", lambda cfg, s, o, v: _models.UV(cfg["width"]), frozenset({"scalar"}), ("width",),
               doc="f = v.u x / sqrt(width) (Lewkowycz et al. 2020)"),
    ModelEntry("toy_grok", _toy_grok, frozenset({"tokens"}), ("depth", "width", "activation", "bias"),
               _check_activation, doc="learned 1-D embeddings, summed, tanh MLP decoder (Liu et al. 2022)"),
    ModelEntry("none", _none, frozenset({"points"}), (), trainer="dynamics",
               doc="no network: optimisers as dynamical systems on tan_sum"),
]}
# the data sets each built-in model was made for (named in messages)
_MADE_FOR = {"uv": ("single",), "toy_grok": ("addition",), "none": ("tan_sum",), "transformer": ("modular",),
             "cnn": ("digits", "image_folder")}


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins / C callables: no signature to check
        return {}


def _signature(fn: Callable[..., Any]) -> tuple[tuple[str, ...], bool]:
    """(keyword argument names, takes **kwargs) of a callable."""
    params = _parameters(fn)
    if not params:
        return (), True
    names = tuple(n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params.values())


def _plugin_model(name: str, factory: Callable[..., Any]) -> ModelEntry:
    names, open_ = _signature(factory)
    missing = [a for a in ("input_shape", "out_dim") if a not in names and not open_]
    if missing:
        raise PluginError(f"task.model {name!r}: the factory must take the keyword arguments input_shape and "
                          f"out_dim (raydyn calls factory(input_shape=..., out_dim=..., **options)); "
                          f"{getattr(factory, '__name__', name)}{inspect.signature(factory)} lacks "
                          f"{', '.join(missing)}")
    return ModelEntry(name, factory, frozenset(_REAL), tuple(MODEL_FIELDS), plugin=True, accepts=names,
                      open_kwargs=open_, doc=(factory.__doc__ or "").strip().split("\n")[0])


# ----------------------------------------------------------------------------- lookup
@lru_cache(maxsize=None)
def _entry_points(group: str) -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def refresh() -> None:
    """Forget cached entry points and plug-ins (after installing a package or editing a module in a session)."""
    _entry_points.cache_clear()
    _model_cached.cache_clear()
    _dataset_cached.cache_clear()


def _load_entry_point(group: str, name: str, what: str) -> Callable[..., Any]:
    ep = _entry_points(group)[name]
    try:
        obj = ep.load()
    except Exception as e:
        raise PluginError(f"{what}: {name!r} is registered by an installed package ({ep.value}) but loading it "
                          f"raised {type(e).__name__}: {e}") from None
    if not callable(obj):
        raise PluginError(f"{what}: {name!r} ({ep.value}) is a {type(obj).__name__}, not a callable")
    return obj


def model_names() -> list[str]:
    """Built-in and installed (entry-point) model names."""
    return list(_BUILTIN_MODELS) + sorted(_entry_points(ENTRY_POINT_MODELS))


def dataset_names() -> list[str]:
    """Built-in, from-disk and installed (entry-point) data-set names."""
    return list(_BUILTIN_DATASETS) + list(_disk_entries()) + sorted(_entry_points(ENTRY_POINT_DATASETS))


@lru_cache(maxsize=256)
def _model_cached(name: str) -> ModelEntry:
    if name in _BUILTIN_MODELS:
        return _BUILTIN_MODELS[name]
    if is_import_path(name):
        return _plugin_model(name, resolve(name, "task.model"))
    if name in _entry_points(ENTRY_POINT_MODELS):
        return _plugin_model(name, _load_entry_point(ENTRY_POINT_MODELS, name, "task.model"))
    allowed = ", ".join(repr(n) for n in model_names())
    raise PluginError(f"unknown model {name!r}; built-in and installed models: {allowed}; or your own "
                      "factory as an import path 'package.module:function' (e.g. 'my_models:resnet')")


def model(name: str) -> ModelEntry:
    """The registry entry of model ``name`` (:class:`PluginError` naming it when unknown or broken)."""
    return _model_cached(name)


def build_model(cfg: dict[str, Any], input_shape: tuple[int, ...], out_dim: int, vocab: int = 0) -> nn.Module:
    """Build the model named by ``cfg['model']`` (any registry entry: built-in, plug-in, entry point)
    with freshly initialised parameters (seed the global RNG first); see :meth:`ModelEntry.build`."""
    return model(cfg["model"]).build(cfg, input_shape, out_dim, vocab)


@lru_cache(maxsize=256)
def _dataset_cached(name: str) -> DatasetEntry:
    if name in _BUILTIN_DATASETS:
        return _BUILTIN_DATASETS[name]
    disk = _disk_entries()
    if name in disk:
        return disk[name]
    if is_import_path(name):
        return _plugin_dataset(name, resolve(name, "task.dataset"))
    if name in _entry_points(ENTRY_POINT_DATASETS):
        loader = _load_entry_point(ENTRY_POINT_DATASETS, name, "task.dataset")
        ep = _entry_points(ENTRY_POINT_DATASETS)[name]
        entry = _plugin_dataset(ep.value, loader)
        return DatasetEntry(name, entry.build, entry.options, entry.provides, entry.paths, entry.check,
                            entry.open_options, True, entry.doc, entry.typed)
    allowed = ", ".join(repr(n) for n in dataset_names())
    raise PluginError(f"unknown dataset {name!r}; built-in, from-disk and installed data sets: {allowed}; or your "
                      "own loader as an import path 'package.module:function'")


def dataset(name: str) -> DatasetEntry:
    """The registry entry of data set ``name`` (:class:`PluginError` naming it when unknown or broken)."""
    return _dataset_cached(name)


def check_task(task: dict[str, Any]) -> None:
    """Every rule tying a task's model, data set and options together; ValueError naming the key."""
    m, d = model(task["model"]), dataset(task["dataset"])
    d.validate(task.get("data") or {})
    if not m.fits(d):
        made = _MADE_FOR.get(m.name)
        need = f"dataset {' or '.join(repr(x) for x in made)}" if made else \
            f"{' or '.join(sorted(m.inputs))} inputs"
        raise ValueError(f"model {m.name!r} needs {need}, got dataset {d.name!r} ({d.provides} inputs)")
    if d.provides == "points" and m.trainer != "dynamics":
        raise ValueError(f"dataset {d.name!r} (optimisers as dynamical systems) goes with model 'none', and only it")
    if task.get("init", "torch") == "nanda" and m.name != "transformer":
        raise ValueError(f"init: 'nanda' is the transformer initialisation of Nanda et al. 2023; model "
                         f"{m.name!r} takes init: torch")
    opts = task.get("model_options") or {}
    if not m.plugin:
        if opts:
            raise ValueError(f"model_options: built-in model {m.name!r} takes its options as task fields "
                             f"({', '.join(m.reads) or 'none'}); model_options are for plug-in models")
    else:
        for f in BUILTIN_ONLY_FIELDS:
            if task.get(f) is not None and task.get(f) != BUILTIN_ONLY_FIELDS[f]:
                raise ValueError(f"{f}: an option of raydyn's built-in models; plug-in model {m.name!r} takes its "
                                 f"own options in model_options (e.g. model_options: {{{f}: {task[f]!r}}})")
        given = [k for k in MODEL_FIELDS if task.get(k) is not None] + list(opts)
        for k in given:
            if k in ("input_shape", "out_dim"):
                raise ValueError(f"model_options.{k}: raydyn passes {k} itself (from the data set)")
            if not m.open_kwargs and k not in m.accepts:
                where = f"model_options.{k}" if k in opts else k
                raise ValueError(f"{where}: plug-in model {m.name!r} takes no argument {k!r}; its factory's "
                                 f"arguments: {', '.join(a for a in m.accepts if a not in ('input_shape', 'out_dim'))}")
        return
    if m.check is not None:
        full = {**MODEL_FIELDS, **BUILTIN_ONLY_FIELDS, **{k: v for k, v in task.items() if v is not None}}
        msg = m.check(full)
        if msg:
            raise ValueError(msg)


def builtin_defaults(task: dict[str, Any]) -> dict[str, Any]:
    """The task with the built-in models' defaults for unset model fields (depth 2, width 64, relu, ...):
    built-in run configs hold every field, as they always have (their run ids depend on it)."""
    if model(task["model"]).plugin:
        return task
    out = dict(task)
    for k, v in {**MODEL_FIELDS, **BUILTIN_ONLY_FIELDS}.items():
        if out.get(k) is None:
            out[k] = v
    return out
