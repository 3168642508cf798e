"""Data sets from disk, validated: ``.npz`` files, Parquet tables, image folders, and the user's own loader.

Every loader returns a :class:`raydyn.tasks.data.Dataset`, through one validation and inference
step (:func:`from_arrays`), so all four kinds read labels the same way:

* ``y`` of an integer (or bool) dtype: **classification**; labels are class indices
  ``0 .. out_dim - 1`` with ``out_dim = num_classes`` or, when that is not given, the largest
  label of both splits + 1. ``y`` becomes int64 of shape (n,); the default loss is cross-entropy.
* ``y`` floating, shape (n,) or (n, d): **regression**; ``y`` becomes float32 (n, 1) or (n, d),
  ``out_dim = d``; the default loss is mse.
* ``task: binary``: labels must be -1 or +1 (hinge loss); ``y`` becomes float32 (n,), ``out_dim = 1``.

``task`` ("classification" | "regression" | "binary") overrides the inference (float labels with
integral values may then be class indices); ``num_classes`` fixes ``out_dim`` of a classification
(e.g. when some classes are absent from the file) and implies ``task: classification``.

``x`` becomes float32 (n, *sample_shape) -- integer pixel values are converted as they are, not
rescaled -- or, with ``tokens: true``, int64 token ids (>= 0; ``vocab`` = largest id of both
splits + 1). A 1-D ``x`` is read as one scalar feature per sample, (n, 1).

Checks (each failure a :class:`~raydyn.errors.DataError` whose message starts with the file,
folder or import path): the four arrays exist; x_train and x_test samples share their shape
(and y_train / y_test theirs); every split has as many ``x`` as ``y`` rows and is not empty;
every value is finite (the message says how many are not, in which array, and the first sample);
labels are in range.

**Memory budget.** When the four arrays (in the dtypes above) are larger than
``$RAYDYN_DATA_MEMORY_MB`` MiB (default 1024), they are not held in each process's memory: they
are written once as ``.npy`` files to the cache folder ``$RAYDYN_CACHE_DIR`` (default
``~/.cache/raydyn/data``), keyed by the source files' paths, sizes and mtimes (the arrays' content
for a loader) and the options, and opened with ``np.load(mmap_mode="c")``. The OS page cache then
shares them between every Ray worker on a machine; the Dataset has ``memory_mapped=True`` and
its tensors are ``torch.from_numpy`` views of the maps (copy-on-write: a process that writes to
them gets private pages, the files never change). A large ``.npz`` is streamed member by member
(never read whole), a large Parquet table batch by batch.

**Image folders** are decoded with Pillow once and cached as ``.npy`` under the same folder, keyed
by every image file's absolute path, size and mtime, the image size and the channels: the next
load (another trial) reads the cache. Every cache entry is written to a temporary folder and
published with ``os.replace``, so concurrent trials never see a half-written entry; nothing is
ever written into the user's data folder. Old entries are not removed automatically (delete the
cache folder to reclaim the space).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from raydyn.errors import DataError
from raydyn.tasks import plugins
from raydyn.tasks.data import Dataset, cache_dir

__all__ = [
    "REQUIRED",
    "RESERVED_OPTIONS",
    "DISK_OPTIONS",
    "PATH_OPTIONS",
    "DISK_DOCS",
    "TASKS",
    "IMAGE_EXTENSIONS",
    "load",
    "load_npz",
    "load_parquet",
    "load_image_folder",
    "load_callable",
    "from_arrays",
    "cache_dir",
    "memory_budget_bytes",
]


class _Required:
    """Marker default of an option that must be given (``npz``'s ``path``)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()

#: raydyn's own data options, the same for every kind (not passed on to a loader).
RESERVED_OPTIONS: dict[str, Any] = {"task": None, "num_classes": None, "tokens": False}

#: Each file kind's options and their defaults (:data:`REQUIRED` = must be given). A loader
#: ``"module:callable"`` takes :data:`RESERVED_OPTIONS` plus any keyword options of its own.
DISK_OPTIONS: dict[str, dict[str, Any]] = {
    "npz": {"path": REQUIRED, **RESERVED_OPTIONS},
    "parquet": {"path": None, "train": None, "test": None, "x": "x", "y": "y", "split": "split", "shape": None,
                **RESERVED_OPTIONS},
    "image_folder": {"root": REQUIRED, "size": 32, "channels": None, **RESERVED_OPTIONS},
}

#: The options of each kind that are file or folder paths (resolved against the sweep's folder).
PATH_OPTIONS: dict[str, tuple[str, ...]] = {"npz": ("path",), "parquet": ("path", "train", "test"),
                                            "image_folder": ("root",)}

#: One line per kind, for listings.
DISK_DOCS: dict[str, str] = {
    "npz": "an .npz file with arrays x_train, y_train, x_test, y_test",
    "parquet": "a Parquet table (file or folder) with a train/test split column, or two tables train and test",
    "image_folder": "root/train/<class>/*.png|jpg and root/test/<class>/*, decoded with Pillow to (C, size, size)",
}

TASKS = ("classification", "regression", "binary")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")

_LOSSES = {"classification": "cross_entropy", "regression": "mse", "binary": "hinge"}
_CACHE_VERSION = 1  # bump when the layout or the meaning of a cache entry changes
_CHUNK_BYTES = 32 << 20  # rows are converted and checked this many bytes at a time
_MAX_INFERRED_CLASSES = 1_000_000
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}


# ----------------------------------------------------------------------------- public API
def load(kind: str, options: Mapping[str, Any]) -> Dataset:
    """Load data set ``kind`` ("npz" | "parquet" | "image_folder" | "module:callable") with ``options``.

    File kinds take the options in :data:`DISK_OPTIONS` (unknown or missing ones are a
    :class:`DataError`); an import path passes every option except :data:`RESERVED_OPTIONS` to
    the loader.
    """
    opts = dict(options)
    if isinstance(kind, str) and plugins.is_import_path(kind):
        return load_callable(kind, **opts)
    if kind not in DISK_OPTIONS:
        raise DataError(f"unknown data kind {kind!r}; expected one of {', '.join(DISK_OPTIONS)} "
                        "or a loader 'package.module:function'")
    table = DISK_OPTIONS[kind]
    unknown = sorted(k for k in opts if k not in table)
    if unknown:
        raise DataError(f"{kind}: unknown option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(repr(k) for k in unknown)}; allowed: {', '.join(table)}")
    missing = [k for k, v in table.items() if v is REQUIRED and opts.get(k) is None]
    if missing:
        raise DataError(f"{kind}: option {missing[0]!r} is required")
    full = {k: opts.get(k, v) for k, v in table.items()}
    if kind == "npz":
        return load_npz(**full)
    if kind == "parquet":
        return load_parquet(**full)
    return load_image_folder(**full)


def load_npz(path: str | os.PathLike[str], *, task: str | None = None, num_classes: int | None = None,
             tokens: bool = False) -> Dataset:
    """An ``.npz`` file (``np.savez`` or ``np.savez_compressed``) holding ``x_train`` (n_train, ...),
    ``y_train`` (n_train,) or (n_train, d), ``x_test``, ``y_test``. Other members are ignored.

    Members are read in row chunks straight from the zip file, so a large file is never held
    in memory whole (see the memory budget in the module docstring).
    """
    label = os.fspath(path)
    p = _existing(path, label, want="file")
    arrays = {name: _npz_member(p, label, member) for name, member in _npz_members(p, label).items()}
    key = (lambda: _digest(["npz", _file_ids([p])]))
    return _build(arrays, source=label, key=key, task=task, num_classes=num_classes, tokens=tokens)


def load_parquet(path: str | os.PathLike[str] | None = None, train: str | os.PathLike[str] | None = None,
                 test: str | os.PathLike[str] | None = None, x: str = "x", y: str = "y", split: str = "split",
                 shape: Sequence[int] | None = None, *, task: str | None = None, num_classes: int | None = None,
                 tokens: bool = False) -> Dataset:
    """Parquet: one table ``path`` (a file, or a folder of ``*.parquet`` files read in sorted order)
    whose column ``split`` says "train" or "test" for every row, or two tables ``train`` and ``test``.

    ``x`` names the input column: a list, fixed-size list, nested list or tensor column (each cell
    one sample, flattened to a vector), or a numeric column (one scalar feature). ``shape`` (e.g.
    ``[1, 28, 28]``) reshapes each sample; default the flat vector. ``y`` names the label/target
    column: integers (class labels), floats (a regression target), or lists of floats
    (multi-output regression). Read batch by batch; nulls are an error.
    """
    if path is not None and (train is not None or test is not None):
        raise DataError("parquet: give either path (one table with a split column) or train and test "
                        f"(two tables), not both (path={os.fspath(path)!r})")
    if path is None and (train is None or test is None):
        given = "train" if train is not None else "test" if test is not None else None
        raise DataError("parquet: give path (one table with a split column) or both train and test"
                        + (f" (only {given} is given)" if given else ""))
    for opt, v in (("x", x), ("y", y), ("split", split)):
        if not isinstance(v, str) or not v:
            raise DataError(f"parquet: option {opt!r} must be a column name, got {v!r}")
    if path is not None:
        label = os.fspath(path)
        files = _parquet_files(path, label)
        _check_columns(files, {"x": x, "y": y, "split": split})
        masks = _split_masks(files, split)
        parts = {"train": (files, [m[0] for m in masks]), "test": (files, [m[1] for m in masks])}
        ids = ["parquet", _file_ids([f for f, _ in files])]
    else:
        label = f"{os.fspath(train)}, {os.fspath(test)}"  # type: ignore[arg-type]
        tr = _parquet_files(train, os.fspath(train))  # type: ignore[arg-type]
        te = _parquet_files(test, os.fspath(test))  # type: ignore[arg-type]
        _check_columns(tr, {"x": x, "y": y})
        _check_columns(te, {"x": x, "y": y})
        parts = {"train": (tr, [None] * len(tr)), "test": (te, [None] * len(te))}
        ids = ["parquet2", _file_ids([f for f, _ in tr]), _file_ids([f for f, _ in te])]
    sample = _check_shape(shape, label)
    arrays: dict[str, _Array] = {}
    for part, (files, masks) in parts.items():
        arrays[f"x_{part}"] = _parquet_array(f"x_{part}", files, masks, x, sample)
        arrays[f"y_{part}"] = _parquet_array(f"y_{part}", files, masks, y, None)
    key = (lambda: _digest([*ids, x, y, split, list(sample) if sample else None]))
    return _build(arrays, source=label, key=key, task=task, num_classes=num_classes, tokens=tokens)


def load_image_folder(root: str | os.PathLike[str], size: int | Sequence[int] = 32, channels: int | None = None, *,
                      task: str | None = None, num_classes: int | None = None, tokens: bool = False) -> Dataset:
    """Images in ``root/train/<class>/*.png|jpg|jpeg`` and ``root/test/<class>/*`` (torchvision's
    ImageFolder layout; files are found recursively in a class folder, other files are ignored).

    Class index = position of the class folder's name in the sorted train class names; the test
    split may only use those names. Decoded with Pillow, converted to "L" (``channels`` 1) or
    "RGB" (3; ``channels`` None: 1 if every image is grayscale, else 3; alpha is dropped; 16-bit
    grayscale keeps its precision), resized to ``size`` (an int: size x size; or [height, width])
    with Pillow's bilinear filter (antialiased when shrinking). x: float32 (n, C, H, W) in [0, 1];
    y: int64 class indices (n,). The decoded arrays are cached (module docstring).
    """
    label = os.fspath(root)
    r = _existing(root, label, want="folder")
    hw = _check_size(size, label)
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DataError(f"{label}: channels must be 1 (grayscale), 3 (RGB) or omitted (inferred), got {channels!r}")
    if tokens:
        raise DataError(f"{label}: tokens: true does not apply to images (pixels are real values)")
    files, classes = _image_files(r, label)
    entries = [[split, cls, os.path.abspath(p), st.st_size, st.st_mtime_ns]
               for split, items in files.items() for cls, (p, _, st) in items]
    import PIL

    key = _digest(["images", entries, list(hw), channels, PIL.__version__])
    root_dir = cache_dir()
    final = root_dir / f"images-{key}"
    meta = _read_meta(final)
    if meta is None:
        _write_entry(final, lambda tmp: _decode_images(tmp, files, classes, hw, channels))
        meta = _read_meta(final)
        if meta is None:
            raise DataError(f"{label}: the decoded-image cache {final} could not be read back after writing it")
    arrays = {name: _npy_array(name, final / f"{name}.npy", finite=name.startswith("x")) for name in ARRAY_KEYS}
    return _build(arrays, source=label, key=lambda: key, task=task, num_classes=num_classes, tokens=False)


def load_callable(target: str, **options: Any) -> Dataset:
    """The user's loader ``target`` ("package.module:function"), called with ``options`` minus
    :data:`RESERVED_OPTIONS` (which are applied to what it returns: ``task``, ``num_classes``,
    ``tokens``).

    It must return ``(x_train, y_train, x_test, y_test)`` (a tuple or list) or a mapping with
    those keys; arrays may be numpy arrays (memory maps too), torch tensors or nested lists.
    Errors name the import path; the loader's own exception is chained.
    """
    common = {k: options.pop(k) for k in list(options) if k in RESERVED_OPTIONS}
    try:
        fn = plugins.resolve(target, "task.dataset")
    except plugins.PluginError as e:
        raise DataError(str(e)) from None
    try:
        out = fn(**options)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{target}: the loader raised {type(e).__name__}: {e}") from e
    if isinstance(out, Mapping):
        missing = [k for k in ARRAY_KEYS if k not in out]
        if missing:
            found = ", ".join(str(k) for k in out) or "nothing"
            raise DataError(f"{target}: the returned mapping has no key{'s' if len(missing) > 1 else ''} "
                            f"{', '.join(repr(k) for k in missing)} (found: {found})")
        arrays = [out[k] for k in ARRAY_KEYS]
    elif isinstance(out, (tuple, list)):
        if len(out) != 4:
            raise DataError(f"{target}: returned a {type(out).__name__} of {len(out)} items; expected 4: "
                            "(x_train, y_train, x_test, y_test)")
        arrays = list(out)
    else:
        raise DataError(f"{target}: returned a {type(out).__name__}; expected (x_train, y_train, x_test, y_test) "
                        "or a mapping with those keys")
    return from_arrays(*arrays, source=target, task=common.get("task"), num_classes=common.get("num_classes"),
                       tokens=common.get("tokens"))


def from_arrays(x_train: Any, y_train: Any, x_test: Any, y_test: Any, *, source: str, task: str | None = None,
                num_classes: int | None = None, tokens: bool = False) -> Dataset:
    """Validate four arrays, infer the task, convert dtypes, and return the :class:`Dataset`.

    ``x_*``: (n, *sample_shape) numbers (token ids with ``tokens``); ``y_*``: (n,) labels or
    (n,) / (n, d) targets; numpy arrays, torch tensors or nested lists. ``source`` names where
    they came from in every error message. Inference, conversion and checks: module docstring.
    Over the memory budget the arrays are cached by content and memory-mapped.
    """
    arrays = {name: _memory_array(name, a, source) for name, a in zip(ARRAY_KEYS, (x_train, y_train, x_test, y_test))}
    key = (lambda: _digest(["arrays", source, _content_digest(arrays)]))
    return _build(arrays, source=source, key=key, task=task, num_classes=num_classes, tokens=tokens)


def memory_budget_bytes() -> float:
    """``$RAYDYN_DATA_MEMORY_MB`` (default 1024) in bytes: larger data sets are memory-mapped."""
    raw = os.environ.get("RAYDYN_DATA_MEMORY_MB", "").strip()
    if not raw:
        return 1024.0 * 2**20
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not mb >= 0:
        raise DataError(f"RAYDYN_DATA_MEMORY_MB must be a number of MiB >= 0, got {raw!r}")
    return mb * 2**20


# ----------------------------------------------------------------------------- arrays read in chunks
@dataclass
class _Array:
    """One of the four arrays as stored: its shape, dtype, and a reader of row chunks.

    ``read(rows)`` yields consecutive chunks of at most ``rows`` rows covering the array.
    ``file``: an .npy in raydyn's cache holding exactly this array (reused when it already has
    the target dtype); ``finite``: known finite (decoded images), the scan is skipped.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int], Iterator[np.ndarray]]
    file: Path | None = None
    finite: bool = False


def _memory_array(name: str, a: Any, source: str) -> _Array:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.float()
        a = t.numpy()
    elif not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as e:
            raise DataError(f"{source}: {name} is not an array ({type(a).__name__}: {e})") from None
    if a.ndim == 0:
        raise DataError(f"{source}: {name} is a scalar ({a!r}); expected one row per sample")
    return _Array(name, tuple(a.shape), a.dtype, lambda rows: (a[i:i + rows] for i in range(0, len(a), rows)))


def _npy_array(name: str, path: Path, finite: bool = False) -> _Array:
    m = np.load(path, mmap_mode="r")
    return _Array(name, tuple(m.shape), m.dtype, lambda rows: (m[i:i + rows] for i in range(0, len(m), rows)),
                  file=path, finite=finite)


# ----------------------------------------------------------------------------- validation and conversion
@dataclass
class _Target:
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class _Stats:
    """What a scan of one array found."""

    nan: int = 0
    inf: int = 0
    overflow: int = 0
    first_bad: int = -1  # first sample with a non-finite value
    lo: float = math.inf
    hi: float = -math.inf
    lo_at: int = -1
    hi_at: int = -1
    nonint_at: int = -1  # classification from floats: first non-integral label
    nonint_value: float = 0.0
    binary_bad: int = 0  # binary: values not in {-1, +1}
    binary_at: int = -1
    binary_value: float = 0.0
    binary_values: tuple[float, ...] = ()


def _check_common(source: str, task: Any, num_classes: Any, tokens: Any) -> tuple[str | None, int | None, bool]:
    if task is not None and task not in TASKS:
        raise DataError(f"{source}: task must be one of {', '.join(TASKS)} (or omitted: inferred from y), "
                        f"got {task!r}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
            raise DataError(f"{source}: num_classes must be an integer >= 2, got {num_classes!r}")
        if task not in (None, "classification"):
            raise DataError(f"{source}: num_classes applies to task: classification only (task is {task!r})")
        num_classes = int(num_classes)
    if tokens is None:
        tokens = False
    if not isinstance(tokens, (bool, np.bool_)):
        raise DataError(f"{source}: tokens must be true or false, got {tokens!r}")
    return task, num_classes, bool(tokens)


def _plan(arrays: Mapping[str, _Array], source: str, task: str | None, num_classes: int | None,
          tokens: bool) -> tuple[str, dict[str, _Target]]:
    """The task kind and every array's target shape/dtype, from shapes and dtypes alone."""
    for name in ARRAY_KEYS:
        a = arrays[name]
        if a.dtype.kind not in "biuf":
            what = "pickled Python objects" if a.dtype.kind == "O" else f"dtype {a.dtype}"
            raise DataError(f"{source}: {name} holds {what}; expected numbers")
        if len(a.shape) == 0:
            raise DataError(f"{source}: {name} is a scalar; expected one row per sample")
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape[0] == 0 or y.shape[0] == 0:
            raise DataError(f"{source}: the {split} split is empty (x_{split} has {x.shape[0]} samples, "
                            f"y_{split} {y.shape[0]})")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{source}: x_{split} has {x.shape[0]} samples but y_{split} has {y.shape[0]}")
    xs_tr, xs_te = arrays["x_train"].shape[1:], arrays["x_test"].shape[1:]
    if xs_tr != xs_te:
        raise DataError(f"{source}: x_test samples have shape {xs_te} but x_train samples {xs_tr}")
    if math.prod(xs_tr) == 0:
        raise DataError(f"{source}: x samples are empty (shape {xs_tr})")
    ys_tr, ys_te = arrays["y_train"].shape[1:], arrays["y_test"].shape[1:]
    if ys_tr != ys_te:
        raise DataError(f"{source}: y_test targets have shape {ys_te} but y_train targets {ys_tr}")

    ydt = arrays["y_train"].dtype
    if task is None:
        task = "classification" if (num_classes is not None or ydt.kind in "biu") else "regression"
    if task in ("classification", "binary"):
        if ys_tr not in ((), (1,)):
            hint = " (float targets of several outputs are a regression)" if task == "classification" else ""
            raise DataError(f"{source}: {task} needs one label per sample, but y_train has shape "
                            f"{arrays['y_train'].shape}{hint}")
        y_sample: tuple[int, ...] = ()
        ydtype = np.dtype(np.int64) if task == "classification" else np.dtype(np.float32)
    else:
        if len(ys_tr) > 1:
            raise DataError(f"{source}: regression targets must be (n,) or (n, d), but y_train has shape "
                            f"{arrays['y_train'].shape}")
        y_sample = ys_tr or (1,)
        ydtype = np.dtype(np.float32)
    if tokens and arrays["x_train"].dtype.kind not in "iu":
        raise DataError(f"{source}: tokens: true needs integer token ids, but x_train has dtype "
                        f"{arrays['x_train'].dtype}")
    if tokens and arrays["x_test"].dtype.kind not in "iu":
        raise DataError(f"{source}: tokens: true needs integer token ids, but x_test has dtype "
                        f"{arrays['x_test'].dtype}")
    x_sample = xs_tr or (1,)
    xdtype = np.dtype(np.int64) if tokens else np.dtype(np.float32)
    targets = {}
    for split in ("train", "test"):
        n = arrays[f"x_{split}"].shape[0]
        targets[f"x_{split}"] = _Target((n, *x_sample), xdtype)
        targets[f"y_{split}"] = _Target((n, *y_sample), ydtype)
    return task, targets


def _scan(a: _Array, target: _Target, role: str, out: np.ndarray | None, source: str) -> _Stats:
    """Convert ``a`` chunk by chunk to ``target`` (written into ``out`` when given) and collect
    what the checks need. ``role``: "x", "tokens", "classification", "binary", "regression"."""
    st = _Stats()
    src_float = a.dtype.kind == "f"
    need_finite = src_float and not a.finite
    row_bytes = max(1, math.prod(target.shape[1:]) * max(a.dtype.itemsize, target.dtype.itemsize))
    rows = max(1, _CHUNK_BYTES // row_bytes)
    binary_seen: set[float] = set()
    i = 0
    for chunk in a.read(rows):
        chunk = np.asarray(chunk)
        k = len(chunk)
        if k == 0:
            continue
        if i + k > target.shape[0]:
            raise DataError(f"{source}: {a.name} has more rows than its header says ({target.shape[0]})")
        flat = chunk.reshape(k, -1)
        if need_finite:
            fin = np.isfinite(flat)
            if not fin.all():
                bad_rows = ~fin.all(axis=1)
                if st.first_bad < 0:
                    st.first_bad = i + int(np.argmax(bad_rows))
                st.nan += int(np.isnan(flat).sum())
                st.inf += int(np.isinf(flat).sum())
        if role in ("tokens", "classification") and k:
            if role == "classification" and src_float:
                fin = np.isfinite(flat)
                integral = np.where(fin, flat == np.round(flat), True)
                if not integral.all() and st.nonint_at < 0:
                    j = int(np.argmax(~integral.all(axis=1)))
                    st.nonint_at = i + j
                    st.nonint_value = float(flat[j][~integral[j]][0])
                vals = flat[fin.all(axis=1)] if not fin.all() else flat
            else:
                vals = flat
            if vals.size:
                lo_j, hi_j = np.unravel_index(np.argmin(vals), vals.shape)[0], \
                    np.unravel_index(np.argmax(vals), vals.shape)[0]
                lo, hi = vals.min(), vals.max()
                if lo < st.lo:
                    st.lo, st.lo_at = float(lo), i + int(lo_j)
                if hi > st.hi:
                    st.hi, st.hi_at = float(hi), i + int(hi_j)
        if role == "binary":
            bad = (flat != 1) & (flat != -1)
            n_bad = int(bad.sum())
            if n_bad:
                if st.binary_at < 0:
                    j = int(np.argmax(bad.any(axis=1)))
                    st.binary_at, st.binary_value = i + j, float(flat[j][bad[j]][0])
                st.binary_bad += n_bad
                if len(binary_seen) <= 10:
                    binary_seen.update(np.unique(flat[bad])[:11].tolist())
        if out is not None:
            conv = chunk.reshape((k, *target.shape[1:]))
            if role == "classification" and src_float:
                conv = np.where(np.isfinite(conv), conv, 0)  # checked separately; avoid cast warnings
            with np.errstate(over="ignore", invalid="ignore"):
                conv = conv.astype(target.dtype, copy=False)
            if target.dtype.kind == "f" and src_float and a.dtype.itemsize > target.dtype.itemsize:
                over = (np.isinf(conv) & np.isfinite(chunk.reshape(conv.shape))).reshape(k, -1)
                n_over = int(over.sum())
                if n_over:  # finite in the file, too large for float32
                    st.overflow += n_over
                    st.inf += n_over
                    j = i + int(np.argmax(over.any(axis=1)))
                    st.first_bad = j if st.first_bad < 0 else min(st.first_bad, j)
            out[i:i + k] = conv
        i += k
    if i != target.shape[0]:
        raise DataError(f"{source}: {a.name} has {i} rows, but {target.shape[0]} were expected (truncated?)")
    st.binary_values = tuple(sorted(binary_seen))
    return st


def _finite_message(stats: Mapping[str, _Stats]) -> str | None:
    parts = []
    for name, st in stats.items():
        n = st.nan + st.inf
        if n:
            detail = [f"{st.nan} NaN"] if st.nan else []
            if st.inf:
                detail.append(f"{st.inf} inf" + (f", of which {st.overflow} overflow float32" if st.overflow else ""))
            parts.append(f"{name} has {n} non-finite value{'s' if n > 1 else ''} ({', '.join(detail)}; "
                         f"first in sample {st.first_bad})")
    return "; ".join(parts) if parts else None


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


def _check_labels(source: str, task: str, stats: Mapping[str, _Stats], num_classes: int | None) -> int:
    """Raise on bad labels; return out_dim."""
    if task == "binary":
        for name, st in stats.items():
            if st.binary_bad:
                hint = " (map 0 to -1)" if set(st.binary_values) <= {0.0} else ""
                raise DataError(f"{source}: {name} has label {_fmt(st.binary_value)} (sample {st.binary_at}; "
                                f"{st.binary_bad} labels not -1 or +1); task: binary needs labels -1 or +1{hint}")
        return 1
    if task == "regression":
        return -1  # set from the target shape
    for name, st in stats.items():
        if st.nonint_at >= 0:
            raise DataError(f"{source}: {name} has label {st.nonint_value!r} (sample {st.nonint_at}); class labels "
                            "must be integers 0..C-1 (float targets are a regression: omit task/num_classes)")
    hi = max(st.hi for st in stats.values())
    if num_classes is not None:
        for name, st in stats.items():
            if st.hi >= num_classes:
                raise DataError(f"{source}: {name} has label {_fmt(st.hi)}, but num_classes is {num_classes} "
                                f"(labels must be in 0..{num_classes - 1})")
        out_dim = num_classes
    else:
        out_dim = int(hi) + 1
        if out_dim > _MAX_INFERRED_CLASSES:
            name = max(stats, key=lambda n: stats[n].hi)
            raise DataError(f"{source}: {name} has label {_fmt(hi)}, which would make {out_dim} classes; labels must "
                            "be class indices 0..C-1 (set num_classes if that many classes is meant)")
    for name, st in stats.items():
        if st.lo < 0:
            given = f", num_classes is {num_classes}" if num_classes is not None else ""
            raise DataError(f"{source}: {name} has label {_fmt(st.lo)} (sample {st.lo_at}){given}, but labels must "
                            f"be in 0..{out_dim - 1}")
    if out_dim < 2:
        raise DataError(f"{source}: every label is 0, so there is one class; classification needs at least 2 "
                        "(set num_classes when some classes are absent from the data)")
    return out_dim


def _check_tokens(source: str, stats: Mapping[str, _Stats]) -> int:
    for name, st in stats.items():
        if st.lo < 0:
            raise DataError(f"{source}: {name} has token id {_fmt(st.lo)} (sample {st.lo_at}); token ids must be "
                            ">= 0")
    return int(max(st.hi for st in stats.values())) + 1


def _build(arrays: Mapping[str, _Array], *, source: str, key: Callable[[], str] | None, task: Any,
           num_classes: Any, tokens: Any) -> Dataset:
    """Plan, scan/convert, check, and return the Dataset (in memory or memory-mapped)."""
    task, num_classes, tokens = _check_common(source, task, num_classes, tokens)
    kind, targets = _plan(arrays, source, task, num_classes, tokens)
    total = sum(t.nbytes for t in targets.values())
    if total <= memory_budget_bytes():
        out = {name: np.empty(t.shape, t.dtype) for name, t in targets.items()}
        meta = _convert_and_check(arrays, targets, out, source, kind, num_classes, tokens)
        return _dataset(out, meta, source, mapped=False)

    reusable = all(a.file is not None and a.dtype == targets[n].dtype and a.shape == targets[n].shape
                   for n, a in arrays.items())
    if reusable:  # already .npy files in the cache with the right dtypes (decoded images): check, then map
        meta = _convert_and_check(arrays, targets, None, source, kind, num_classes, tokens)
        maps = {n: np.load(a.file, mmap_mode="c") for n, a in arrays.items()}  # type: ignore[arg-type]
        return _dataset(maps, meta, source, mapped=True)

    ident = key() if key is not None else _digest(["arrays", source, _content_digest(arrays)])
    final = cache_dir() / f"arrays-{_digest([ident, kind, num_classes, tokens, _CACHE_VERSION])}"
    meta = _read_meta(final)
    if meta is None:
        def write(tmp: Path) -> dict[str, Any]:
            out = {n: np.lib.format.open_memmap(tmp / f"{n}.npy", mode="w+", dtype=t.dtype, shape=t.shape)
                   for n, t in targets.items()}
            m = _convert_and_check(arrays, targets, out, source, kind, num_classes, tokens)
            for a in out.values():
                a.flush()
            del out
            return {**m, "source": source}

        _write_entry(final, write)
        meta = _read_meta(final)
        if meta is None:
            raise DataError(f"{source}: the cache entry {final} could not be read back after writing it")
    maps = {n: np.load(final / f"{n}.npy", mmap_mode="c") for n in ARRAY_KEYS}
    return _dataset(maps, meta, source, mapped=True)


def _convert_and_check(arrays: Mapping[str, _Array], targets: Mapping[str, _Target],
                       out: Mapping[str, np.ndarray] | None, source: str, kind: str, num_classes: int | None,
                       tokens: bool) -> dict[str, Any]:
    """Labels first (cheap, fail fast), then inputs. Returns the Dataset's metadata."""
    ystats = {n: _scan(arrays[n], targets[n], kind, out[n] if out is not None else None, source)
              for n in ("y_train", "y_test")}
    msg = _finite_message(ystats)
    if msg:
        raise DataError(f"{source}: non-finite values: {msg}")
    out_dim = _check_labels(source, kind, ystats, num_classes)
    if out_dim < 0:
        out_dim = targets["y_train"].shape[1]
    xstats = {n: _scan(arrays[n], targets[n], "tokens" if tokens else "x", out[n] if out is not None else None,
                       source)
              for n in ("x_train", "x_test")}
    msg = _finite_message(xstats)
    if msg:
        raise DataError(f"{source}: non-finite values: {msg}")
    vocab = _check_tokens(source, xstats) if tokens else 0
    return {"kind": kind, "out_dim": int(out_dim), "default_loss": _LOSSES[kind], "vocab": int(vocab)}


def _dataset(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], source: str, mapped: bool) -> Dataset:
    t = {n: torch.from_numpy(arrays[n]) for n in ARRAY_KEYS}
    return Dataset(x_train=t["x_train"], y_train=t["y_train"], x_test=t["x_test"], y_test=t["y_test"],
                   kind=meta["kind"], out_dim=int(meta["out_dim"]), default_loss=meta["default_loss"],
                   vocab=int(meta["vocab"]), source=source, memory_mapped=mapped)


# ----------------------------------------------------------------------------- the cache
def _digest(obj: Any) -> str:
    return hashlib.blake2b(json.dumps([_CACHE_VERSION, obj], sort_keys=True, default=str).encode(),
                           digest_size=16).hexdigest()


def _file_ids(files: Sequence[Path]) -> list[list[Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def _content_digest(arrays: Mapping[str, _Array]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in ARRAY_KEYS:
        a = arrays[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        rows = max(1, _CHUNK_BYTES // max(1, math.prod(a.shape[1:]) * a.dtype.itemsize))
        for chunk in a.read(rows):
            h.update(np.ascontiguousarray(chunk).tobytes())
    return h.hexdigest()


def _read_meta(entry: Path) -> dict[str, Any] | None:
    """The metadata of a complete cache entry, or None when there is none. A broken entry (never
    produced by raydyn: entries are published whole) is moved away so it can be rebuilt."""
    if not entry.exists():
        return None
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if all((entry / f"{n}.npy").is_file() for n in ARRAY_KEYS):
            return meta
    except (OSError, ValueError):
        pass
    _discard(entry)
    return None


def _discard(entry: Path) -> None:
    trash = entry.with_name(f".trash-{entry.name}-{os.getpid()}-{time.time_ns()}")
    try:
        os.replace(entry, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _write_entry(final: Path, fill: Callable[[Path], dict[str, Any]]) -> None:
    """Build a cache entry in a temporary folder next to ``final`` and publish it with ``os.replace``
    (atomic: readers see no entry or a whole one). When another process published first, its
    entry is kept and this one dropped."""
    root = final.parent
    _sweep_stale(root)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    except OSError as e:
        raise DataError(f"{root}: cannot write the data cache ({e}); set RAYDYN_CACHE_DIR to a writable "
                        "folder") from None
    try:
        meta = fill(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        try:
            os.replace(tmp, final)
        except OSError:
            if _read_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost the race: an identical entry is there
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{root}: cannot write the data cache entry {final.name} ({e}); free space or set "
                        "RAYDYN_CACHE_DIR to another folder") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sweep_stale(root: Path, age_s: float = 86400.0) -> None:
    """Remove temporary folders left by crashed writers (older than a day)."""
    now = time.time()
    try:
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) and now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
    except OSError:
        pass


# ----------------------------------------------------------------------------- files
def _existing(path: Any, label: str, want: str) -> Path:
    if path is None or (isinstance(path, str) and not path):
        raise DataError(f"no {want} given (path is empty)")
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise DataError(f"{label}: no such {want} (looked for {p.absolute()})")
    if want == "file" and p.is_dir():
        raise DataError(f"{label}: is a folder, expected a file")
    if want == "folder" and not p.is_dir():
        raise DataError(f"{label}: is a file, expected a folder")
    return p


# .npz
def _npz_members(p: Path, label: str) -> dict[str, str]:
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise DataError(f"{label}: not a valid .npz file ({e})") from None
    keys = {n[:-4] if n.endswith(".npy") else n: n for n in names}
    missing = [k for k in ARRAY_KEYS if k not in keys]
    if missing:
        found = ", ".join(keys) or "nothing"
        raise DataError(f"{label}: missing key{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(k) for k in missing)} (found: {found})")
    return {k: keys[k] for k in ARRAY_KEYS}


def _npy_header(f: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        return fmt.read_array_header_1_0(f)
    # 2.0 and 3.0 share the header layout (3.0 allows utf-8 field names: structured dtypes, rejected anyway)
    return fmt.read_array_header_2_0(f)


_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError)


def _npz_member(p: Path, label: str, member: str) -> _Array:
    name = member[:-4] if member.endswith(".npy") else member
    try:
        with zipfile.ZipFile(p) as zf, zf.open(member) as f:
            shape, fortran, dtype = _npy_header(f)
    except _ZIP_ERRORS as e:
        raise DataError(f"{label}: {member} is not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise DataError(f"{label}: {name} holds pickled Python objects; save numeric arrays")
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise DataError(f"{label}: {name} is a scalar; expected one row per sample")

    def read(rows: int) -> Iterator[np.ndarray]:
        row_items = math.prod(shape[1:])
        try:
            with zipfile.ZipFile(p) as zf, zf.open(member) as f:
                _npy_header(f)
                if fortran:  # column-major: no row chunks; read whole (rare)
                    data = np.frombuffer(_read_exact(f, math.prod(shape) * dtype.itemsize, label, member),
                                         dtype=dtype)
                    yield data.reshape(shape[::-1]).transpose()
                    return
                if row_items == 0:
                    yield np.empty(shape, dtype)
                    return
                done = 0
                while done < shape[0]:
                    k = min(rows, shape[0] - done)
                    buf = _read_exact(f, k * row_items * dtype.itemsize, label, member)
                    yield np.frombuffer(buf, dtype=dtype).reshape((k, *shape[1:]))
                    done += k
        except _ZIP_ERRORS as e:
            raise DataError(f"{label}: {member} cannot be read ({type(e).__name__}: {e})") from None

    return _Array(name, shape, dtype, read)


def _read_exact(f: Any, n: int, label: str, member: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise DataError(f"{label}: {member} is truncated (expected {n} more bytes, got {len(buf)})")
    return buf


# parquet
def _parquet_files(path: Any, label: str) -> list[tuple[Path, str]]:
    """(file, label for messages) of a parquet file or of every *.parquet file in a folder (sorted,
    recursively; names starting with '.' or '_' skipped)."""
    p = Path(os.fspath(path)).expanduser()
    if not p.exists():
        raise DataError(f"{label}: no such file or folder (looked for {p.absolute()})")
    if p.is_file():
        return [(p, label)]
    files = sorted(f for f in p.rglob("*.parquet")
                   if f.is_file() and not any(part.startswith((".", "_")) for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"{label}: folder has no .parquet files")
    return [(f, os.path.join(label, str(f.relative_to(p)))) for f in files]


def _parquet_file(f: Path, flabel: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(f))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{flabel}: not a valid parquet file ({e})") from None


def _check_columns(files: Sequence[tuple[Path, str]], columns: Mapping[str, str]) -> None:
    for f, flabel in files:
        names = _parquet_file(f, flabel).schema_arrow.names
        for opt, col in columns.items():
            if col not in names:
                raise DataError(f"{flabel}: no column {col!r} (option {opt}; columns: {', '.join(names)})")


def _split_masks(files: Sequence[tuple[Path, str]], split: str) -> list[tuple[np.ndarray, np.ndarray]]:
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for f, flabel in files:
        col = _parquet_file(f, flabel).read(columns=[split]).column(split)
        chunks = [c.dictionary_decode() if pa.types.is_dictionary(c.type) else c for c in col.chunks]
        col = pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string())
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise DataError(f"{flabel}: column {split!r} has type {col.type}; expected the strings 'train' and "
                            "'test'")
        if col.null_count:
            raise DataError(f"{flabel}: column {split!r} has {col.null_count} null values; every row must be 'train' "
                            "or 'test'")
        bad = [v for v in pc.unique(col).to_pylist() if v not in ("train", "test")]
        if bad:
            shown = ", ".join(repr(v) for v in sorted(bad)[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DataError(f"{flabel}: column {split!r} has values other than 'train' and 'test': {shown}")
        is_train = np.asarray(pc.equal(col, "train").to_numpy(zero_copy_only=False), dtype=bool)
        out.append((is_train, ~is_train))
    return out


def _check_shape(shape: Any, label: str) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if (not isinstance(shape, (list, tuple)) or not shape
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise DataError(f"{label}: shape must be a list of positive integers (e.g. [1, 28, 28]), got {shape!r}")
    return tuple(int(s) for s in shape)


def _column_values(arr: Any, flabel: str, col: str) -> np.ndarray:
    """A parquet column batch as (n,) numbers or (n, k) flattened samples."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if arr.null_count:
        raise DataError(f"{flabel}: column {col!r} has {arr.null_count} null values")
    if isinstance(arr.type, pa.ExtensionType):
        if hasattr(arr, "to_numpy_ndarray"):  # fixed-shape tensor
            return np.asarray(arr.to_numpy_ndarray()).reshape(n, -1)
        arr = arr.storage
    sizes: list[int] = []
    while pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
        if pa.types.is_fixed_size_list(arr.type):
            size = arr.type.list_size
        else:
            lens = np.diff(np.asarray(arr.offsets))
            if len(lens) and (lens != lens[0]).any():
                j = int(np.argmax(lens != lens[0]))
                raise DataError(f"{flabel}: column {col!r} has lists of different lengths ({lens[0]} and {lens[j]}, "
                                f"rows 0 and {j} of a batch); every sample must have the same size")
            size = int(lens[0]) if len(lens) else 0
        arr = arr.flatten()
        if arr.null_count:
            raise DataError(f"{flabel}: column {col!r} has {arr.null_count} null values inside its lists")
        sizes.append(size)
    t = arr.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DataError(f"{flabel}: column {col!r} holds {t}; expected numbers or lists of numbers")
    v = np.asarray(arr.to_numpy(zero_copy_only=False))
    return v.reshape(n, math.prod(sizes)) if sizes else v


def _parquet_array(name: str, files: Sequence[tuple[Path, str]], masks: Sequence[np.ndarray | None], col: str,
                   sample: tuple[int, ...] | None) -> _Array:
    """Column ``col`` of the rows selected by ``masks`` (None = all) of ``files``, read in batches."""
    n = 0
    probe: np.ndarray | None = None
    for (f, flabel), mask in zip(files, masks):
        pf = _parquet_file(f, flabel)
        rows = int(mask.sum()) if mask is not None else pf.metadata.num_rows
        n += rows
        if probe is None and pf.metadata.num_rows:
            batch = next(pf.iter_batches(batch_size=1, columns=[col]))
            probe = _column_values(batch.column(0)[:1], flabel, col)
    if probe is None:  # every table empty: an empty split (reported by the checks)
        probe = np.zeros((0,), np.float32)
    row_shape = tuple(probe.shape[1:])
    if sample is not None and name.startswith("x"):
        if math.prod(sample) != math.prod(row_shape or (1,)):
            raise DataError(f"{files[0][1]}: shape {list(sample)} has {math.prod(sample)} values per sample, but "
                            f"column {col!r} has {math.prod(row_shape or (1,))}")
        row_shape = sample
    dtype = probe.dtype

    def read(rows: int) -> Iterator[np.ndarray]:
        for (f, flabel), mask in zip(files, masks):
            start = 0
            for batch in _parquet_file(f, flabel).iter_batches(batch_size=rows, columns=[col]):
                v = _column_values(batch.column(0), flabel, col)
                k = len(v)
                if mask is not None:
                    v = v[mask[start:start + k]]
                start += k
                if not len(v):
                    continue
                if math.prod(v.shape[1:]) != math.prod(probe.shape[1:]):
                    raise DataError(f"{flabel}: column {col!r} has samples of {math.prod(v.shape[1:])} values, but "
                                    f"the first sample has {math.prod(probe.shape[1:])}")
                if (v.dtype.kind == "f") != (dtype.kind == "f"):
                    raise DataError(f"{flabel}: column {col!r} holds {v.dtype} here but {dtype} in the first file; "
                                    "use one type for every file")
                yield v.reshape((len(v), *row_shape))

    return _Array(name, (n, *row_shape), dtype, read)


# image folders
def _check_size(size: Any, label: str) -> tuple[int, int]:
    ok_int = (lambda s: isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0)
    if ok_int(size):
        return int(size), int(size)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(ok_int(s) for s in size):
        return int(size[0]), int(size[1])
    raise DataError(f"{label}: size must be a positive integer or [height, width], got {size!r}")


def _image_files(root: Path, label: str) -> tuple[dict[str, list[tuple[int, tuple[Path, str, os.stat_result]]]],
                                                   list[str]]:
    """Every image of both splits as (class index, (path, label, stat)), and the sorted class names."""
    found: dict[str, dict[str, list[tuple[Path, str, os.stat_result]]]] = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{label}: no {split!r} folder (expected {os.path.join(label, split, '<class>', '*.png')})")
        classes = sorted(c.name for c in d.iterdir() if c.is_dir() and not c.name.startswith("."))
        if not classes:
            raise DataError(f"{os.path.join(label, split)}: no class folders (expected "
                            f"{os.path.join(label, split, '<class>', '*.png')})")
        found[split] = {}
        for cls in classes:
            cdir, clabel = d / cls, os.path.join(label, split, cls)
            items = []
            for dirpath, dirnames, filenames in os.walk(cdir, followlinks=True):
                dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
                for fn in sorted(filenames):
                    if fn.lower().endswith(IMAGE_EXTENSIONS) and not fn.startswith("."):
                        fp = Path(dirpath) / fn
                        items.append((fp, os.path.join(clabel, str(fp.relative_to(cdir))), fp.stat()))
            if not items:
                raise DataError(f"{clabel}: empty class folder (no {'/'.join(IMAGE_EXTENSIONS)} files)")
            found[split][cls] = sorted(items, key=lambda it: str(it[0].relative_to(cdir)))
    classes = sorted(found["train"])
    unknown = [c for c in found["test"] if c not in found["train"]]
    if unknown:
        raise DataError(f"{os.path.join(label, 'test', unknown[0])}: class {unknown[0]!r} is not a train class "
                        f"(train classes: {', '.join(classes)})")
    index = {c: i for i, c in enumerate(classes)}
    files = {split: [(index[c], it) for c in sorted(found[split]) for it in found[split][c]] for split in found}
    return files, classes


def _decode_images(tmp: Path, files: Mapping[str, list[tuple[int, tuple[Path, str, os.stat_result]]]],
                   classes: list[str], hw: tuple[int, int], channels: int | None) -> dict[str, Any]:
    from PIL import Image, UnidentifiedImageError

    errors = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)
    if channels is None:  # grayscale only if every image is (headers only: no pixel decoding)
        channels = 1
        for items in files.values():
            for _, (p, plabel, _) in items:
                try:
                    with Image.open(p) as im:
                        mode = im.mode
                except errors as e:
                    raise DataError(f"{plabel}: cannot decode image: {e}") from None
                if mode not in _GRAY_MODES:
                    channels = 3
                    break
            if channels == 3:
                break
    h, w = hw
    for split, items in files.items():
        x = np.lib.format.open_memmap(tmp / f"x_{split}.npy", mode="w+", dtype=np.float32,
                                      shape=(len(items), channels, h, w))
        y = np.empty(len(items), np.int64)
        for i, (cls, (p, plabel, _)) in enumerate(items):
            try:
                with Image.open(p) as im:
                    im.load()
                    x[i] = _pixels(im, channels, hw)
            except errors as e:
                raise DataError(f"{plabel}: cannot decode image: {e}") from None
            y[i] = cls
        x.flush()
        del x
        np.save(tmp / f"y_{split}.npy", y)
    return {"classes": classes, "channels": channels, "size": [h, w],
            "n": {s: len(v) for s, v in files.items()}}


def _pixels(im: Any, channels: int, hw: tuple[int, int]) -> np.ndarray:
    """One image as float32 (channels, h, w) in [0, 1]."""
    from PIL import Image

    h, w = hw
    bilinear = Image.Resampling.BILINEAR
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):  # high bit depth grayscale: keep the precision
        a = np.asarray(im, dtype=np.float32)
        if im.mode != "F":
            a = a / 65535.0
        g = Image.fromarray(a)  # mode "F"
        if g.size != (w, h):
            g = g.resize((w, h), bilinear)
        a = np.clip(np.asarray(g, dtype=np.float32), 0.0, 1.0)
        return np.broadcast_to(a, (channels, h, w))
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (w, h):
        im = im.resize((w, h), bilinear)
    a = np.asarray(im, dtype=np.float32) / 255.0
    return a[None] if channels == 1 else a.transpose(2, 0, 1)
