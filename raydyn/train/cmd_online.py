"""Online CMD in the recorder (``train.record: [cmd_online]``), and the CMD tables shared with the job.

One :class:`raydyn.analysis.cmd.OnlineCMD` per population member is fed that member's
flat weight vector (every parameter, ``model.named_parameters()`` order, float64) at
every record. After ``train.cmd.warmup`` records the modes are fixed and the state is
O(N) per member (plus the M reference trajectories), so ``record: [cmd_online]``
without ``weights`` keeps a long run of a large model cheap. At the end of the trial
the tracker evaluates the reconstructed final weights on the test set next to the
real ones and returns three tables, written with the population's part:

* ``cmd_online_summary`` -- one row per run: the phase-map metrics
  ``cmd_online_modes_needed``, ``cmd_online_recon_error`` (relative Frobenius error over
  all records), ``cmd_online_warmup_error``, ``cmd_online_test_{acc,loss}_{real,recon}``
  (final step);
* ``cmd_online_modes`` -- one row per (run, mode), as ``cmd_modes`` (see :func:`modes_table`);
* ``cmd_online_coefficients`` -- one row per run: ``reference_index``, ``assignment``,
  ``a``, ``b`` (lists of length M, N, N, N): with ``cmd_online_modes.reference`` they
  reconstruct every recorded step, ``w_i(t) = a_i * r_{assignment_i}(t) + b_i``.

A member whose weights become NaN/inf (divergence) or that has fewer records than the
warm-up gets no rows.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raydyn.analysis.cmd import CMDResult, OnlineCMD


def layer_slices(names: list[str], sizes: list[int]) -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` of every parameter tensor in a flat vector (CMD's ``layers``)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return [(n, offsets[i], offsets[i + 1]) for i, n in enumerate(names)]


def modes_table(run_id: str, result: CMDResult, steps: np.ndarray) -> pa.Table:
    """One row per mode: ``run_id, mode, reference_index, reference_param, members, layer_names,
    layer_members, steps, reference`` (``reference_param``: tensor name and flat index inside it;
    ``layer_members``: parameters of each layer of ``layer_names`` in this mode)."""
    m, names = result.n_modes, list(result.layer_names)
    counts = np.zeros((len(names), m), dtype=np.int64)
    np.add.at(counts, (result.layer_index, result.assignment), 1)
    starts = {}
    for k in range(len(names)):
        where = np.flatnonzero(result.layer_index == k)
        starts[k] = int(where[0]) if where.size else 0
    ref_param = []
    for r in result.reference_index.tolist():
        k = int(result.layer_index[r])
        ref_param.append(f"{names[k]}[{r - starts[k]}]")
    steps = np.asarray(steps, dtype=np.int64)
    return pa.table({
        "run_id": pa.array([run_id] * m, pa.string()),
        "mode": pa.array(np.arange(m, dtype=np.int64)),
        "reference_index": pa.array(result.reference_index.astype(np.int64)),
        "reference_param": pa.array(ref_param, pa.string()),
        "members": pa.array(counts.sum(axis=0).astype(np.int64)),
        "layer_names": pa.array([names] * m, pa.list_(pa.string())),
        "layer_members": pa.array([counts[:, j].tolist() for j in range(m)], pa.list_(pa.int64())),
        "steps": pa.array([steps.tolist()] * m, pa.list_(pa.int64())),
        "reference": pa.array([result.references[j].tolist() for j in range(m)], pa.list_(pa.float64())),
    })


def layers_table(run_id: str, result: CMDResult) -> pa.Table:
    """One row per layer: ``run_id, layer, n_params, recon_error, modes_used``."""
    names = list(result.layer_names)
    n = np.bincount(result.layer_index, minlength=len(names))
    used = [int(np.unique(result.assignment[result.layer_index == k]).size) for k in range(len(names))]
    return pa.table({
        "run_id": pa.array([run_id] * len(names), pa.string()),
        "layer": pa.array(names, pa.string()),
        "n_params": pa.array(n.astype(np.int64)),
        "recon_error": pa.array([float(result.layer_errors[k]) for k in names], pa.float64()),
        "modes_used": pa.array(used, pa.int64()),
    })


class OnlineCMDTracker:
    """Online CMD of every member of a population; a recorder tracker (see ``recorder.TRACKERS``)."""

    def __init__(self, cfg: dict[str, Any], run_ids: list[str], names: list[str], shapes: list[tuple[int, ...]],
                 data: Any = None):
        c = cfg["cmd"]
        self.data = data  # the trial's data set (else rebuilt from the config at the end)
        self.cfg, self.run_ids, self.names, self.shapes = cfg, list(run_ids), list(names), list(shapes)
        sizes = [int(np.prod(s)) for s in shapes]
        self.layers = layer_slices(self.names, sizes)
        self.online = [OnlineCMD(c["modes"], c["tolerance"], c["warmup"], c["samples"], random_state=0,
                                 layers=self.layers) for _ in run_ids]
        self.steps: list[list[int]] = [[] for _ in run_ids]
        self.last: list[np.ndarray | None] = [None] * len(run_ids)  # O(N): the final real weights
        self.dropped: dict[int, str] = {}

    def update(self, step: int, idx: np.ndarray, params: dict[str, torch.Tensor]) -> None:
        """Feed the recorded members ``idx`` their flat weights at ``step``."""
        P = len(self.run_ids)
        flat = torch.cat([params[n].detach().reshape(P, -1) for n in self.names], dim=1)
        for i in np.asarray(idx).tolist():
            if i in self.dropped:
                continue
            v = flat[i].double().cpu().numpy()
            if not np.isfinite(v).all():
                self.dropped[i] = f"non-finite weights at step {step}"
                continue
            self.online[i].update(v)
            self.steps[i].append(int(step))
            self.last[i] = v.copy()

    def tables(self) -> dict[str, pa.Table]:
        from raydyn.tasks.build import check_param_order
        from raydyn.train.replay import evaluate_vectors, run_model

        done = [i for i in range(len(self.run_ids)) if i not in self.dropped and self.online[i].is_warm]
        if not done:
            return {}
        model = data = None
        from raydyn.tasks import registry

        if registry.model(self.cfg["model"]).trainer == "population":
            model, data = run_model(self.cfg, None if self.data is None else self.data.to(self.data.dtype or
                                                                                          torch.float32, "cpu"))
            check_param_order(model, {"kind": "full", "names": self.names, "shapes": self.shapes},
                              "cmd_online")
        summary: dict[str, list] = {k: [] for k in (
            "run_id", "cmd_online_modes_needed", "cmd_online_recon_error", "cmd_online_warmup_error",
            "cmd_online_test_acc_real", "cmd_online_test_acc_recon", "cmd_online_test_loss_real",
            "cmd_online_test_loss_recon")}
        modes, coefs = [], {"run_id": [], "reference_index": [], "assignment": [], "a": [], "b": []}
        for i in done:
            rid, res = self.run_ids[i], self.online[i].result()
            if model is not None:
                loss, acc = evaluate_vectors(model, data, self.cfg.get("loss"), [self.last[i], res.reconstruct_at(-1)])
            else:
                loss = acc = np.full(2, np.nan)
            for k, v in (("run_id", rid), ("cmd_online_modes_needed", res.n_modes),
                         ("cmd_online_recon_error", res.error),
                         ("cmd_online_warmup_error", self.online[i].warmup_result_.error),
                         ("cmd_online_test_acc_real", acc[0]), ("cmd_online_test_acc_recon", acc[1]),
                         ("cmd_online_test_loss_real", loss[0]), ("cmd_online_test_loss_recon", loss[1])):
                summary[k].append(v)
            modes.append(modes_table(rid, res, np.array(self.steps[i])))
            coefs["run_id"].append(rid)
            coefs["reference_index"].append(res.reference_index.tolist())
            coefs["assignment"].append(res.assignment.astype(np.int32))
            coefs["a"].append(res.a)
            coefs["b"].append(res.b)
        schema = pa.schema([("run_id", pa.string()), ("cmd_online_modes_needed", pa.int64())]
                           + [(k, pa.float64()) for k in list(summary)[2:]])
        coef_table = pa.table({
            "run_id": pa.array(coefs["run_id"], pa.string()),
            "reference_index": pa.array(coefs["reference_index"], pa.list_(pa.int64())),
            "assignment": _list_array(coefs["assignment"], pa.int32()),
            "a": _list_array(coefs["a"], pa.float64()),
            "b": _list_array(coefs["b"], pa.float64()),
        })
        return {"cmd_online_summary": pa.Table.from_pydict(summary, schema=schema),
                "cmd_online_modes": pa.concat_tables(modes),
                "cmd_online_coefficients": coef_table}


def _list_array(rows: list[np.ndarray], typ: pa.DataType) -> pa.Array:
    """A list<typ> column from equal or unequal length numpy rows without Python lists."""
    values = pa.array(np.concatenate(rows), typ)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    if offsets[-1] >= 2**31:
        return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), values)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)
