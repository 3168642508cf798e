"""The recorder: what a population writes every ``record_every`` steps, and its Arrow tables.

Per run and record step: the minibatch loss (``batch_loss``), minibatch gradient norm,
learning rate, per-parameter-tensor Frobenius norms (``weight_norms``, a list in the
order of ``param_names`` in the run's ``weights_layout``, so that every population of
a sweep has the same metrics schema), and a weight
snapshot; at evaluation steps (``eval_every``, the first and the last step) also
train/test loss and accuracy on the evaluation sets (NaN on other rows). Snapshots hold every parameter as float32 while the model has at most
``weights.max_size`` of them; above that (or when ``weights.layers`` names a
subset) the layout actually stored is written into the run's ``weights_layout``
metadata: a chosen subset of tensors, and/or a seeded CountSketch projection to
``weights.projection_dim`` dimensions (each coordinate added with a random sign
into one random bucket; inner products are preserved in expectation).

Optional probes (``train.record``) add more metric columns; each is one function
in :data:`PROBES` taking the recorder context and returning (P,) tensors; trackers
(:data:`TRACKERS`, e.g. ``cmd_online``) keep their own state across records and add
tables of their own to the population's part.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import mmap
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from raydyn.store.schema import WeightsLayout, library_versions

SKETCH_SEED = 20240601

_NP = {torch.float64: np.float64, torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32,
       torch.bool: np.bool_, torch.uint8: np.uint8, torch.float16: np.float16}


class _Rows:
    """A population's snapshot rows, stored run-major as they are recorded: member i's k-th record goes to
    ``buf[i, k]``, so at the end the rows are already grouped by run in step order and the table's list
    column is a view of ``buf`` (no gather over hundreds of MB). Behaves as the list of record chunks
    ``(step, idx, rows)`` it replaces (iteration, ``append``), which checkpoints save.

    ``capacity``: records expected per member (grows if exceeded, e.g. a divergence record).
    """

    def __init__(self, P: int, capacity: int):
        self.P, self.capacity = P, max(1, capacity)
        self.buf: np.ndarray | None = None
        self.steps = np.zeros((P, self.capacity), dtype=np.int64)
        self.count = np.zeros(P, dtype=np.int64)
        self.history: list[tuple[int, np.ndarray]] = []  # (step, idx) per record, in order

    def append(self, chunk: tuple[int, np.ndarray, np.ndarray]) -> None:
        step, idx, rows = chunk
        self._allocate(rows.shape[1], rows.dtype)
        if len(idx) and int(self.count[idx].max()) >= self.buf.shape[1]:  # more records than planned
            grow = self.buf.shape[1]
            self.buf = np.concatenate([self.buf, np.empty((self.P, grow, self.buf.shape[2]), self.buf.dtype)], 1)
            self.steps = np.concatenate([self.steps, np.zeros((self.P, grow), np.int64)], 1)
        slots = self.count[idx]
        self.buf[idx, slots] = rows
        self.steps[idx, slots] = step
        self.count[idx] += 1
        self.history.append((int(step), np.asarray(idx).copy()))

    def _allocate(self, width: int, dtype: np.dtype) -> None:
        if self.buf is None:  # on the first record: its width and dtype are the buffer's
            self.buf = _prefaulted((self.P, self.capacity, width), dtype)

    def next_slot(self, width: int, dtype: np.dtype) -> np.ndarray | None:
        """The (P, width) view of the buffer that the next record of *every* member goes to, when every member
        has recorded equally often so far (the usual case), so that a caller writes the rows there itself (no
        intermediate copy); None otherwise (then :meth:`append`). Commit with :meth:`commit_slot`."""
        self._allocate(width, dtype)
        k = int(self.count[0])
        if self.buf.shape[2] != width or self.buf.dtype != np.dtype(dtype) or k >= self.buf.shape[1] \
                or not (self.count == k).all():
            return None
        return self.buf[:, k]

    def commit_slot(self, step: int) -> None:
        """Record that :meth:`next_slot`'s rows (every member) hold the record at ``step``."""
        k = int(self.count[0])
        self.steps[:, k] = step
        self.count += 1
        self.history.append((int(step), np.arange(self.P)))

    def __len__(self) -> int:
        return len(self.history)

    def __iter__(self):
        """The record chunks ``(step, idx, rows)`` in record order (rows copied out of the buffer)."""
        seen = np.zeros(self.P, dtype=np.int64)
        for step, idx in self.history:
            yield step, idx, self.buf[idx, seen[idx]]
            seen[idx] += 1

    def run_major(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(member index, step, rows) of every row, grouped by member in step order; a view when every
        member has the same number of records."""
        n = self.count
        members = np.repeat(np.arange(self.P), n)
        if (n == n[0]).all():
            k = int(n[0])
            return members, self.steps[:, :k].reshape(-1), self.buf[:, :k].reshape(self.P * k, -1)
        return (members, np.concatenate([self.steps[i, :n[i]] for i in range(self.P)]),
                np.concatenate([self.buf[i, :n[i]] for i in range(self.P)]))


def _prefaulted(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose memory is mapped in at once (Linux: an anonymous ``MAP_POPULATE``
    mapping), for the snapshot buffer, which is written whole record by record: ``np.empty`` memory is
    faulted in page by page on first write, and numpy asks for transparent huge pages on it, whose
    compaction stalls made those first writes cost 0.3-0.7 s of CPU per trial of 230 MB of snapshots, against
    ~0.1 s so. The planned records are all written in the usual case, so mapping them in early costs no memory."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    flag = getattr(mmap, "MAP_POPULATE", 0)
    if not flag or nbytes < 1 << 22:  # small buffers: the allocator's memory is as good
        return np.empty(shape, dtype=dtype)
    try:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flag)
    except (OSError, ValueError):
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(m, dtype=dtype).reshape(shape)  # the array keeps the mapping alive


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Copy tensors to numpy arrays in one device-to-host transfer (their bytes packed into one buffer).

    CPU tensors are returned as views without copying. This is the recorder's one crossing per record.
    """
    out: dict[str, np.ndarray] = {}
    dev = [(k, t) for k, t in tensors.items() if t.device.type != "cpu"]
    for k, t in tensors.items():
        if t.device.type == "cpu":
            out[k] = t.detach().numpy()
    if dev:
        flat = [t.detach().contiguous().reshape(-1).view(torch.uint8) for _, t in dev]
        raw = torch.cat(flat).cpu().numpy()
        pos = 0
        for (k, t), f in zip(dev, flat):
            n = f.numel()
            out[k] = raw[pos:pos + n].view(_NP[t.dtype]).reshape(tuple(t.shape))
            pos += n
    return out


def _weight_stats(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Hu et al. (2023) weight metrics per member (see raydyn.analysis.weight_stats.FEATURES)."""
    from raydyn.analysis.weight_stats import weight_stats

    return weight_stats(ctx["params"])


def _ntk(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """NTK top eigenvalue per member (column ``ntk_top``), see raydyn.train.curvature."""
    from raydyn.train.curvature import ntk_probe

    return ntk_probe(ctx)


def _sharpness(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Top Hessian eigenvalue of the train loss per member (column ``sharpness``), see raydyn.train.curvature."""
    from raydyn.train.curvature import sharpness_probe

    return sharpness_probe(ctx)


def _neurons(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """OPT/NPT/dead fractions per activation layer (list columns), see raydyn.train.neurons."""
    from raydyn.train.neurons import neurons_probe

    return neurons_probe(ctx)


# Probes: name -> fn(ctx) -> {column: (P,) tensor, or (P, L) for a list column}; a name here is a valid `train.record` entry.
# ctx: cfg, params (stacked, P leading), grads, opt, step, mask (members recorded now), state (a dict
# a probe may keep between records), and what the trainer passes as `context` (model, buffers, data, loss).
PROBES: dict[str, Callable[[dict[str, Any]], dict[str, torch.Tensor]]] = {
    "weight_stats": _weight_stats,
    "ntk": _ntk,
    "sharpness": _sharpness,
    "neurons": _neurons,
}


def _cmd_online(rec: "Recorder") -> Any:
    from raydyn.train.cmd_online import OnlineCMDTracker

    return OnlineCMDTracker(rec.cfg, rec.run_ids, rec.names, rec.shapes, data=rec.context.get("data"))


# Trackers: stateful recordings that summarise a member's whole trajectory as it goes
# (instead of storing every snapshot). name -> factory(recorder) -> object with
# ``update(step, idx, params)`` (called at every record with the recorded members) and
# ``tables() -> {table name: pa.Table}`` (written with the population's part).
def _symmetry(rec: "Recorder") -> Any:
    from raydyn.train.symmetry import SymmetryTracker

    return SymmetryTracker(rec)


# A tracker with ``per_step = True`` also gets ``on_step(step, params, grads, active)`` before
# and ``after_update(step, opt)`` after every optimiser step; one with ``state()``/``load_state()``
# is carried through population checkpoints.
TRACKERS: dict[str, Callable[["Recorder"], Any]] = {
    "cmd_online": _cmd_online,
    "symmetry": _symmetry,
}


def weights_layout(param_names: list[str], shapes: list[tuple[int, ...]], wcfg: dict[str, Any]
                   ) -> tuple[WeightsLayout, tuple[torch.Tensor, torch.Tensor] | None]:
    """The ``weights_layout`` of snapshots of parameters ``param_names`` (per-run ``shapes``) under the
    ``train.weights`` options ``wcfg`` (``layers``, ``max_size``, ``projection_dim``), and the CountSketch
    (bucket (D,), sign (D,) float64) when the stored vector is longer than ``max_size`` (else None).
    The sketch is seeded (:data:`SKETCH_SEED`), so every run of every store sketches the same way."""
    names, shapes, kind = list(param_names), [tuple(s) for s in shapes], "full"
    if wcfg.get("layers"):
        prefixes = wcfg["layers"]
        keep = [i for i, n in enumerate(names) if any(n.startswith(p) for p in prefixes)]
        if not keep:
            raise ValueError(f"train.weights.layers: {prefixes} match no parameter; parameters: {names}")
        names, shapes, kind = [names[i] for i in keep], [shapes[i] for i in keep], "layers"
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    dim = offsets[-1]
    layout = WeightsLayout(kind=kind, names=names, shapes=shapes, offsets=offsets, dim=dim,
                           param_names=list(param_names))
    if dim <= wcfg.get("max_size", 200_000):
        return layout, None
    k = int(wcfg.get("projection_dim", 4096))
    g = torch.Generator().manual_seed(SKETCH_SEED)
    bucket = torch.randint(0, k, (dim,), generator=g)
    sign = torch.randint(0, 2, (dim,), generator=g).double() * 2 - 1
    layout = dataclasses.replace(layout, kind=kind + "+countsketch", dim=k, source_dim=dim, sketch_seed=SKETCH_SEED)
    return layout, (bucket, sign)


class Recorder:
    """Collects metric rows and weight snapshots of a population (P members)."""

    def __init__(self, cfg: dict[str, Any], members: list[Any], params: dict[str, torch.Tensor],
                 context: dict[str, Any] | None = None, lrs: Any = None):
        self.cfg = cfg
        self.run_ids = [m.run_id for m in members]
        self.member_configs = [dict(m.config) for m in members]
        # the learning rate each member actually trains at (differs from config lr with lr_units: ntk)
        self.lrs = np.array([float(m.config["lr"]) for m in members]) if lrs is None else np.asarray(lrs, float)
        self.context = dict(context or {})
        self.probe_state: dict[str, Any] = {}
        self.P = len(members)
        self.names = list(params)
        self.shapes = [tuple(params[n].shape[1:]) for n in self.names]
        self.snapshot_dtype = torch.float64 if cfg["weights"].get("dtype") == "float64" else torch.float32
        self.want_weights = "weights" in cfg["record"]
        self.probes = [p for p in cfg["record"] if p != "weights" and p not in TRACKERS]
        self._metric_chunks: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []
        steps, every, ev = int(cfg["steps"]), int(cfg["record_every"]), int(cfg.get("eval_every") or cfg["record_every"])
        # records per member: every record step; a member that diverges adds one at its divergence step but
        # records nothing after it, so never more than this (exact, so the final rows are a contiguous view)
        planned = sum(1 for t in range(steps + 1) if t % every == 0 or t % ev == 0 or t == steps)
        self._weight_chunks = _Rows(self.P, planned)
        self._buffer_chunks = _Rows(self.P, planned)
        # floating buffers (batch norm running statistics) are snapshotted with the weights, so that a
        # stored model evaluates as it did in training (Store.model)
        bufs = self.context.get("buffers") or {}
        self.buffer_names = [n for n, b in bufs.items() if b.is_floating_point()]
        self.layout = self._layout(cfg["weights"])
        if self.buffer_names:
            self.layout = dataclasses.replace(self.layout, buffer_names=list(self.buffer_names),
                                              buffer_shapes=[list(bufs[n].shape[1:]) for n in self.buffer_names])
        self.trackers = {t: TRACKERS[t](self) for t in cfg["record"] if t in TRACKERS}
        self._per_step = [t for t in self.trackers.values() if getattr(t, "per_step", False)]
        self._scratch: torch.Tensor | None = None  # see _in_double

    # ---------------------------------------------------------------- weights layout
    def _layout(self, wcfg: dict[str, Any]) -> WeightsLayout:
        layout, sketch = weights_layout(self.names, self.shapes, wcfg)
        if sketch is not None:
            self._bucket, self._sign = sketch
        return layout

    def flat_weights(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """(P, D) vector of the stored parameters (after any subset/sketch), in the snapshot dtype, on the
        parameters' device."""
        dtype = self.snapshot_dtype
        flat = torch.cat([params[n].detach().reshape(self.P, -1) for n in self.layout.names], dim=1).to(dtype)
        if self.layout.is_sketch:
            if self._bucket.device != flat.device:
                self._bucket, self._sign = self._bucket.to(flat.device), self._sign.to(flat.device)
            out = torch.zeros(self.P, self.layout.dim, dtype=dtype, device=flat.device)
            out.index_add_(1, self._bucket, flat * self._sign.to(dtype))
            return out
        return flat

    # ---------------------------------------------------------------- recording
    @torch.no_grad()
    def record(self, step: int, mask: torch.Tensor, params, grads, opt, train, test, **extra: Any) -> None:
        """One record of the members in ``mask`` (P,) bool. Everything is computed on the parameters'
        device and copied to the host in one transfer (:func:`to_host`).

        ``extra``: ``batch_loss`` (P,), optionally ``lr`` (P,) (each member's learning rate at this step;
        default the constant rate) and ``buffers`` (name -> (P, ...), snapshotted with the weights);
        anything else is passed to the probes.
        """
        first = next(iter(params.values()))
        gn = torch.zeros(self.P, dtype=torch.float64, device=first.device)
        for g in grads.values():
            gn += self._in_double(g, lambda x: x.pow(2).sum(1), lambda x: x.mul_(x).sum(1))
        lr = extra.pop("lr", None)
        buffers = extra.pop("buffers", None)
        cols: dict[str, torch.Tensor] = {
            "batch_loss": extra.pop("batch_loss"),
            "train_loss": train[0],
            "train_acc": train[1],
            "test_loss": test[0],
            "test_acc": test[1],
            "grad_norm": gn.sqrt(),
        }
        ctx = {"cfg": self.cfg, "params": params, "grads": grads, "opt": opt, "step": step, "mask": mask,
               "state": self.probe_state, **self.context, **({"buffers": buffers} if buffers is not None else {}),
               **extra}
        for probe in self.probes:
            cols.update(PROBES[probe](ctx))
        pack = {k: v.detach().double() for k, v in cols.items()}
        norm = lambda x: x.norm(dim=1)  # noqa: E731
        pack["weight_norms"] = torch.stack([self._in_double(params[n], norm, norm) for n in self.names], dim=1)
        if lr is not None:
            pack["lr"] = lr.detach().double()
        pack["mask"] = mask
        direct = self._direct_slot(mask, params) if self.want_weights else None
        if self.want_weights:
            if direct is None:
                pack["weights"] = self.flat_weights(params)
            if self.buffer_names and buffers is not None:
                pack["buffers"] = torch.cat([buffers[n].detach().reshape(self.P, -1) for n in self.buffer_names],
                                            dim=1).to(self.snapshot_dtype)
        host = to_host(pack)
        idx = np.flatnonzero(host.pop("mask"))
        every = len(idx) == self.P  # every member recorded: take the rows as they are (fresh tensors, no copy)
        pick = (lambda a: a) if every else (lambda a: a[idx])  # noqa: E731
        arrays = {k: pick(host[k]) for k in cols}
        arrays["weight_norms"] = pick(host["weight_norms"])  # (len(idx), n_params)
        arrays["lr"] = pick(host["lr"]) if "lr" in host else self.lrs[idx]
        self._metric_chunks.append((step, idx, arrays))
        if direct is not None:  # the snapshot was written straight into its rows
            self._weight_chunks.commit_slot(step)
        elif self.want_weights:
            self._weight_chunks.append((step, idx, pick(host["weights"])))
        if "buffers" in host:
            self._buffer_chunks.append((step, idx, pick(host["buffers"])))
        for tracker in self.trackers.values():
            tracker.update(step, idx, params)

    def _direct_slot(self, mask: torch.Tensor, params: dict[str, torch.Tensor]) -> np.ndarray | None:
        """On the CPU, when every member is recorded and the snapshot is the parameters themselves (no sketch):
        copy each parameter tensor straight into the snapshot rows this record goes to and return them; else
        None (then :meth:`flat_weights` and :func:`to_host`). Saves a (P, D) temporary per record, which for a
        1 MB snapshot was a fresh allocation and ~280 page faults each time, and a copy."""
        first = next(iter(params.values()))
        if self.layout.is_sketch or first.device.type != "cpu" or mask.device.type != "cpu" or not bool(mask.all()):
            return None
        dest = self._weight_chunks.next_slot(self.layout.dim, _NP[self.snapshot_dtype])
        if dest is None:
            return None
        out = torch.from_numpy(dest)
        for n, lo, hi in zip(self.layout.names, self.layout.offsets, self.layout.offsets[1:]):
            out[:, lo:hi].copy_(params[n].detach().reshape(self.P, -1))
        return dest

    def _in_double(self, t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor],
                   fn_inplace: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(t.reshape(P, -1).double())``, bit for bit, as ``fn_inplace`` (free to overwrite its argument) of a
        float64 copy in a scratch buffer that every record reuses: no fresh float64 copy (allocated and, on the
        CPU, page-faulted in) per parameter tensor per record. A non-contiguous ``t`` takes the plain path: the
        reductions' rounding follows the memory layout ``.double()`` keeps."""
        src = t.detach().reshape(self.P, -1)
        if not src.is_contiguous():
            return fn(src.double())
        n = src.numel()
        buf = self._scratch
        if buf is None or buf.numel() < n or buf.device != src.device:
            buf = self._scratch = torch.empty(n, dtype=torch.float64, device=src.device)
        return fn_inplace(buf[:n].view(src.shape).copy_(src))

    @property
    def per_step(self) -> bool:
        """Whether a tracker hooks every optimiser step (then :meth:`on_step`/:meth:`after_update` do work)."""
        return bool(self._per_step)

    def on_step(self, step: int, params, grads, active: torch.Tensor) -> None:
        """Every optimiser step, before the update (per-step trackers only)."""
        for t in self._per_step:
            t.on_step(step, params, grads, active)

    def after_update(self, step: int, opt: Any) -> None:
        """Every optimiser step, after the update (per-step trackers only)."""
        for t in self._per_step:
            t.after_update(step, opt)

    # ---------------------------------------------------------------- tables
    def metrics_table(self) -> pa.Table:
        run_ids = np.array(self.run_ids, dtype=object)
        if not self._metric_chunks:
            return pa.table({"run_id": pa.array([], pa.string()), "step": pa.array([], pa.int64())})
        cols: dict[str, list[np.ndarray]] = {"run_id": [], "step": []}
        names = list(self._metric_chunks[0][2])
        for n in names:
            cols[n] = []
        for step, idx, arrays in self._metric_chunks:
            cols["run_id"].append(run_ids[idx])
            cols["step"].append(np.full(len(idx), step, dtype=np.int64))
            for n in names:
                cols[n].append(arrays[n])
        data = {}
        for k, v in cols.items():
            arr = np.concatenate(v)
            if arr.ndim == 2:  # one list per row
                data[k] = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1]).cast(
                    pa.list_(pa.float64()))
            else:
                data[k] = arr
        table = pa.table(data)
        return table.sort_by([("run_id", "ascending"), ("step", "ascending")])

    def weights_table(self) -> pa.Table | None:
        if not self.want_weights:
            return None
        # rows grouped by run, in step order: the run-major buffer as it is (no gather; Arrow's sort_by on a
        # table of hundreds of MB of snapshots cost as much as writing it)
        member, steps, mat = self._weight_chunks.run_major()
        rid = np.array(self.run_ids, dtype=object)[member]
        cols = {"run_id": rid, "step": steps, "weights": _list_column(mat)}
        if self._buffer_chunks:  # recorded at the same records as the weights
            cols["buffers"] = _list_column(self._buffer_chunks.run_major()[2])
        return pa.table(cols)

    # ---------------------------------------------------------------- checkpoint state
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The accumulated records as (JSON-able meta, numpy arrays); see :meth:`load_state`.

        Chunks are concatenated per column: ``metric_steps``/``metric_counts`` (one entry per
        record call), ``metric_idx`` (member indices), ``metric:<column>`` (rows of every
        chunk stacked on axis 0, any trailing shape); likewise ``weight_*`` for snapshots.
        """
        names = list(self._metric_chunks[0][2]) if self._metric_chunks else []
        arrays: dict[str, np.ndarray] = {}
        for kind, chunks, cols in (("metric", self._metric_chunks, names), ("weight", self._weight_chunks, None),
                                   ("buffer", self._buffer_chunks, None)):
            chunks = list(chunks)  # (a _Rows yields copies of its rows: take them once)
            arrays[f"{kind}_steps"] = np.array([c[0] for c in chunks], dtype=np.int64)
            arrays[f"{kind}_counts"] = np.array([len(c[1]) for c in chunks], dtype=np.int64)
            arrays[f"{kind}_idx"] = (np.concatenate([c[1] for c in chunks]) if chunks else np.zeros(0, np.int64)).astype(np.int64)
            if cols is not None:
                for n in cols:
                    arrays[f"metric:{n}"] = np.concatenate([c[2][n] for c in chunks])
            elif chunks:
                arrays[f"{kind}_mat"] = np.concatenate([c[2] for c in chunks])
        for tname, tracker in self.trackers.items():
            if hasattr(tracker, "state"):
                arrays.update({f"tracker:{tname}:{k}": v for k, v in tracker.state().items()})
        return {"metric_columns": names}, arrays

    def load_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Replace the accumulated records with those of :meth:`state` (exactly, column order included)."""
        def split(kind: str) -> list[tuple[int, np.ndarray, slice]]:
            steps, counts = arrays[f"{kind}_steps"], arrays[f"{kind}_counts"]
            ends = np.cumsum(counts)
            out = []
            for step, n, end in zip(steps.tolist(), counts.tolist(), ends.tolist()):
                sl = slice(end - n, end)
                out.append((int(step), arrays[f"{kind}_idx"][sl].copy(), sl))
            return out

        names = list(meta["metric_columns"])
        self._metric_chunks = [(step, idx, {n: arrays[f"metric:{n}"][sl].copy() for n in names})
                               for step, idx, sl in split("metric")]
        for kind, rows in (("weight", self._weight_chunks), ("buffer", self._buffer_chunks)):
            rows.__init__(self.P, rows.capacity)
            if f"{kind}_steps" in arrays:
                for step, idx, sl in split(kind):
                    rows.append((step, idx, arrays[f"{kind}_mat"][sl]))
        for tname, tracker in self.trackers.items():
            if hasattr(tracker, "load_state"):
                prefix = f"tracker:{tname}:"
                tracker.load_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})

    def extra_tables(self) -> dict[str, pa.Table]:
        """The trackers' tables (table name -> Arrow table), for ``Store.write_runs(extra=...)``."""
        out: dict[str, pa.Table] = {}
        for tracker in self.trackers.values():
            out.update(tracker.tables())
        return out

    def final_values(self) -> dict[str, dict[str, float]]:
        """Per run: final/initial/max train loss and final test metrics from its last record."""
        out: dict[str, dict[str, float]] = {rid: {} for rid in self.run_ids}
        for step, idx, arrays in self._metric_chunks:
            for j, i in enumerate(idx):
                d = out[self.run_ids[i]]
                tl = float(arrays["train_loss"][j])
                if np.isnan(tl) and np.isfinite(arrays["batch_loss"][j]):
                    continue  # not an evaluation step
                for k in ("train_loss", "train_acc", "test_loss", "test_acc"):
                    d[f"final_{k}"] = float(arrays[k][j])
                d.setdefault("initial_train_loss", tl)
                if np.isfinite(tl):
                    d["max_train_loss"] = max(d.get("max_train_loss", -np.inf), tl)
                else:
                    d["max_train_loss"] = float("inf")
                d["last_record_step"] = step
        return out


def _list_column(mat: np.ndarray) -> pa.Array:
    """(rows, D) float matrix -> a list<float32|float64> column, one list per row, without copying the values."""
    mat = np.ascontiguousarray(mat)
    typ = pa.float64() if mat.dtype == np.float64 else pa.float32()
    values = pa.Array.from_buffers(typ, mat.size, [None, pa.py_buffer(mat)])
    offsets = pa.array(np.arange(0, mat.size + 1, mat.shape[1], dtype=np.int32))
    if mat.size >= 2**31:  # beyond int32 offsets
        return pa.LargeListArray.from_arrays(offsets.cast(pa.int64()), values)
    return pa.ListArray.from_arrays(offsets, values)


@functools.cache
def float_settings() -> frozenset[str]:
    """The run settings typed ``float`` (or ``float | None``) in the sweep schema (:class:`raydyn.spec.TaskSpec`,
    :class:`raydyn.spec.TrainSpec`): their runs-table columns are float64 even when every value of a
    population is a whole number (a swept ``lr: [1, 2]`` reaches the config as ints). The members' extra
    columns (``lambda0``, ``lr_actual``) are Python floats already."""
    import types
    import typing

    from raydyn.spec import TaskSpec, TrainSpec

    out = set()
    for model in (TaskSpec, TrainSpec):
        for name, f in model.model_fields.items():
            a = f.annotation
            args = typing.get_args(a) if typing.get_origin(a) in (typing.Union, types.UnionType) else (a,)
            if [t for t in args if t is not type(None)] == [float]:
                out.add(name)
    return frozenset(out)


def runs_table(result: Any, pop_id: str, node: str | None = None) -> pa.Table:
    """One row per member: identity, status, every config value typed, final metrics, metadata.

    ``node``, when given (the Ray node id that trained the population), becomes a ``node`` column.
    """
    from raydyn.spec import RunConfig

    rec: Recorder = result.recorder
    finals = rec.final_values()
    rows = []
    ver = json.dumps(library_versions(), sort_keys=True)
    layout = rec.layout.to_json()
    for m in result.members:
        flat = RunConfig(m.config, m.run_id).flat()
        f = finals[m.run_id]
        rows.append({
            "run_id": m.run_id,
            "population": pop_id,
            "status": m.status,
            **flat,
            "final_train_loss": f.get("final_train_loss", float("nan")),
            "final_train_acc": f.get("final_train_acc", float("nan")),
            "final_test_loss": f.get("final_test_loss", float("nan")),
            "final_test_acc": f.get("final_test_acc", float("nan")),
            "initial_train_loss": f.get("initial_train_loss", float("nan")),
            "max_train_loss": f.get("max_train_loss", float("nan")),
            "diverged_step": m.diverged_step if m.diverged_step is not None else -1,
            "steps_done": m.steps_done,
            "population_size": len(result.members),
            **m.extra,
            "wall_time_s": result.wall_time_s,
            "config_json": json.dumps(m.config, sort_keys=True),
            "weights_layout": layout,
            "versions": ver,
            **({"node": node} if node is not None else {}),
        })
    table = pa.Table.from_pylist(rows)
    # ints that are config values stay int64, floats float64 (pylist inference does this);
    # make sure float-typed config values that happen to be whole numbers stay float64.
    fields = []
    floats = float_settings()
    for f in table.schema:
        if pa.types.is_integer(f.type) and f.name in floats:
            f = f.with_type(pa.float64())
        elif pa.types.is_null(f.type):  # an unset option (e.g. loss: default) stays a typed, nullable column
            f = f.with_type(pa.string())
        fields.append(f)
    return table.cast(pa.schema(fields))
