"""Log runs trained anywhere (your own loop, Lightning, a cluster job) into a raydyn store.

::

    import raydyn

    with raydyn.track("results", sweep="my_resnets", config={"lr": 0.1, "width": 64, "seed": 0}) as run:
        for step in range(steps):
            ...                                   # your own training step
            if step % 10 == 0:
                run.log(step, train_loss=loss.item(), test_acc=acc, model=model)  # model: a weight snapshot

The rows land in the same ``runs`` / ``metrics`` / ``weights`` tables, with the same schema, as runs
trained by ``raydyn sweep run``: config values become typed ``runs`` columns (nested mappings joined
with ``_``), so ``raydyn phase-map``, ``raydyn query`` and every ``raydyn analyze`` job read them as
they are. Snapshots take the same ``weights`` options as a sweep file's ``train.weights``
(``layers``, ``max_size``, ``projection_dim``, ``dtype``).

How it is written
-----------------
- Records are buffered in memory and flushed every ``flush_every`` records (and at the end) as one
  *part* per table: the snapshots first (``weights/.../part-track-<run>-<n>.parquet``), then the
  metric rows of the same records under the same name, which commit the flush. Every file is
  written to a temporary name and renamed, so a crash (even SIGKILL) loses at most the records
  since the last flush and never leaves a half-written file.
- The ``runs`` row is written last, when the block ends: status ``completed``, ``diverged`` (a
  metric whose name contains ``loss`` was NaN or infinite) or ``failed`` (an exception escaped the
  block; it is re-raised). A run with parts but no ``runs`` row was interrupted.
- Each run writes only its own files, so any number of processes (Ray tasks, ``torchrun`` ranks,
  machines sharing one object-store store) log different runs into one store concurrently without
  locks. Under ``torchrun`` only rank 0 logs (``$RANK``); other ranks get a run that does nothing.
- Run ids are given (``run_id=``) or derived from the sweep name and the config (seed included).
  Logging a run id the store already holds is refused unless ``resume=True``, which continues
  after the last committed step (records at or before it are dropped, so nothing is duplicated).
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import sys
import time
import types
import warnings
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydyn.errors import RaydynError, RaydynWarning

if TYPE_CHECKING:  # pragma: no cover
    from raydyn.spec import SweepSpec
    from raydyn.store.schema import WeightsLayout

__all__ = ["track", "Run", "TrackedSweep", "TRACKED", "TuneCallback", "LightningCallback", "is_tracked", "tracked_axes"]

#: ``method`` / ``kind`` of a sweep whose runs were logged with :func:`track` (it has no sweep file).
TRACKED = "tracked"
PART_PREFIX = "track-"
#: records per flush by default: at record_every 10 that is one part per 1,000 training steps
DEFAULT_FLUSH_EVERY = 100
#: a flush is forced once the buffered snapshots reach this many bytes
FLUSH_BYTES = 256 * 2**20
_PREFAULT_BYTES = 64 * 2**20
#: columns of the runs table that the tracker writes; config keys may not take these names
RESERVED = frozenset({"run_id", "population", "status", "steps_done", "wall_time_s", "config_json",
                      "weights_layout", "versions", "sweep", "initial_train_loss", "max_train_loss",
                      "diverged_step", "population_size", "record_every"})
_KEY_COLUMNS = ("run_id", "step", "sweep")


def tracked_sweep_text(sweep: str) -> str:
    """The text stored as a tracked sweep's ``sweep.yaml`` (it has no sweep file of its own)."""
    return (f"# Runs logged with raydyn.track or imported (trained outside raydyn): no sweep file.\n"
            f"name: {sweep}\nmethod: {TRACKED}\n")


def is_tracked(store: Any, sweep: str) -> bool:
    """Whether ``sweep`` in ``store`` holds tracked/imported runs (not a sweep file's)."""
    return (store.sweep_meta(sweep) or {}).get("kind") == TRACKED


def register_tracked(store: Any, sweep: str) -> None:
    """Record ``sweep`` as a tracked sweep (idempotent; safe when several processes do it at once:
    they write the same text). Refuses a name that a sweep file's runs already use."""
    from raydyn.store import validate_name

    try:
        validate_name("sweep", sweep)
    except Exception as e:
        raise RaydynError(str(e)) from None
    meta = store.sweep_meta(sweep)
    if meta is not None:
        if meta.get("kind") != TRACKED:
            raise RaydynError(f"sweep {sweep!r} in store {store.uri} holds runs of a sweep file (`raydyn sweep "
                              "run`); log tracked runs under another sweep name")
        return
    text = tracked_sweep_text(sweep)
    store.put_sweep(sweep, text, {"kind": TRACKED, "method": TRACKED,
                                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


# ------------------------------------------------------------------------------ config -> columns
def _plain(v: Any, path: str) -> Any:
    """A config value as JSON: numpy/torch scalars unwrapped; anything else is refused by name."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return _plain(v.item(), path)
    if isinstance(v, Mapping):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise RaydynError(f"config{path}: key {k!r} is not a string")
            out[k] = _plain(x, f"{path}.{k}")
        return out
    if isinstance(v, (list, tuple)):
        return [_plain(x, f"{path}[{i}]") for i, x in enumerate(v)]
    raise RaydynError(f"config{path}: a {type(v).__name__} ({v!r:.60}) is not a number, string, bool, list or "
                      "mapping; log str(value) to keep it as a label")


def config_columns(config: Mapping[str, Any]) -> dict[str, Any]:
    """Typed ``runs`` columns of a config: nested mappings flattened with ``_`` (``{"opt": {"lr": 1}}`` ->
    ``opt_lr``), lists as JSON text. Refuses keys that collide with the columns raydyn writes."""
    out: dict[str, Any] = {}

    def walk(d: Mapping[str, Any], prefix: str, path: str) -> None:
        for k, v in d.items():
            name, where = prefix + k, f"{path}.{k}" if path else k
            if isinstance(v, dict):
                walk(v, name + "_", where)
                continue
            if name in RESERVED or name.startswith("final_"):
                raise RaydynError(f"config key {where!r} would be the runs column {name!r}, which raydyn writes "
                                  "itself; rename it")
            if name in out:
                raise RaydynError(f"config key {where!r} flattens to column {name!r}, which another key also "
                                  "gives; rename one of them")
            out[name] = json.dumps(v) if isinstance(v, list) else v
    walk(config, "", "")
    return out


def derived_run_id(sweep: str, config: Mapping[str, Any]) -> str:
    """The run id of a tracked run without one: a hash of its sweep name and config (seed included)."""
    digest = hashlib.sha256(json.dumps([sweep, config], sort_keys=True, default=str).encode()).hexdigest()
    return "t" + digest[:15]


# ------------------------------------------------------------------------------ snapshots
class _Snapshotter:
    """Flat weight (and buffer) vectors of a model, laid out as raydyn's recorder lays them out."""

    def __init__(self, model: Any, wcfg: dict[str, Any]):
        import dataclasses

        import torch

        from raydyn.train.recorder import weights_layout

        self.torch = torch
        self.from_module = isinstance(model, torch.nn.Module)
        params, buffers = self._split(model)
        if not params:
            raise RaydynError("run.log(model=...): the model has no floating-point parameters to snapshot")
        self.layout, self.sketch = weights_layout(list(params), [tuple(p.shape) for p in params.values()], wcfg)
        dtype = wcfg.get("dtype")
        if dtype is None:  # the parameters' own precision when it is float64, else float32 (as in sweeps)
            dtype = "float64" if next(iter(params.values())).dtype == torch.float64 else "float32"
        if dtype not in ("float32", "float64"):
            raise RaydynError(f"weights.dtype: {dtype!r}; use float32 or float64")
        self.dtype = torch.float64 if dtype == "float64" else torch.float32
        self.layout = dataclasses.replace(self.layout, dtype=dtype)
        self.buffer_names = list(buffers)
        if self.buffer_names:
            self.layout = dataclasses.replace(self.layout, buffer_names=list(buffers),
                                              buffer_shapes=[list(b.shape) for b in buffers.values()])

    def _split(self, model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        torch = self.torch
        model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel wrappers
        if isinstance(model, torch.nn.Module):
            params = {n: p for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}
            # as the recorder stores them: floating buffers (batch norm statistics), then frozen parameters
            buffers = {n: b for n, b in model.named_buffers() if b.is_floating_point()}
            buffers.update({n: p for n, p in model.named_parameters() if not p.requires_grad})
            return params, buffers
        if isinstance(model, Mapping):  # a state dict: every floating tensor is a stored parameter
            params = {n: torch.as_tensor(t) for n, t in model.items()
                      if hasattr(t, "dtype") and torch.as_tensor(t).is_floating_point()}
            return params, {}
        raise RaydynError(f"run.log(model=...): expected a torch.nn.Module or a state dict, got {type(model).__name__}")

    def sizes(self) -> tuple[int, int]:
        """(stored weight vector length, buffer vector length)."""
        nb = sum(int(np.prod(s)) for s in self.layout.buffer_shapes or [])
        return int(self.layout.dim), nb

    def into(self, model: Any, wrow: np.ndarray, brow: np.ndarray | None) -> None:
        """Write the model's snapshot into the host rows ``wrow`` (D,) and ``brow`` (buffers), one copy."""
        torch = self.torch
        params, buffers = self._split(model)
        if tuple(params) != self.layout.param_names:
            raise RaydynError("run.log(model=...): the model's parameters changed between snapshots "
                              f"({len(params)} tensors now, {len(self.layout.param_names)} at the first); one run "
                              "logs one architecture")
        with torch.no_grad():
            self._flat([params[n] for n in self.layout.names], torch.from_numpy(wrow), self.sketch)
            if brow is not None:
                self._flat([buffers[n] for n in self.buffer_names], torch.from_numpy(brow), None)

    def _flat(self, tensors: list[Any], out: Any, sketch: Any) -> None:
        torch = self.torch
        parts = [t.detach().reshape(-1) for t in tensors]
        if sketch is None and all(t.device.type == "cpu" and t.dtype == out.dtype for t in parts):
            torch.cat(parts, out=out)  # straight into the host buffer
            return
        flat = torch.cat([t.to(out.dtype) for t in parts])
        if sketch is not None:
            bucket, sign = sketch
            if bucket.device != flat.device:
                self.sketch = bucket, sign = bucket.to(flat.device), sign.to(flat.device)
            flat = torch.zeros(self.layout.dim, dtype=out.dtype, device=flat.device).index_add_(
                0, bucket, flat * sign.to(out.dtype))
        out.copy_(flat)

    def resumed(self, stored: Any, run_id: str) -> None:
        """Refuse to resume a run whose stored snapshots (``stored``: a WeightsLayout, or None) differ from this
        model's."""
        if stored is not None and stored.kind not in (None, "none"):
            mine = {k: self.layout.to_dict().get(k) for k in ("kind", "names", "dim")}
            theirs = {k: stored.to_dict().get(k) for k in ("kind", "names", "dim")}
            if mine != theirs:
                raise RaydynError(f"resume of run {run_id!r}: the model's snapshot layout {mine} differs from the "
                                  f"stored one {theirs}")


def _matrix(mat: np.ndarray) -> pa.Array:
    from raydyn.train.recorder import _list_column

    return _list_column(mat)


# ------------------------------------------------------------------------------ the run
class Run:
    """One tracked run. Use as a context manager (``with raydyn.track(...) as run``) or call
    :meth:`finish` yourself. ``log`` buffers, ``flush`` writes what is buffered."""

    def __init__(self, store: Any = None, *, sweep: str, config: Mapping[str, Any] | None = None,
                 run_id: str | None = None, seed: int | None = None, resume: bool = False,
                 flush_every: int = DEFAULT_FLUSH_EVERY, weights: Mapping[str, Any] | None = None,
                 active: bool = True):
        from raydyn.store import Store, open_store, validate_name

        self.active = active
        self.sweep = sweep
        self.finished = False
        if not active:
            return
        if not isinstance(flush_every, int) or flush_every < 1:
            raise RaydynError(f"flush_every={flush_every!r}: give a positive number of records")
        self.store = store if isinstance(store, Store) else open_store(store, write=True)
        if config is not None and not isinstance(config, Mapping):
            raise RaydynError(f"config must be a mapping of settings, got {type(config).__name__}")
        cfg = _plain(dict(config or {}), "")
        if seed is not None and "seed" in cfg and cfg["seed"] != seed:
            raise RaydynError(f"seed={seed!r} but config['seed'] is {cfg['seed']!r}; give it once")
        cfg.setdefault("seed", 0 if seed is None else seed)
        if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
            raise RaydynError(f"config['seed'] = {cfg['seed']!r}: a seed is an integer")
        self.config = cfg
        self.columns = config_columns(cfg)
        self.run_id = derived_run_id(sweep, cfg) if run_id is None else run_id
        try:
            validate_name("run", self.run_id)
        except Exception as e:
            raise RaydynError(str(e).replace("run name", "run id")) from None
        self.wcfg = {"max_size": 200_000, "projection_dim": 4096, "layers": None, "dtype": None, **dict(weights or {})}
        unknown = set(self.wcfg) - {"max_size", "projection_dim", "layers", "dtype"}
        if unknown:
            raise RaydynError(f"weights: unknown option(s) {sorted(unknown)}; known: layers, max_size, projection_dim, dtype")
        for key, low in (("max_size", 0), ("projection_dim", 8)):
            v = self.wcfg[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RaydynError(f"weights.{key} = {v!r}: give an integer >= {low}")
        layers = self.wcfg["layers"]
        if layers is not None and (isinstance(layers, str) or not all(isinstance(p, str) for p in layers)):
            raise RaydynError(f"weights.layers = {layers!r}: give a list of parameter-name prefixes")
        self.flush_every = flush_every
        register_tracked(self.store, sweep)
        self._rows: list[tuple[int, dict[str, Any]]] = []
        # snapshots of the records since the last flush, rows of preallocated host buffers
        self._snap_steps_buf: list[int] = []
        self._wbuf: np.ndarray | None = None
        self._bbuf: np.ndarray | None = None
        self._snapshot: _Snapshotter | None = None
        self._writer: Any = None  # one background thread writing flushed parts, in order
        self._pending: list[Any] = []
        self._pool: list[tuple[np.ndarray, np.ndarray | None]] = []  # snapshot buffers written and free again
        self._kinds: dict[str, str] = {}  # metric -> "scalar" | "list"
        self._last: dict[str, float] = {}
        self._first_loss: float | None = None
        self._max_loss = -math.inf
        self._diverged_step: int | None = None
        self._snap_steps: list[int] = []
        self._last_step: int | None = None
        self._skipped = 0
        self._seq = 0
        self._prior_wall = 0.0
        self._stored_layout: WeightsLayout | None = None
        self._start(resume)
        # the last step stored before this session: on resume, records up to it are dropped
        self._resume_floor = -1 if self._last_step is None else self._last_step
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ start / resume
    def _own_parts(self, table: str) -> dict[int, str]:
        """This run's parts of ``table``: flush number -> part name (``track-<run>-<n>``; a run id that
        extends this one, ``<run>-2``, has parts that start alike but are not followed by digits only)."""
        prefix = f"{PART_PREFIX}{self.run_id}-"
        return {int(p[len(prefix):]): p for p in self.store.parts(table, self.sweep, prefix) if p[len(prefix):].isdigit()}

    def _start(self, resume: bool) -> None:
        from raydyn.store.schema import WeightsLayout

        st, sweep, rid = self.store, self.sweep, self.run_id
        run_filter = pc.field("run_id") == rid
        metric_parts = self._own_parts("metrics")
        row = st.table("runs", sweep=sweep, filter=run_filter).to_pylist()
        if (row or metric_parts) and not resume:
            what = (f"with status {row[0]['status']!r}" if row else
                    f"interrupted after step {self._committed_max()} (no runs row)")
            raise RaydynError(f"run {rid!r} is already in sweep {sweep!r} of store {st.uri} ({what}); pass "
                              "resume=True to continue it, or give another run_id / config")
        if not (row or metric_parts):
            return
        if row:
            r = row[0]
            self._prior_wall = float(r.get("wall_time_s") or 0.0)
            stored = WeightsLayout.from_json(r.get("weights_layout"))
            self._stored_layout = stored if stored.to_dict() else None  # "{}": as if none was stored
            if json.loads(r["config_json"]) != self.config:
                raise RaydynError(f"resume of run {rid!r}: its config differs from the stored one "
                                  f"({r['config_json']}); resume with the same config")
        self._seq = max(metric_parts) + 1 if metric_parts else 0
        # snapshots of a flush that died before its metric rows (the commit marker) are not committed
        for n, p in self._own_parts("weights").items():
            if n >= self._seq:
                st.delete_part("weights", sweep, p)
        m = st.table("metrics", sweep=sweep, filter=run_filter)
        if m.num_rows:
            m = m.sort_by("step")
            steps = m.column("step").to_numpy()
            self._last_step = int(steps[-1])
            for name in m.column_names:
                if name in _KEY_COLUMNS:
                    continue
                col = m.column(name)
                self._kinds[name] = "list" if pa.types.is_list(col.type) else "scalar"
                if self._kinds[name] == "scalar":
                    vals = col.to_numpy(zero_copy_only=False).astype(float)
                    for s, v in zip(steps, vals):
                        self._observe(int(s), name, float(v))
        w = st.table("weights", sweep=sweep, columns=["step"], filter=run_filter)
        self._snap_steps = sorted(w.column("step").to_pylist())

    def _committed_max(self) -> int:
        m = self.store.table("metrics", sweep=self.sweep, columns=["step"], filter=pc.field("run_id") == self.run_id)
        return int(pc.max(m.column("step")).as_py()) if m.num_rows else -1

    # ------------------------------------------------------------------ logging
    def _observe(self, step: int, name: str, v: float) -> None:
        self._last[name] = v
        if "loss" in name and not math.isfinite(v) and self._diverged_step is None:
            self._diverged_step = step
        if name == "train_loss":
            if self._first_loss is None:
                self._first_loss = v
            if math.isfinite(v):
                self._max_loss = max(self._max_loss, v)

    def log(self, step: int, values: Mapping[str, Any] | None = None, /, *, model: Any = None, **metrics: Any) -> None:
        """Record metrics (and, with ``model``, a weight snapshot) at training step ``step``.

        Metrics are numbers (Python, numpy or 0-d tensors) or 1-d vectors (lists, arrays, tensors:
        stored as list<float64>); give names that are not Python identifiers (``"train/loss"``) in
        ``values``. Steps must increase. Returns nothing; rows are written at the next flush."""
        if not self.active:
            return
        if self.finished:
            raise RaydynError(f"run {self.run_id!r} is finished; start another raydyn.track block to log more")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise RaydynError(f"run.log: step must be a non-negative integer, got {step!r}")
        step = int(step)
        if step <= self._resume_floor:
            self._skipped += 1  # resume: this step is already stored
            return
        if self._last_step is not None and step <= self._last_step:
            raise RaydynError(f"run.log: step {step} after step {self._last_step}; steps must increase")
        row = dict(values or {})
        row.update(metrics)
        out: dict[str, Any] = {}
        for name, v in row.items():
            if not isinstance(name, str) or not name or name in _KEY_COLUMNS:
                raise RaydynError(f"run.log: {name!r} cannot be a metric name (reserved or empty)")
            out[name] = self._value(name, v)
        self._rows.append((step, out))
        self._last_step = step
        for name, v in out.items():
            if not isinstance(v, list):
                self._observe(step, name, v)
        if model is not None:
            if self._snapshot is None:
                self._snapshot = _Snapshotter(model, self.wcfg)
                self._snapshot.resumed(self._stored_layout, self.run_id)
            if self._wbuf is None:
                self._new_buffers()
            k = len(self._snap_steps_buf)
            self._snapshot.into(model, self._wbuf[k], None if self._bbuf is None else self._bbuf[k])
            self._snap_steps_buf.append(step)
            self._snap_steps.append(step)
        if len(self._rows) >= self.flush_every or (self._wbuf is not None and len(self._snap_steps_buf) == len(self._wbuf)):
            self.flush()

    def _new_buffers(self) -> None:
        """Snapshot buffers for the next records: recycled from a finished write when one is free, else new
        ones mapped in at once (fresh memory faulted in page by page on first touch cost ~1.5 ms a snapshot
        of 85k floats here, 30 times the copy itself; a run's first flushes all get new buffers)."""
        from raydyn.train.recorder import _prefaulted

        if self._pool:
            self._wbuf, self._bbuf = self._pool.pop()
            return
        dim, nb = self._snapshot.sizes()
        dtype = np.float64 if self._snapshot.dtype == self._snapshot.torch.float64 else np.float32
        rows = max(1, min(self.flush_every, FLUSH_BYTES // ((dim + nb) * np.dtype(dtype).itemsize)))
        # mapped in whole only up to _PREFAULT_BYTES: a big model's buffer of a few snapshots (up to FLUSH_BYTES)
        # is not committed before it is filled, and its steps are long enough that the faults do not show
        new = _prefaulted if rows * (dim + nb) * np.dtype(dtype).itemsize <= _PREFAULT_BYTES else np.empty
        self._wbuf = new((rows, dim), dtype)
        self._bbuf = new((rows, nb), dtype) if nb else None

    def _value(self, name: str, v: Any) -> Any:
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            v = v.item() if v.ndim == 0 else v.double().reshape(-1).tolist()
        elif isinstance(v, np.ndarray):
            v = v.item() if v.ndim == 0 else v.astype(float).reshape(-1).tolist()
        if v is None:
            v = math.nan
        if isinstance(v, (list, tuple)):
            kind, v = "list", [float(x) for x in v]
        elif isinstance(v, numbers.Real):
            kind, v = "scalar", float(v)
        else:
            raise RaydynError(f"run.log: metric {name!r} = {v!r:.60} is not a number or a 1-d vector")
        if self._kinds.setdefault(name, kind) != kind:
            raise RaydynError(f"run.log: metric {name!r} was logged as a {self._kinds[name]} before, now as a {kind}")
        return v

    # ------------------------------------------------------------------ writing
    def flush(self, wait: bool = False) -> None:
        """Hand the buffered records to the writer thread: the snapshots' part, then the metric rows' part
        (the commit). ``wait``: return only when everything handed over so far is written. A write error
        is raised here or at the next log/flush/finish, naming the file."""
        if not self.active:
            return
        self._reap()
        if self._rows or self._snap_steps_buf:
            part = f"{PART_PREFIX}{self.run_id}-{self._seq:06d}"
            rows, steps, n = self._rows, self._snap_steps_buf, len(self._snap_steps_buf)
            bufs = (self._wbuf, self._bbuf) if n else None
            self._rows, self._snap_steps_buf = [], []
            if n:
                self._new_buffers()  # the filled ones belong to the writer until it is done
            self._seq += 1
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"raydyn-track-{self.run_id}",
                                                  initializer=_lower_priority)
            while len(self._pending) >= 2:  # at most two flushes in memory besides the one being filled
                self._pending.pop(0).result()
            self._pending.append(self._writer.submit(self._write, part, rows, steps, bufs))
        if wait:
            while self._pending:
                self._pending.pop(0).result()

    def _reap(self) -> None:
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()  # raises the write's error, if any

    def _write(self, part: str, rows: list, steps: list[int], bufs: tuple[np.ndarray, np.ndarray | None] | None) -> None:
        if bufs is not None:
            n = len(steps)
            cols = {"run_id": pa.array([self.run_id] * n, pa.string()),
                    "step": pa.array(steps, pa.int64()), "weights": _matrix(bufs[0][:n])}
            if bufs[1] is not None:
                cols["buffers"] = _matrix(bufs[1][:n])
            self.store.write_part("weights", self.sweep, part, pa.table(cols))
            del cols
            self._pool.append(bufs)  # written: free for the next records
        if rows:
            self.store.write_part("metrics", self.sweep, part, self._metrics_table(rows))

    def _metrics_table(self, rows: list[tuple[int, dict[str, Any]]]) -> pa.Table:
        names = list(dict.fromkeys(n for _, r in rows for n in r))
        cols: dict[str, Any] = {"run_id": pa.array([self.run_id] * len(rows), pa.string()),
                                "step": pa.array([s for s, _ in rows], pa.int64())}
        for n in names:
            if self._kinds[n] == "list":
                cols[n] = pa.array([r.get(n) for _, r in rows], pa.list_(pa.float64()))
            else:
                cols[n] = pa.array([r.get(n, math.nan) for _, r in rows], pa.float64())
        return pa.table(cols)

    def _runs_row(self, status: str) -> pa.Table:
        from raydyn.store import runs_schema_check
        from raydyn.store.schema import WeightsLayout, library_versions

        layout = self._snapshot.layout if self._snapshot is not None else (self._stored_layout or WeightsLayout(kind="none"))
        every = self.config.get("record_every")
        if not isinstance(every, int) or isinstance(every, bool):
            steps = self._snap_steps or []
            gaps = np.diff(np.unique(steps)) if len(steps) > 1 else np.array([], int)
            every = int(np.bincount(gaps).argmax()) if gaps.size else 1
        row: dict[str, Any] = {
            "run_id": self.run_id, "population": self.run_id, "status": status,
            **self.columns,
            **{f"final_{k}": float(v) for k, v in self._last.items()},
            "initial_train_loss": math.nan if self._first_loss is None else float(self._first_loss),
            "max_train_loss": float(self._max_loss) if math.isfinite(self._max_loss) else math.nan,
            "diverged_step": -1 if self._diverged_step is None else int(self._diverged_step),
            "steps_done": -1 if self._last_step is None else int(self._last_step),
            "record_every": int(every),
            "population_size": 1,
            "wall_time_s": self._prior_wall + time.perf_counter() - self._t0,
            "config_json": json.dumps(self.config, sort_keys=True),
            "weights_layout": layout.to_json(),
            "versions": json.dumps({**library_versions(), "source": "raydyn.track"}, sort_keys=True),
        }
        table = pa.Table.from_pylist([row])
        fields = []
        for f in table.schema:
            if pa.types.is_null(f.type):
                f = f.with_type(pa.string())
            elif f.name.startswith("final_") or f.name in ("initial_train_loss", "max_train_loss", "wall_time_s"):
                f = f.with_type(pa.float64())
            fields.append(f)
        table = table.cast(pa.schema(fields))
        runs_schema_check(table)
        return table

    def finish(self, status: str | None = None) -> str:
        """Flush and write the runs row (status ``completed``, or ``diverged`` when a loss was NaN/inf;
        ``failed`` when given). Returns the status. Idempotent."""
        if not self.active or self.finished:
            return getattr(self, "status", "")
        try:
            self.flush(wait=True)
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
        if status is None:
            status = "diverged" if self._diverged_step is not None else "completed"
        self.store.write_part("runs", self.sweep, f"{PART_PREFIX}{self.run_id}", self._runs_row(status))
        self.finished, self.status = True, status
        if self._skipped:
            warnings.warn(f"run {self.run_id!r}: {self._skipped} record(s) at or before step {self._resume_floor} "
                          "were already stored and were skipped (resume)", RaydynWarning, stacklevel=2)
        return status

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if not self.active or self.finished:
            return False
        if exc_type is None:
            self.finish()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.flush(wait=True)  # interrupted, not failed: what was logged is kept and resume=True continues it
        else:
            self.finish("failed")
        return False

    def __repr__(self) -> str:
        if not self.active:
            return f"Run(inactive, sweep={self.sweep!r})"
        return f"Run({self.run_id!r}, sweep={self.sweep!r}, store={self.store.uri!r})"


def _lower_priority() -> None:
    """The writer thread yields to the training loop: nice +10 for this thread only (Linux; elsewhere a no-op)."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError, PermissionError):
        pass


def _rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


def track(store: Any = None, *, sweep: str, config: Mapping[str, Any] | None = None, run_id: str | None = None,
          seed: int | None = None, resume: bool = False, flush_every: int = DEFAULT_FLUSH_EVERY,
          weights: Mapping[str, Any] | None = None, rank: int | None = None) -> Run:
    """Start logging one run into ``store`` (a path or URI; None: ``$RAYDYN_STORE`` or ``./raydyn-results``).

    ``sweep``: the name the run is filed under (a tracked sweep: phase maps, reports and analyses take
    it like any other). ``config``: the run's settings (become typed ``runs`` columns; ``seed`` is one of
    them, default 0). ``run_id``: default derived from sweep + config. ``resume``: continue a run already
    in the store after its last committed step. ``flush_every``: records buffered before a write.
    ``weights``: snapshot options (``layers``, ``max_size``, ``projection_dim``, ``dtype``). ``rank``:
    the process rank (default ``$RANK``); only rank 0 writes.
    """
    active = (_rank() if rank is None else int(rank)) == 0
    return Run(store, sweep=sweep, config=config, run_id=run_id, seed=seed, resume=resume,
               flush_every=flush_every, weights=weights, active=active)


# ------------------------------------------------------------------------------ framework callbacks
class TuneCallback:
    """A Ray Tune callback logging every trial's reported results as one tracked run.

    ``tune.Tuner(..., run_config=tune.RunConfig(callbacks=[raydyn.track.TuneCallback("results",
    sweep="my_tune")]))``: each trial becomes a run (its config as columns, run id = the trial id),
    each ``tune.report`` a record at ``training_iteration`` (or ``step_key``). Numeric results only;
    snapshots need :func:`track` inside the trainable."""

    def __new__(cls, *args: Any, **kwargs: Any):
        from ray.tune import Callback

        class _TuneCallback(Callback):
            def __init__(self, store: Any = None, *, sweep: str, step_key: str = "training_iteration",
                         flush_every: int = DEFAULT_FLUSH_EVERY):
                self.store, self.sweep, self.step_key, self.flush_every = store, sweep, step_key, flush_every
                self.runs: dict[str, Run] = {}

            def _run(self, trial) -> Run:
                if trial.trial_id not in self.runs:
                    cfg = {k: v for k, v in (trial.config or {}).items()}
                    self.runs[trial.trial_id] = Run(self.store, sweep=self.sweep, config=_tune_config(cfg),
                                                    run_id=f"tune-{trial.trial_id}", flush_every=self.flush_every)
                return self.runs[trial.trial_id]

            def on_trial_result(self, iteration, trials, trial, result, **info):
                step = result.get(self.step_key, result.get("training_iteration"))
                values = {k: v for k, v in result.items() if k != self.step_key and _is_metric(k, v)}
                self._run(trial).log(int(step), values)

            def on_trial_complete(self, iteration, trials, trial, **info):
                if trial.trial_id in self.runs:
                    self.runs.pop(trial.trial_id).finish()

            def on_trial_error(self, iteration, trials, trial, **info):
                if trial.trial_id in self.runs:
                    self.runs.pop(trial.trial_id).finish("failed")

        return _TuneCallback(*args, **kwargs)


_TUNE_BOOKKEEPING = {"training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "time_since_restore",
                     "iterations_since_restore", "timesteps_total", "episodes_total", "timesteps_since_restore",
                     "pid", "done", "trial_id", "date", "hostname", "node_ip", "experiment_tag", "checkpoint_dir_name"}


def _is_metric(k: str, v: Any) -> bool:
    return k not in _TUNE_BOOKKEEPING and isinstance(v, numbers.Real) and not isinstance(v, bool)


def _tune_config(cfg: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        try:
            out[k] = _plain(v, f".{k}")
        except RaydynError:
            out[k] = str(v)
    return out


class LightningCallback:
    """PyTorch Lightning: log ``trainer.callback_metrics`` (and a snapshot of the module) every
    ``every`` optimiser steps as one tracked run. Lightning is not a raydyn dependency; this class
    needs ``lightning`` (or ``pytorch_lightning``) installed."""

    def __new__(cls, *args: Any, **kwargs: Any):
        try:
            from lightning.pytorch import Callback
        except ImportError:
            try:
                from pytorch_lightning import Callback
            except ImportError:
                raise RaydynError("raydyn.track.LightningCallback needs Lightning: pip install lightning") from None

        class _LightningCallback(Callback):
            def __init__(self, store: Any = None, *, sweep: str, config: Mapping[str, Any] | None = None,
                         every: int = 10, snapshots: bool = True, **track_kwargs: Any):
                self.args = dict(store=store, sweep=sweep, config=config, **track_kwargs)
                self.every, self.snapshots, self.run = every, snapshots, None

            def on_fit_start(self, trainer, pl_module):
                self.run = track(**self.args, rank=trainer.global_rank)

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                step = trainer.global_step
                if step % self.every == 0:
                    vals = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
                    self.run.log(step, vals, model=pl_module if self.snapshots else None)

            def on_fit_end(self, trainer, pl_module):
                if self.run is not None:
                    self.run.finish()

            def on_exception(self, trainer, pl_module, exception):
                if self.run is not None:
                    self.run.finish("failed")

        return _LightningCallback(*args, **kwargs)


def tracked_axes(store: Any, sweep: str) -> list[str]:
    """Config columns whose value differs between a tracked sweep's runs, in first-seen order."""
    runs = store.table("runs", sweep=sweep, columns=["config_json"])
    values: dict[str, set[str]] = {}
    for text in runs.column("config_json").to_pylist() if runs.num_rows else []:
        for k, v in config_columns(json.loads(text)).items():
            values.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    return [k for k, vs in values.items() if len(vs) > 1]


class TrackedSweep:
    """What the CLI and the jobs need of a sweep, for a tracked sweep (it has no sweep file): its name,
    ``method`` ``"tracked"``, the axes its runs differ in, and the default phase thresholds."""

    method = TRACKED
    parameters: dict[str, Any] = {}
    phases: dict[str, Any] = {}

    def __init__(self, store: Any, name: str):
        self.store, self.name = store, name

    def axes(self) -> list[str]:
        return tracked_axes(self.store, self.name)

    def thresholds(self):
        from raydyn.analysis.phase import PhaseThresholds

        return PhaseThresholds()

    def expand(self) -> list[Any]:
        raise RaydynError(f"sweep {self.name!r} is a tracked sweep (runs logged with raydyn.track or imported): "
                          "it has no sweep file to expand or train")

    def __repr__(self) -> str:
        return f"TrackedSweep({self.name!r})"


def parse_stored(store: Any, sweep: str) -> SweepSpec | TrackedSweep | None:
    """The sweep file stored with ``sweep`` in ``store``, parsed (None when the store has none; a
    :class:`TrackedSweep` for runs logged with ``raydyn.track``). Plug-in
    modules are importable from the directory the sweep was launched in (recorded as ``base_dir``)."""
    text = store.sweep_text(sweep)
    if text is None:
        return None
    if (store.sweep_meta(sweep) or {}).get("kind") == "tracked":  # logged with raydyn.track: no sweep file
        return TrackedSweep(store, sweep)
    from raydyn.spec import parse_sweep
    from raydyn.tasks.plugins import add_search_path

    add_search_path((store.sweep_meta(sweep) or {}).get("base_dir"))
    return parse_sweep(text, f"{store.uri} sweeps/{sweep}/sweep.yaml")


def tracked_status(store: Any, sweep: str) -> dict[str, Any]:
    """``sweep status`` of a tracked sweep: runs by status; runs with committed records but no runs row
    are ``in_progress`` (still logging, or interrupted: ``resume=True`` finishes them). Nothing is missing."""
    runs = store.table("runs", sweep=sweep, columns=["run_id", "status"])
    by_status: dict[str, int] = {}
    for s in runs.column("status").to_pylist():
        by_status[s] = by_status.get(s, 0) + 1
    done = set(runs.column("run_id").to_pylist())
    logged = {p[len(PART_PREFIX):].rsplit("-", 1)[0] for p in store.parts("metrics", sweep, PART_PREFIX)}
    in_progress = sorted(logged - done)
    return {"sweep": sweep, "kind": TRACKED, "total": len(done) + len(in_progress), "in_store": len(done),
            "missing": 0, "in_progress": len(in_progress), "in_progress_runs": in_progress[:20],
            "by_status": by_status, "meta": store.sweep_meta(sweep)}


# ``raydyn.track(...)`` calls :func:`track`; ``raydyn.track.TuneCallback`` etc. are this module's names
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Run:
        return track(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
