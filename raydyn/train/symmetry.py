"""Symmetry quantities in the recorder (``train.record: [symmetry]``).

For every symmetry group of the model (:func:`raydyn.analysis.symmetry.find_groups`:
translation before softmax cross-entropy, scale before batch norm, rescale across a
positively homogeneous activation) the tracker records, at **every optimiser step**
(not only every ``record_every``, because the exact laws need each step's drive):

* ``q``: the group's quantity on the parameters at that step (M, N or D);
* ``drive``: what drives the quantity from that step to the next, in the ``sq_norms``
  convention of :func:`raydyn.analysis.symmetry.predict`: the group's squared norm of the
  minibatch loss gradient (members with momentum 0) or of the SGD momentum buffer after
  the step (members with momentum > 0); for rescale, outgoing minus incoming.
  NaN on a run's last recorded step (no update follows).

Tables written with the population's part:

* ``symmetry_steps``: one row per (run, step, kind, layer): ``q`` and ``drive`` as lists
  over the layer's groups (``units`` order of ``symmetry_groups``). A diverged run stops
  at its divergence step.
* ``symmetry_groups``: one row per (run, kind, layer): ``units`` (unit index of every
  list position; -1 is a translation layer's bias group) and the hyperparameters the
  laws need (``lr`` as trained, ``weight_decay``, ``momentum``, ``dampening``,
  ``nesterov``, ``optimizer``, ``dtype``); ``module`` is the layer's module class (``Linear``, ...).

Size: 16 bytes per group per step per run (e.g. a 64-wide two-hidden-layer MLP on digits
has 271 groups: 4.3 kB per step, 4.3 MB per 1,000-step run).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raydyn.analysis.symmetry import KINDS, find_groups

_LOSS = {"cross_entropy": "cross_entropy", "mse": "mse"}


def _columns(groups) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(kind, layer, column indices into the kind block, units) per (kind, layer)."""
    out = []
    for kind in KINDS:
        kg = [g for g in groups if g.kind == kind]
        for layer in dict.fromkeys(g.layer for g in kg):
            cols = np.array([i for i, g in enumerate(kg) if g.layer == layer], dtype=np.int64)
            out.append((kind, layer, cols, np.array([kg[i].unit for i in cols], dtype=np.int64)))
    return out


class GroupSums:
    """Per-step evaluation of every group's sum (or sum of squares) in torch, for a (P, ...) population.

    Same numbers as :func:`raydyn.analysis.symmetry.quantities` / ``group_sq_norms`` (tested
    against them), columns concatenated in ``KINDS`` order, but the index plan is compiled once
    into one dense (units, G) sign matrix per (parameter, axis), so a step costs a few
    reductions and matmuls instead of numpy index arithmetic.
    """

    def __init__(self, groups):
        self.groups = list(groups)
        order = [g for k in KINDS for g in self.groups if g.kind == k]
        self.G = len(order)
        self.linear = torch.tensor([g.kind == "translation" for g in order])
        plan: dict[tuple[str, int], list[tuple[int, int, int, int]]] = {}
        self.units: dict[tuple[str, int], int] = {}
        for gi, g in enumerate(order):
            for m in g.members:
                plan.setdefault((m.param, m.axis), []).append((gi, m.start, m.stop, m.sign))
                self.units[(m.param, m.axis)] = m.shape[m.axis]
        self.mats = {}
        for key, entries in plan.items():
            S = torch.zeros(self.units[key], self.G, dtype=torch.float64)
            for gi, start, stop, sign in entries:
                S[start:stop, gi] += sign
            self.mats[key] = S

    def __call__(self, tensors: dict[str, torch.Tensor], square: bool | None = None) -> np.ndarray:
        """(P, G) float64. ``square=None``: translation groups summed, the others squared (quantities);
        ``True``: every group squared (gradient / buffer norms)."""
        out = None
        for (name, axis), S in self.mats.items():
            t = tensors[name].detach().to(torch.float64)
            if S.device != t.device:  # the population trains on a GPU: keep the plan there
                S = self.mats[(name, axis)] = S.to(t.device)
                self.linear = self.linear.to(t.device)
            P = t.shape[0]
            moved = t.movedim(axis + 1, 1).reshape(P, t.shape[axis + 1], -1)
            sq = (moved * moved).sum(-1) @ S
            if square:
                val = sq
            else:
                val = torch.where(self.linear, moved.sum(-1) @ S, sq)
            out = val if out is None else out + val
        return out.cpu().numpy() if out is not None else np.zeros((0, 0))


class SymmetryTracker:
    """Per-step symmetry quantities of every member; a recorder tracker (see ``recorder.TRACKERS``)."""

    per_step = True  # the recorder calls on_step/after_update at every optimiser step

    def __init__(self, rec: Any):
        self.cfg = rec.cfg
        self.run_ids = list(rec.run_ids)
        self.P = len(self.run_ids)
        model = rec.context.get("model")
        loss = rec.context.get("loss") or "cross_entropy"
        self.groups = find_groups(model, _LOSS.get(loss, "other")) if model is not None else []
        self.cols = _columns(self.groups)
        self.sums = GroupSums(self.groups) if self.groups else None
        mods = dict(model.named_modules()) if model is not None else {}
        self.module_type = {layer: type(mods[layer]).__name__ if layer in mods else "" for _, layer, _, _ in self.cols}
        self.lrs = np.asarray(rec.lrs, dtype=np.float64)
        configs = rec.member_configs
        self.momentum = np.array([float(c.get("momentum", 0.0)) for c in configs])
        self.hparams = [{"weight_decay": float(c.get("weight_decay", 0.0)), "momentum": float(c.get("momentum", 0.0)),
                         "dampening": float(c.get("dampening", 0.0))} for c in configs]
        self.steps: list[int] = []
        self.active: list[np.ndarray] = []  # (P,) bool per step
        self.q: list[np.ndarray] = []  # (P, G) per step, kinds concatenated in KINDS order
        self.drive: list[np.ndarray] = []  # (P, G) per step
        self._grad_sq: np.ndarray | None = None

    @torch.no_grad()
    def on_step(self, step: int, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor],
                active: torch.Tensor) -> None:
        """Before the update of ``step``: the quantities on the current parameters and the gradient norms."""
        if not self.groups:
            return
        self.steps.append(int(step))
        self.active.append(active.cpu().numpy().copy())
        self.q.append(self.sums(params))
        self._grad_sq = self.sums(grads, square=True)
        self.drive.append(np.full_like(self.q[-1], np.nan))  # filled by after_update when an update follows

    def update(self, step: int, idx: np.ndarray, params: dict[str, torch.Tensor]) -> None:
        """Record-step hook of trackers: nothing to do, everything is recorded per step."""

    @torch.no_grad()
    def after_update(self, step: int, opt: Any) -> None:
        """After the update of ``step``: the drive (gradient, or momentum buffer after the step)."""
        if not self.groups or not self.steps or self.steps[-1] != step:
            return
        drive = self._grad_sq
        if (self.momentum > 0).any() and getattr(opt, "kind", "sgd") == "sgd":
            bufs = {name: st["buf"] for name, st in opt.state.items() if "buf" in st}
            if bufs:
                buf_sq = self.sums(bufs, square=True)
                drive = np.where((self.momentum > 0)[:, None], buf_sq, drive)
        self.drive[-1] = drive

    # ------------------------------------------------------------------ tables
    def tables(self) -> dict[str, pa.Table]:
        if not self.groups or not self.steps:
            return {}
        steps = np.array(self.steps, dtype=np.int64)
        act = np.stack(self.active)  # (T, P)
        q = np.stack(self.q)  # (T, P, G)
        drive = np.stack(self.drive)
        offsets = {}
        o = 0
        for kind in KINDS:
            offsets[kind] = o
            o += sum(1 for g in self.groups if g.kind == kind)
        rows: dict[str, list] = {k: [] for k in ("run_id", "step", "kind", "layer", "q", "drive")}
        for i, rid in enumerate(self.run_ids):
            live = np.flatnonzero(act[:, i])
            for kind, layer, cols, _units in self.cols:
                sel = offsets[kind] + cols
                n = len(live)
                rows["run_id"] += [rid] * n
                rows["step"].append(steps[live])
                rows["kind"] += [kind] * n
                rows["layer"] += [layer] * n
                rows["q"].append(q[live][:, i][:, sel])
                d = drive[live][:, i][:, sel].copy()
                if n:
                    d[-1] = np.nan  # no update follows a run's last recorded step
                rows["drive"].append(d)
        G = [len(c[2]) for c in self.cols]

        def lists(blocks: list[np.ndarray]) -> pa.Array:
            flat = np.concatenate([b.reshape(-1) for b in blocks]) if blocks else np.zeros(0)
            lens = np.concatenate([np.full(b.shape[0], b.shape[1], dtype=np.int32) for b in blocks])
            offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            return pa.ListArray.from_arrays(pa.array(offs), pa.array(flat, pa.float64()))

        steps_table = pa.table({
            "run_id": pa.array(rows["run_id"], pa.string()),
            "step": pa.array(np.concatenate(rows["step"]) if rows["step"] else np.zeros(0, np.int64)),
            "kind": pa.array(rows["kind"], pa.string()),
            "layer": pa.array(rows["layer"], pa.string()),
            "q": lists(rows["q"]),
            "drive": lists(rows["drive"]),
        })
        grows: dict[str, list] = {k: [] for k in ("run_id", "kind", "layer", "module", "units", "lr", "weight_decay",
                                                  "momentum", "dampening")}
        for i, rid in enumerate(self.run_ids):
            for (kind, layer, _cols, units), _g in zip(self.cols, G):
                grows["run_id"].append(rid)
                grows["kind"].append(kind)
                grows["layer"].append(layer)
                grows["module"].append(self.module_type.get(layer, ""))
                grows["units"].append(units.tolist())
                grows["lr"].append(float(self.lrs[i]))
                for k in ("weight_decay", "momentum", "dampening"):
                    grows[k].append(self.hparams[i][k])
        n = len(grows["run_id"])
        groups_table = pa.table({
            **{k: pa.array(grows[k], pa.string()) for k in ("run_id", "kind", "layer", "module")},
            "units": pa.array(grows["units"], pa.list_(pa.int64())),
            **{k: pa.array(grows[k], pa.float64()) for k in ("lr", "weight_decay", "momentum", "dampening")},
            "nesterov": pa.array([bool(self.cfg.get("nesterov", False))] * n, pa.bool_()),
            "optimizer": pa.array([str(self.cfg.get("optimizer", "sgd"))] * n, pa.string()),
            "dtype": pa.array([str(self.cfg.get("dtype", "float32"))] * n, pa.string()),
        })
        return {"symmetry_steps": steps_table, "symmetry_groups": groups_table}

    # ------------------------------------------------------------------ checkpoint state
    def state(self) -> dict[str, np.ndarray]:
        if not self.steps:
            return {}
        return {"steps": np.array(self.steps, dtype=np.int64), "active": np.stack(self.active),
                "q": np.stack(self.q), "drive": np.stack(self.drive)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if not arrays:
            self.steps, self.active, self.q, self.drive = [], [], [], []
            return
        self.steps = arrays["steps"].tolist()
        self.active = list(arrays["active"])
        self.q = list(arrays["q"])
        self.drive = list(arrays["drive"])
