"""Population training: many runs of one architecture trained together with torch.func.

A *population* is a set of runs that share data set, architecture, batch size and
optimiser kind (see :func:`raydyn.spec.populations`). Their parameters are
stacked along a leading axis P and one training step of all of them is one
``vmap``-ed call, so a Ray Tune trial trains P runs for roughly the price of a
few. Per-member values (seed, lr, momentum, weight decay, Adam betas/eps) are
(P,) tensors broadcast in the optimiser, which is written out here to be
exactly PyTorch's update (``torch.optim.SGD``/``Adam``/``AdamW``), so that a
member's trajectory equals the same run trained alone (tested).

Everything that changes during training is one :class:`TrainState`; its
:meth:`TrainState.checkpoint` is a :class:`PopulationCheckpoint` (numpy arrays +
JSON, no pickle) from which ``train_population(..., resume=...)`` continues
bit-for-bit as if never interrupted (tested).

Shapes: P members, B batch size, D flattened parameters.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from raydyn.spec import PopulationSpec
from raydyn.tasks.data import Dataset, make_dataset
from raydyn.tasks.models import build_model
from raydyn.train.objectives import accuracy, loss_fn
from raydyn.train.curvature import curvature_batch, member_ntk
from raydyn.train.recorder import Recorder

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def init_model(cfg: dict[str, Any], data: Dataset) -> torch.nn.Module:
    """The run's initial model: PyTorch default init under ``torch.manual_seed(seed)``."""
    dtype = DTYPES[cfg["dtype"]]
    with default_dtype(dtype):
        torch.manual_seed(cfg["seed"])
        return build_model(cfg, data.input_shape, data.out_dim, data.vocab)


@torch.no_grad()
def total_norms(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """(P,) L2 norm of each member's parameters, all tensors together (stacked (P, ...) tensors)."""
    return torch.sqrt(sum(p.reshape(p.shape[0], -1).pow(2).sum(1) for p in params.values()))


@torch.no_grad()
def renormalise(params: dict[str, torch.Tensor], target: torch.Tensor, mask: torch.Tensor) -> None:
    """Rescale the members in ``mask`` (P,) so their total parameter norm is ``target`` (P,); in place."""
    scale = torch.where(mask, target / total_norms(params), torch.ones_like(target))
    for p in params.values():
        p.mul_(scale.reshape((-1,) + (1,) * (p.dim() - 1)).to(p.dtype))


def member_embed_lr(cfg: dict[str, Any]) -> float:
    """Learning rate of embedding parameters (``embed*``): ``embed_lr`` (absolute units, also with
    ``lr_units: ntk``), or the run's actual ``lr`` when unset."""
    return cfg["embed_lr"] if cfg.get("embed_lr") is not None else cfg["lr"]


def member_embed_wd(cfg: dict[str, Any]) -> float:
    """Weight decay of embedding parameters: ``embed_weight_decay``, or ``weight_decay`` when unset."""
    return cfg["embed_weight_decay"] if cfg.get("embed_weight_decay") is not None else cfg["weight_decay"]


def load_data(cfg: dict[str, Any]) -> Dataset:
    return make_dataset(cfg["dataset"], cfg["data"]).to(DTYPES[cfg["dtype"]])


class BatchStream:
    """A run's own data order: successive batches of seeded per-epoch permutations.

    Full batch (batch_size >= n) always yields all indices in order. Otherwise an
    epoch is a random permutation cut into floor(n / B) batches (the remainder is
    dropped), and the next epoch draws a new permutation.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.b = n, min(batch_size, n)
        self.full = batch_size >= n
        self.gen = torch.Generator().manual_seed(seed * 7919 + 104729)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.full:
            return torch.arange(self.n)
        if self.pos + self.b > len(self.perm):
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.b]
        self.pos += self.b
        return idx

    def state(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(position, generator state as uint8, current permutation as int64)."""
        return self.pos, self.gen.get_state().numpy().copy(), self.perm.numpy().copy()

    def load_state(self, pos: int, gen_state: np.ndarray, perm: np.ndarray) -> None:
        self.pos = int(pos)
        self.gen.set_state(torch.from_numpy(np.ascontiguousarray(gen_state, dtype=np.uint8)))
        self.perm = torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64))


# ---------------------------------------------------------------------------- optimisers
class PopulationOptimizer:
    """PyTorch's SGD / Adam / AdamW update on stacked (P, ...) parameters, per-member hyperparameters.

    SGD (torch.optim.SGD semantics): d = g + wd*p; with momentum, buf = d on the
    first step, else buf = m*buf + (1-dampening)*d; d = d + m*buf (nesterov) or buf;
    p -= lr*d. Members with momentum 0 use d directly, as PyTorch does.
    Adam: g += wd*p (L2); AdamW: p *= 1 - lr*wd (decoupled). Then the bias-
    corrected moment update of torch.optim.Adam with eps added to sqrt(v_hat).
    """

    def __init__(self, kind: str, hp: dict[str, torch.Tensor], nesterov: bool = False,
                 param_hp: dict[str, dict[str, torch.Tensor]] | None = None):
        # param_hp: parameter name -> its own hyperparameters (a param group), else hp
        self.kind, self.hp, self.nesterov = kind, hp, nesterov
        self.param_hp = param_hp or {}
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.t = 0

    @staticmethod
    def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape((-1,) + (1,) * (like.dim() - 1))

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        self.t += 1
        for name, p in params.items():
            hp = self.param_hp.get(name, self.hp)
            g = grads[name]
            b = lambda v: self._b(v, p)  # noqa: E731
            st = self.state.setdefault(name, {})
            if self.kind == "sgd":
                d = g + b(hp["weight_decay"]) * p
                if "buf" not in st:
                    st["buf"] = d.clone()
                else:
                    st["buf"] = b(hp["momentum"]) * st["buf"] + (1 - b(hp["dampening"])) * d
                buf = st["buf"]
                upd = d + b(hp["momentum"]) * buf if self.nesterov else buf
                upd = torch.where(b(hp["momentum"]) > 0, upd, d)
                new = p - b(hp["lr"]) * upd
            else:
                if self.kind == "adam":
                    g = g + b(hp["weight_decay"]) * p
                    base = p
                else:  # adamw
                    base = p * (1 - b(hp["lr"]) * b(hp["weight_decay"]))
                if "m" not in st:
                    st["m"], st["v"] = torch.zeros_like(p), torch.zeros_like(p)
                b1, b2 = b(hp["beta1"]), b(hp["beta2"])
                st["m"] = st["m"] * b1 + (1 - b1) * g
                st["v"] = st["v"] * b2 + (1 - b2) * g * g
                bc1, bc2 = 1 - b1**self.t, 1 - b2**self.t
                denom = (st["v"].sqrt() / bc2.sqrt()) + b(hp["eps"])
                new = base - (b(hp["lr"]) / bc1) * st["m"] / denom
            # diverged members are frozen: their parameters no longer change
            p.copy_(torch.where(b(active), new, p))

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "state": self.state}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t, self.state = sd["t"], sd["state"]


# ---------------------------------------------------------------------------- training
@dataclass
class MemberResult:
    run_id: str
    config: dict[str, Any]
    status: str = "completed"
    diverged_step: int | None = None
    steps_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more runs-table columns (lambda0, lr_actual)


@dataclass
class PopulationResult:
    members: list[MemberResult]
    recorder: Recorder
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- checkpoints
CHECKPOINT_FORMAT = 1
_META, _ARRAYS = "meta.json", "state.npz"


@dataclass
class PopulationCheckpoint:
    """A population's training state at a step boundary, as JSON metadata plus numpy arrays.

    On disk a checkpoint is a directory with ``state.npz`` (arrays, read back with
    ``allow_pickle=False``) and ``meta.json`` (written last: a directory with a
    ``meta.json`` holds a whole checkpoint). Nothing is pickled, so loading a
    checkpoint cannot run code.
    """

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def step(self) -> int:
        """The step that training resumes at."""
        return int(self.meta["step"])

    def save(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / _ARRAYS, **self.arrays)
        tmp = d / f".{_META}.tmp"
        tmp.write_text(json.dumps(self.meta, sort_keys=True))
        os.replace(tmp, d / _META)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> "PopulationCheckpoint":
        d = Path(directory)
        if not (d / _META).is_file():
            raise ValueError(f"{d}: not a population checkpoint (no {_META})")
        meta = json.loads((d / _META).read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{d}: checkpoint format {meta.get('format')!r}, this raydyn reads {CHECKPOINT_FORMAT}")
        with np.load(d / _ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls(meta, arrays)


@dataclass
class TrainState:
    """Everything that changes while a population trains, as of the start of step ``step``.

    Shapes: ``params`` name -> (P, ...); ``active`` (P,) bool; ``init_loss`` (P,) (set at step 0).
    Everything else (data, model, hyperparameters, buffers) is a pure function of the
    population's configs and is rebuilt, not stored.
    """

    step: int
    params: dict[str, torch.Tensor]
    opt: PopulationOptimizer
    streams: list[BatchStream]
    active: torch.Tensor
    init_loss: torch.Tensor | None
    members: list[MemberResult]
    recorder: Recorder
    elapsed_s: float = 0.0  # wall time spent training before this state was captured

    def checkpoint(self, pop_id: str) -> PopulationCheckpoint:
        arrays: dict[str, np.ndarray] = {}
        for name, p in self.params.items():
            arrays[f"param:{name}"] = p.detach().numpy().copy()
        slots: dict[str, list[str]] = {}
        for name, st in self.opt.state.items():
            slots[name] = list(st)
            for slot, v in st.items():
                arrays[f"opt:{name}:{slot}"] = v.numpy().copy()
        positions = []
        for i, bs in enumerate(self.streams):
            pos, gen, perm = bs.state()
            positions.append(pos)
            arrays[f"stream:{i}:gen"], arrays[f"stream:{i}:perm"] = gen, perm
        arrays["active"] = self.active.numpy().copy()
        if self.init_loss is not None:
            arrays["init_loss"] = self.init_loss.numpy().copy()
        rec_meta, rec_arrays = self.recorder.state()
        arrays.update({f"rec:{k}": v for k, v in rec_arrays.items()})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "pop_id": pop_id,
            "run_ids": [m.run_id for m in self.members],
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "param_shapes": {k: list(v.shape) for k, v in self.params.items()},
            "opt_t": self.opt.t,
            "opt_slots": slots,
            "stream_pos": positions,
            "members": [{"status": m.status, "diverged_step": m.diverged_step, "steps_done": m.steps_done}
                        for m in self.members],
            "recorder": rec_meta,
        }
        return PopulationCheckpoint(meta, arrays)

    def restore(self, ckpt: PopulationCheckpoint, pop_id: str) -> None:
        """Load ``ckpt`` into this freshly built state of the same population (in place)."""
        meta, arrays = ckpt.meta, ckpt.arrays
        run_ids = [m.run_id for m in self.members]
        if meta["pop_id"] != pop_id or meta["run_ids"] != run_ids:
            raise ValueError(f"checkpoint of population {meta['pop_id']!r} cannot resume population {pop_id!r}")
        shapes = {k: list(v.shape) for k, v in self.params.items()}
        if meta["param_shapes"] != shapes:
            raise ValueError(f"checkpoint parameters {meta['param_shapes']} do not match the model's {shapes}")
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(arrays[f"param:{name}"]))
        self.opt.t = int(meta["opt_t"])
        self.opt.state = {name: {slot: torch.from_numpy(arrays[f"opt:{name}:{slot}"].copy()) for slot in slots}
                          for name, slots in meta["opt_slots"].items()}
        for i, bs in enumerate(self.streams):
            bs.load_state(meta["stream_pos"][i], arrays[f"stream:{i}:gen"], arrays[f"stream:{i}:perm"])
        self.active.copy_(torch.from_numpy(arrays["active"]))
        self.init_loss = torch.from_numpy(arrays["init_loss"].copy()) if "init_loss" in arrays else None
        for m, d in zip(self.members, meta["members"]):
            m.status, m.diverged_step, m.steps_done = d["status"], d["diverged_step"], d["steps_done"]
        self.recorder.load_state(meta["recorder"], {k[4:]: v for k, v in arrays.items() if k.startswith("rec:")})
        self.step, self.elapsed_s = int(meta["step"]), float(meta["elapsed_s"])


def train_population(
    pop: PopulationSpec,
    on_record: Callable[[int, int, int], None] | None = None,
    data: Dataset | None = None,
    *,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[PopulationCheckpoint], None] | None = None,
    resume: PopulationCheckpoint | None = None,
) -> PopulationResult:
    """Train every member of ``pop``; returns per-member status and the recorder's data.

    ``on_record(step, n_active, n_diverged)`` is called after each record (progress).
    With ``checkpoint_every > 0``, ``on_checkpoint(ckpt)`` gets the full training state
    at the start of every step that is a multiple of it (never at the first step
    trained, nor the last). ``resume`` continues from such a checkpoint; the result is
    bit-for-bit the one of an uninterrupted run (metrics, weights, statuses).
    """
    t0 = time.perf_counter()
    cfg = pop.shared
    data = data if data is not None else load_data(cfg)
    members = list(pop.members)
    P = len(members)
    dtype = DTYPES[cfg["dtype"]]

    # --- stacked initial parameters: member i initialised exactly as if trained alone
    models = [init_model(m.config, data) for m in members]
    params, buffers = stack_module_state(models)  # name -> (P, ...)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    del models

    loss_name = cfg["loss"] or data.default_loss
    kind = data.kind

    def member_loss(p, bufs, x, y):
        out = functional_call(base, (p, bufs), (x,))
        return loss_fn(loss_name, out, y), out

    step_fn = vmap(grad_and_value(member_loss, has_aux=True))

    def forward(p, bufs, x):
        return functional_call(base, (p, bufs), (x,))

    eval_fn = vmap(forward, in_dims=(0, 0, None))

    hp = {
        k: torch.tensor([float(m.config[k]) for m in members], dtype=dtype)
        for k in ("lr", "momentum", "dampening", "weight_decay", "beta1", "beta2", "eps")
    }
    # lr in NTK units: member i trains at lr_i / lambda0_i, lambda0 its NTK top eigenvalue at init
    x_curv, _ = curvature_batch(data, cfg["curvature_batch"])
    lambda0 = torch.full((P,), float("nan"), dtype=dtype)
    if cfg["lr_units"] == "ntk":
        for i in range(P):
            p_i = {k: v[i] for k, v in params.items()}
            lambda0[i] = member_ntk(base, p_i, {k: v[i] for k, v in buffers.items()}, x_curv)[0]
        hp["lr"] = hp["lr"] / lambda0
    # embedding parameters may have their own lr / weight decay (a second param group)
    own = lambda key: torch.tensor([m.config[key] is not None for m in members])  # noqa: E731
    embed_hp = {**hp,
                "lr": torch.where(own("embed_lr"), torch.tensor([float(member_embed_lr(m.config)) for m in members],
                                                                dtype=dtype), hp["lr"]),
                "weight_decay": torch.tensor([float(member_embed_wd(m.config)) for m in members], dtype=dtype)}
    param_hp = {name: embed_hp for name in params if name.startswith("embed")}
    opt = PopulationOptimizer(cfg["optimizer"], hp, nesterov=bool(cfg["nesterov"]), param_hp=param_hp)
    streams = [BatchStream(len(data.x_train), cfg["batch_size"], m.config["seed"]) for m in members]
    n_eval = min(cfg["eval_size"], len(data.x_train))
    x_eval, y_eval = data.x_train[:n_eval], data.y_train[:n_eval]

    @torch.no_grad()
    def evaluate(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean loss and accuracy on (x, y), in sample chunks to bound memory."""
        losses, accs, ns = [], [], []
        chunk = max(64, 2**22 // max(1, P * cfg["width"] * (4 if cfg["model"] == "transformer" else 1)))
        for i in range(0, len(x), chunk):
            out = eval_fn(params, buffers, x[i : i + chunk])  # (P, n, C)
            yc = y[i : i + chunk]
            losses.append(vmap(lambda o: loss_fn(loss_name, o, yc))(out))
            accs.append(vmap(lambda o: accuracy(kind, o, yc))(out))
            ns.append(len(yc))
        w = torch.tensor(ns, dtype=dtype) / sum(ns)
        return (torch.stack(losses, 1) * w).sum(1), (torch.stack(accs, 1) * w).sum(1)

    recorder = Recorder(cfg, members, params, lrs=hp["lr"].double().numpy(),
                        context={"model": base, "buffers": buffers, "data": data, "loss": loss_name})
    results = [MemberResult(m.run_id, m.config, extra={"lambda0": float(lambda0[i]), "lr_actual": float(hp["lr"][i])})
               for i, m in enumerate(members)]
    # constrained training: members with fixed_norm keep the total norm they start with (after init scaling)
    constrained = torch.tensor([m.config.get("fixed_norm") is not None for m in members])
    target_norm = total_norms(params)
    state = TrainState(step=0, params=params, opt=opt, streams=streams, active=torch.ones(P, dtype=torch.bool),
                       init_loss=None, members=results, recorder=recorder)
    if resume is not None:
        state.restore(resume, pop.pop_id)  # in place: the names below stay bound to the state
    recorder, results, active = state.recorder, state.members, state.active
    factor = float(cfg["divergence_factor"])
    steps, every, eval_every = int(cfg["steps"]), int(cfg["record_every"]), int(cfg["eval_every"])
    nan = torch.full((P,), float("nan"), dtype=dtype)
    start, before = state.step, state.elapsed_s  # a resumed run continues its step count and clock

    for step in range(start, steps + 1):
        if on_checkpoint is not None and checkpoint_every > 0 and start < step < steps and step % checkpoint_every == 0:
            state.step, state.elapsed_s = step, before + time.perf_counter() - t0
            on_checkpoint(state.checkpoint(pop.pop_id))
        idx = torch.stack([s.next() for s in streams])  # (P, B): each member its own order
        xb, yb = data.x_train[idx], data.y_train[idx]
        grads, (batch_loss, _) = step_fn(params, buffers, xb, yb)

        eval_now = step % eval_every == 0 or step == steps
        record_now = eval_now or step % every == 0
        if eval_now:
            tr_loss, tr_acc = evaluate(x_eval, y_eval)
        if state.init_loss is None:  # step 0 is always evaluated
            state.init_loss = tr_loss.clone().clamp_min(1e-12)
        init_loss = state.init_loss
        # divergence: NaN/inf or loss above factor x initial, on the batch or the eval set
        bad = ~torch.isfinite(batch_loss) | (batch_loss > factor * init_loss)
        if eval_now:
            bad |= ~torch.isfinite(tr_loss) | (tr_loss > factor * init_loss)
        newly = active & bad
        mask = active.clone() if record_now else newly
        if mask.any():
            if eval_now or newly.any():  # a diverging run gets a full evaluation at its last step
                if not eval_now:
                    tr_loss, tr_acc = evaluate(x_eval, y_eval)
                te_loss, te_acc = evaluate(data.x_test, data.y_test)
                train, test = (tr_loss, tr_acc), (te_loss, te_acc)
                if not eval_now:  # only the diverging members get the evaluation on this step
                    train = (torch.where(newly, tr_loss, nan), torch.where(newly, tr_acc, nan))
                    test = (torch.where(newly, te_loss, nan), torch.where(newly, te_acc, nan))
            else:
                train, test = (nan, nan), (nan, nan)
            recorder.record(step, mask, params, grads, opt, train=train, test=test, batch_loss=batch_loss)
        recorder.on_step(step, params, grads, active)  # per-step trackers (symmetry); diverging members included
        for i in torch.nonzero(newly).flatten().tolist():
            results[i].status, results[i].diverged_step, results[i].steps_done = "diverged", step, step
        active &= ~newly
        if record_now and on_record is not None:
            on_record(step, int(active.sum()), int((~active).sum()))
        if not active.any() or step == steps:
            break
        opt.step(params, grads, active)
        if constrained.any():
            renormalise(params, target_norm, constrained & active)
        recorder.after_update(step, opt)

    for i, r in enumerate(results):
        if r.status == "completed":
            r.steps_done = steps
    return PopulationResult(results, recorder, before + time.perf_counter() - t0)
