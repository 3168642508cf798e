"""Population training: many runs of one architecture trained together with torch.func.

A *population* is a set of runs that share data set, architecture, batch size and
optimiser kind (see :func:`raydyn.spec.populations`). Their parameters are
stacked along a leading axis P and one training step of all of them is one
``vmap``-ed call, so a Ray Tune trial trains P runs for roughly the price of a
few. Per-member values (seed, lr, momentum, weight decay, Adam betas/eps,
schedule, clipping) are (P,) tensors broadcast in the optimiser
(:mod:`raydyn.train.optim`), which is exactly PyTorch's update, so that a member's
trajectory equals the same run trained alone with ``torch.optim`` (tested).

The model can be any ``nn.Module`` from the registry (built-in or plug-in):

* buffers (e.g. ``nn.BatchNorm2d``'s running statistics) are kept per member, updated by
  each member's own training batches; evaluation runs the model in ``eval()`` mode, so it
  uses them, as a plain PyTorch loop with ``model.eval()`` would;
* random layers (dropout) draw independent randomness per member (``vmap(randomness=
  "different")``); the RNG state is part of checkpoints;
* a model ``vmap`` cannot trace (``.item()``, data-dependent Python control flow, ...) is
  trained member by member in the same trial, with one warning: slower, same results.

Everything lives on one device (``cpu`` or ``cuda``): parameters, optimiser state, data
and per-member hyperparameters. The recorder is the one place that copies to the host.

Everything that changes during training is one :class:`TrainState`; its
:meth:`TrainState.checkpoint` is a :class:`PopulationCheckpoint` (numpy arrays +
JSON, no pickle) from which ``train_population(..., resume=...)`` continues
bit-for-bit as if never interrupted (tested).

Shapes: P members, B batch size, D flattened parameters.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from raydyn.spec import PopulationSpec, early_stop_rungs
from raydyn.tasks.build import DTYPES, init_model, load_data
from raydyn.tasks.data import Dataset
from raydyn.train.checkpoint import CHECKPOINT_FORMAT, PopulationCheckpoint
from raydyn.train.curvature import curvature_batch, member_ntk
from raydyn.train.objectives import accuracy, loss_fn
from raydyn.train.optim import PopulationOptimizer, Schedule, clip_coefficients
from raydyn.train.recorder import Recorder


class NotVectorisedWarning(UserWarning):
    """A population is trained member by member because ``vmap`` cannot handle its model."""


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


def resolve_device(device: str | None) -> torch.device:
    """``auto`` -> ``cuda`` when CUDA is usable here (Ray sets CUDA_VISIBLE_DEVICES to the trial's GPUs,
    so a trial without a GPU sees none), else ``cpu``; ``cuda`` without CUDA is an error naming it."""
    from raydyn.errors import RaydynError

    device = device or "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RaydynError(f"train.device: {device!r}, but this worker has no usable CUDA device "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); give the "
                          "trial a GPU with resources.gpu, or use device: auto / cpu")
    return torch.device(device)


class BatchStream:
    """A run's own data order: successive batches of seeded per-epoch permutations.

    Full batch (batch_size >= n) always yields all indices in order. Otherwise an
    epoch is a random permutation cut into floor(n / B) batches (the remainder is
    dropped), and the next epoch draws a new permutation. Indices live on the CPU.
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


class BatchRows:
    """The members' next batches at once: :meth:`next` returns the same (P, B) indices as
    ``torch.stack([s.next() for s in streams])`` and leaves every stream where that leaves it, without
    a call per member.

    A population's streams go in step (same data size, batch size and position), so each epoch's
    permutations are drawn into the rows of one (P, n) tensor (each stream draws its own, from its own
    generator, with ``torch.randperm(..., out=row)``, and its ``perm`` is that row) and a batch is a slice
    of columns. Streams that are not in step, or whose permutations came from elsewhere (a checkpoint),
    are drawn one by one until the next epoch starts (permutations from a checkpoint are gathered into
    rows first when they can be)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.views: tuple[torch.Tensor, ...] = ()  # rows[i], as streams[i].perm (identity tells they are still)

    def next(self, streams: list[BatchStream]) -> torch.Tensor:
        s0 = streams[0]
        n, b, pos = s0.n, s0.b, s0.pos
        if s0.full or not all(s.n == n and s.b == b and s.pos == pos and not s.full for s in streams):
            return torch.stack([s.next() for s in streams])
        if pos + b > len(s0.perm):  # a new epoch
            if not all(pos + b > len(s.perm) for s in streams):
                return torch.stack([s.next() for s in streams])
            rows = torch.empty((len(streams), n), dtype=torch.long)
            for s, row in zip(streams, rows):
                torch.randperm(n, generator=s.gen, out=row)
                s.perm, s.pos = row, 0
            self.rows, self.views, pos = rows, tuple(s.perm for s in streams), 0
        elif len(self.views) != len(streams) or any(s.perm is not v for s, v in zip(streams, self.views)):
            if not all(len(s.perm) == len(s0.perm) for s in streams):
                return torch.stack([s.next() for s in streams])
            self.rows = torch.stack([s.perm for s in streams])
            for s, row in zip(streams, self.rows):
                s.perm = row
            self.views = tuple(s.perm for s in streams)
        for s in streams:
            s.pos = pos + b
        return self.rows[:, pos:pos + b]


# ---------------------------------------------------------------------------- the model as P functions
class PopulationFunctions:
    """A population's per-member loss gradients and forward passes, vectorised when possible.

    ``base_train`` / ``base_eval``: the model's structure on the ``meta`` device in train / eval
    mode; parameters and buffers are passed in stacked (P, ...). Buffers are updated in place
    by training forward passes (batch norm running statistics), never by evaluation.

    ``vectorised`` is decided once by :meth:`check`: a model that ``vmap`` cannot trace falls
    back to a loop over members (same functions, one member at a time).

    Vectorised gradients are vmap(grad)'s numbers, computed the fastest way that gives them bit for bit
    (:meth:`_choose`, once per input layout): vmap(grad)'s own aten operations traced into a graph (~30%
    less per step than vmap(grad) for the MLP of benchmarks/sweep_throughput.py; batch norm included, its
    running statistics updated by the graph as by vmap(grad)), plain autograd through the vmapped losses
    (modules of a plug-in's own classes, which are not traced), or vmap(grad) itself.
    """

    def __init__(self, base_train: torch.nn.Module, base_eval: torch.nn.Module, loss_name: str,
                 autocast: torch.device | None = None):
        self.base_train, self.base_eval, self.loss_name = base_train, base_eval, loss_name
        self.autocast = autocast  # bf16 autocast on this device type, or None
        self.vectorised = True
        self.why_not = ""

        def member_loss(p, bufs, x, y, vmapped=False):
            with self._cast():
                out = functional_call(self.base_train, (p, bufs), (x,))
            return loss_fn(self.loss_name, out.to(_dtype_of(p)), y, vmapped=vmapped)

        def forward(p, bufs, x):
            with self._cast():
                out = functional_call(self.base_eval, (p, bufs), (x,))
            return out.to(_dtype_of(p))

        self._grad_one = grad_and_value(member_loss)
        self._grad_batched = grad_and_value(lambda p, bufs, x, y: member_loss(p, bufs, x, y, vmapped=True))
        self._forward_one = forward
        self._grad_vmap = vmap(self._grad_batched, randomness="different")
        self._loss_vmap = vmap(lambda p, bufs, x, y: member_loss(p, bufs, x, y, vmapped=True), randomness="different")
        self._forward_vmap = vmap(forward, in_dims=(0, 0, None), randomness="different")
        # faster ways to vmap(grad)'s very numbers, chosen once per input layout by :meth:`_choose`
        self._fast: dict[tuple, Callable] = {}
        self.traceable = _pure_modules(base_train)
        self.traces = 0

    def _cast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.autocast.type, dtype=torch.bfloat16)

    def check(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], xb: torch.Tensor,
              yb: torch.Tensor) -> None:
        """Try one vectorised step on copies (two members); fall back to the loop if it fails."""
        p2 = {k: v[:2].detach().clone() for k, v in params.items()}
        b2 = {k: v[:2].clone() for k, v in buffers.items()}  # (batch norm in train mode needs > 1 sample: full batches)
        state = _rng_state(next(iter(params.values())).device)
        try:
            self._grad_vmap(p2, b2, xb[:2], yb[:2])
            self._forward_vmap(p2, b2, xb[0])
        except Exception as e:  # noqa: BLE001 -- any failure to trace: the loop computes the same thing
            self.vectorised = False
            self.why_not = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        finally:
            _set_rng_state(state, next(iter(params.values())).device)

    def _choose(self, params, buffers, xb, yb) -> Callable:
        """How :meth:`grad` computes the gradients for inputs of this layout (shapes, strides, dtypes): the
        first of (1) :meth:`_traced` (models built from torch.nn and raydyn modules only, at most
        ``_MAX_TRACES`` graphs per population), (2) :meth:`_grad_autograd`, (3) vmap(grad) whose result on
        this step holds the same bits as vmap(grad)'s (values and memory layout). Each is tried on copies of
        the parameters and buffers under the same random state, which is restored after; a way that fails
        is skipped. The fast ways run the same kernels on the same operands as vmap(grad) (checked here,
        per layout, rather than assumed: a model whose gradients they would round differently keeps vmap(grad))."""
        dev = next(iter(params.values())).device
        state = _rng_state(dev)

        def copies():
            return {k: v.detach().clone() for k, v in params.items()}, {k: v.clone() for k, v in buffers.items()}

        ways: list[Callable[[], Callable]] = [lambda: self._grad_autograd]
        if self.traceable and self.traces < _MAX_TRACES:
            ways.insert(0, lambda: self._traced(*copies(), xb, yb))
        try:
            ref = self._grad_vmap(*copies(), xb, yb)
            for way in ways:
                try:
                    _set_rng_state(state, dev)
                    fn = way()
                    _set_rng_state(state, dev)
                    if _same_bits(ref, fn(*copies(), xb, yb)):
                        return fn
                except Exception:  # noqa: BLE001 -- this way cannot run the model: the next one
                    pass
            return self._grad_vmap
        finally:
            _set_rng_state(state, dev)

    def _traced(self, params, buffers, xb, yb) -> Callable:
        """vmap(grad) itself traced once (``make_fx``, on these inputs, which it runs) into one graph of the
        batched aten operations it runs, forward and backward, which then run straight from the graph: vmap(grad)'s
        own kernels on its own operands, without vmap's, functional_call's and the autograd engine's Python
        around each. Valid for inputs of this layout only, and for modules whose forward is a function of its
        tensors alone (no Python state that changes between calls): :func:`_pure_modules`.

        (Tracing vmap(grad) rather than plain autograd through the vmapped losses: those two run different
        matrix-product layouts for some weight gradients, which round alike on some CPUs and not on others,
        e.g. one ulp apart in the output layer's weight gradient on an AMD EPYC. The trace of vmap(grad) is also
        the faster graph: 3.5-3.7 s against 3.9-4.0 s for the 2,000 steps of a population of 32 MLPs there.)"""
        from torch.fx.experimental.proxy_tensor import make_fx

        names, bnames = list(params), list(buffers)

        def flat(ps, bs, x, y):
            g, loss = self._grad_vmap(dict(zip(names, ps)), dict(zip(bnames, bs)), x, y)
            return [g[k] for k in names], loss

        self.traces += 1
        graph = _drop_aliases(make_fx(flat)(list(params.values()), list(buffers.values()), xb, yb))

        def run(params, buffers, xb, yb):
            with torch.no_grad():
                g, loss = graph(list(params.values()), list(buffers.values()), xb, yb)
            return dict(zip(names, g)), loss
        return run

    def _grad_autograd(self, params, buffers, xb, yb) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`grad`, by one backward pass of plain autograd through the vmapped losses: members share no
        parameter, so the gradient of the sum of their losses with respect to the stacked parameters is each
        member's own gradient; made contiguous (weight gradients come out transposed)."""
        names = list(params)
        leaves = [params[k].detach().requires_grad_() for k in names]
        with torch.enable_grad():
            losses = self._loss_vmap(dict(zip(names, leaves)), buffers, xb, yb)
            grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True, materialize_grads=True)
        return {k: g.contiguous() for k, g in zip(names, grads)}, losses.detach()

    def grad(self, params, buffers, xb, yb) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-member gradients (name -> (P, ...)) and batch losses (P,) on batches xb (P, B, ...)."""
        if self.vectorised:
            key = (_layout(params), _layout(buffers), _layout({"x": xb, "y": yb}))
            fn = self._fast.get(key)
            if fn is None:
                fn = self._fast[key] = self._choose(params, buffers, xb, yb)
            return fn(params, buffers, xb, yb)
        grads, losses = [], []
        for i in range(xb.shape[0]):
            g, l = self._grad_one({k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()},
                                  xb[i], yb[i])
            grads.append(g)
            losses.append(l)
        return {k: torch.stack([g[k] for g in grads]) for k in params}, torch.stack(losses)

    @torch.no_grad()
    def forward(self, params, buffers, x) -> torch.Tensor:
        """(P, n, out) outputs of every member on the same inputs x (n, ...), in eval mode."""
        if self.vectorised:
            return self._forward_vmap(params, buffers, x)
        P = next(iter(params.values())).shape[0]
        return torch.stack([self._forward_one({k: v[i] for k, v in params.items()},
                                              {k: v[i] for k, v in buffers.items()}, x) for i in range(P)])


#: graphs :meth:`PopulationFunctions._traced` builds at most per population (one per input layout: a population
#: that early stopping compacts again and again traces its first few sizes, then uses plain autograd)
_MAX_TRACES = 4


def _layout(ts: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, t.shape, t.stride(), t.dtype, t.device) for k, t in ts.items())


#: loss dtypes the divergence check compares in numpy on the CPU (numpy has no bfloat16)
_NUMPY_FLOATS = (torch.float32, torch.float64)


def _drop_aliases(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` without the nodes that only alias their input with its own shape and strides (``detach``; a
    ``view``, ``expand`` or ``_unsafe_view`` to the shape it has): run without autograd they change nothing,
    and they are a third of a traced training step's operations."""
    aten = torch.ops.aten
    reshapes = (aten.view.default, aten.expand.default, aten._unsafe_view.default)
    for node in list(gm.graph.nodes):
        src = node.args[0] if node.op == "call_function" and node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        a, b = src.meta.get("val"), node.meta.get("val")
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.stride() == b.stride())
        if node.target is aten.detach.default or (node.target in reshapes and same):
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _pure_modules(module: torch.nn.Module) -> bool:
    """Every submodule is a torch.nn or raydyn class, whose forward depends on its tensors alone (a plug-in's
    own class might keep Python state that a traced graph would freeze)."""
    return all(type(m).__module__.startswith(("torch.nn.", "raydyn.")) for m in module.modules())


def _same_bits(a: tuple[dict[str, torch.Tensor], torch.Tensor], b: tuple[dict[str, torch.Tensor], torch.Tensor]) -> bool:
    """Two (gradients, losses) results hold the same bits: names, shapes, memory layouts (the strides of
    dimensions longer than 1), dtypes and values (NaN counts as different)."""
    (ga, la), (gb, lb) = a, b
    layout = lambda t: [s for s, n in zip(t.stride(), t.shape) if n > 1]  # noqa: E731
    pairs = [(la, lb)] + [(ga[k], gb.get(k)) for k in ga]
    return list(ga) == list(gb) and all(
        y is not None and x.dtype == y.dtype and x.shape == y.shape and layout(x) == layout(y) and torch.equal(x, y)
        for x, y in pairs)


def _dtype_of(p: dict[str, torch.Tensor]) -> torch.dtype:
    return next(iter(p.values())).dtype


def _activation_numel(base: torch.nn.Module, input_shape: tuple[int, ...], tokens: bool) -> int:
    """Elements of every module output for one sample (a forward on the ``meta`` device: no compute),
    to size evaluation chunks; a rough upper bound of the activation memory per sample."""
    total = [0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel()

    handles = [m.register_forward_hook(hook) for m in base.modules()]
    try:
        shape = (2, *input_shape)  # two samples: batch norm without running statistics needs more than one
        x = (torch.zeros(shape, dtype=torch.long, device="meta") if tokens
             else torch.zeros(shape, device="meta", dtype=next(base.parameters()).dtype))
        with torch.no_grad():
            base(x)
    except Exception:  # noqa: BLE001 -- a model meta tensors cannot run through: assume a large one
        return 1 << 16
    finally:
        for h in handles:
            h.remove()
    return max(1, total[0] // 2)


def _batch_dependent_eval(base: torch.nn.Module) -> bool:
    """True when the model's eval-mode output for a sample depends on the rest of the batch (batch norm
    without running statistics normalises with the statistics of the batch it sees): evaluation must
    then see each evaluation set whole, not in chunks."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return any(isinstance(m, _BatchNorm) and not m.track_running_stats for m in base.modules())


# ---------------------------------------------------------------------------- training
@dataclass
class MemberResult:
    run_id: str
    config: dict[str, Any]
    status: str = "completed"  # | diverged | stopped (early stopping at a rung)
    diverged_step: int | None = None
    steps_done: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more runs-table columns (lambda0, lr_actual)


@dataclass
class PopulationResult:
    members: list[MemberResult]
    recorder: Recorder
    wall_time_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _rng_state(device: torch.device) -> dict[str, np.ndarray]:
    out = {"rng:cpu": torch.random.get_rng_state().numpy().copy()}
    if device.type == "cuda":
        out["rng:cuda"] = torch.cuda.get_rng_state(device).numpy().copy()
    return out


def _set_rng_state(arrays: dict[str, np.ndarray], device: torch.device) -> None:
    if "rng:cpu" in arrays:
        torch.random.set_rng_state(torch.from_numpy(arrays["rng:cpu"].copy()))
    if "rng:cuda" in arrays and device.type == "cuda":
        torch.cuda.set_rng_state(torch.from_numpy(arrays["rng:cuda"].copy()), device)


@dataclass
class TrainState:
    """Everything that changes while a population trains, as of the start of step ``step``.

    Shapes: ``params``/``buffers`` name -> (P, ...); ``active`` (P,) bool; ``init_loss`` (P,) (set at
    step 0). Everything else (data, model structure, hyperparameters) is a pure function of the
    population's configs and is rebuilt, not stored. Tensors live on ``device``; checkpoints hold
    host copies, so a checkpoint resumes on any device.
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt: PopulationOptimizer
    streams: list[BatchStream]
    active: torch.Tensor
    init_loss: torch.Tensor | None
    members: list[MemberResult]
    recorder: Recorder
    device: torch.device = torch.device("cpu")
    elapsed_s: float = 0.0  # wall time spent training before this state was captured
    # early stopping: the member index of each row of the per-member tensors once stopped and diverged
    # members were dropped (None: every member still has its row)
    live: np.ndarray | None = None

    def checkpoint(self, pop_id: str) -> PopulationCheckpoint:
        host = lambda t: t.detach().cpu().numpy().copy()  # noqa: E731
        arrays: dict[str, np.ndarray] = {}
        for name, p in self.params.items():
            arrays[f"param:{name}"] = host(p)
        for name, b in self.buffers.items():
            arrays[f"buffer:{name}"] = host(b)
        slots: dict[str, list[str]] = {}
        for name, st in self.opt.state.items():
            slots[name] = list(st)
            for slot, v in st.items():
                arrays[f"opt:{name}:{slot}"] = host(v)
        positions = []
        for i, bs in enumerate(self.streams):
            pos, gen, perm = bs.state()
            positions.append(pos)
            arrays[f"stream:{i}:gen"], arrays[f"stream:{i}:perm"] = gen, perm
        arrays["active"] = host(self.active)
        if self.live is not None:
            arrays["live"] = np.asarray(self.live, dtype=np.int64).copy()
        if self.init_loss is not None:
            arrays["init_loss"] = host(self.init_loss)
        arrays.update(_rng_state(self.device))
        rec_meta, rec_arrays = self.recorder.state()
        arrays.update({f"rec:{k}": v for k, v in rec_arrays.items()})
        meta = {
            "format": CHECKPOINT_FORMAT,
            "pop_id": pop_id,
            "run_ids": [m.run_id for m in self.members],
            "step": self.step,
            "elapsed_s": self.elapsed_s,
            "param_shapes": {k: list(v.shape) for k, v in self.params.items()},
            "buffer_names": list(self.buffers),
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
        dev = self.device
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(arrays[f"param:{name}"]).to(dev))
            for name, b in self.buffers.items():
                if f"buffer:{name}" in arrays:  # format 1 had no buffers (built-ins have none)
                    b.copy_(torch.from_numpy(arrays[f"buffer:{name}"]).to(dev))
        self.opt.t = int(meta["opt_t"])
        self.opt.state = {name: {slot: torch.from_numpy(arrays[f"opt:{name}:{slot}"].copy()).to(dev) for slot in slots}
                          for name, slots in meta["opt_slots"].items()}
        for i, bs in enumerate(self.streams):
            bs.load_state(meta["stream_pos"][i], arrays[f"stream:{i}:gen"], arrays[f"stream:{i}:perm"])
        self.active.copy_(torch.from_numpy(arrays["active"]).to(dev))
        self.init_loss = torch.from_numpy(arrays["init_loss"].copy()).to(dev) if "init_loss" in arrays else None
        _set_rng_state(arrays, dev)
        for m, d in zip(self.members, meta["members"]):
            m.status, m.diverged_step, m.steps_done = d["status"], d["diverged_step"], d["steps_done"]
        self.recorder.load_state(meta["recorder"], {k[4:]: v for k, v in arrays.items() if k.startswith("rec:")})
        self.step, self.elapsed_s = int(meta["step"]), float(meta["elapsed_s"])


def config_groups(configs: list[dict[str, Any]]) -> np.ndarray:
    """(P,) group index of each member: members whose configs differ only in ``seed`` share one (a
    *configuration* of early stopping), numbered in order of first appearance."""
    keys: dict[str, int] = {}
    out = []
    for c in configs:
        key = json.dumps({k: v for k, v in c.items() if k != "seed"}, sort_keys=True, default=str)
        out.append(keys.setdefault(key, len(keys)))
    return np.array(out, dtype=np.int64)


def successive_halving(values: np.ndarray, groups: np.ndarray, alive: np.ndarray, eta: int, mode: str) -> np.ndarray:
    """One rung of successive halving: indices of the members to stop.

    ``values`` (n,): each member's rung metric; ``groups`` (n,): its configuration; ``alive`` (n,) bool:
    members still training (the others are ignored). A configuration's score is the mean of its alive
    members' values (NaN or inf for a loss counts as worst); the best ``ceil(k / eta)`` of the k
    configurations with an alive member keep training (ties: the configuration seen first wins), every
    alive member of the others stops."""
    ids = [g for g in dict.fromkeys(groups[alive].tolist())]
    scores = []
    for g in ids:
        v = values[alive & (groups == g)]
        m = float(np.mean(v)) if np.all(np.isfinite(v)) else math.nan
        scores.append(m if mode == "min" or math.isnan(m) else -m)
    order = sorted(range(len(ids)), key=lambda j: (math.isnan(scores[j]), scores[j] if not math.isnan(scores[j]) else 0, j))
    kept = {ids[j] for j in order[:math.ceil(len(ids) / eta)]}
    return np.flatnonzero(alive & ~np.isin(groups, list(kept)))


class _FullOpt:
    """The optimiser as per-step trackers see it while some members have stopped: its state over all P
    members (the stopped ones zero)."""

    def __init__(self, opt: PopulationOptimizer, full: Callable[[torch.Tensor], torch.Tensor]):
        self.kind, self.t = opt.kind, opt.t
        self.state = {name: {slot: full(v) for slot, v in st.items()} for name, st in opt.state.items()}


def _population_seed(members) -> int:
    """A seed for the population's own randomness (dropout), from its members' run ids."""
    h = hashlib.sha256(",".join(m.run_id for m in members).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def train_population(
    pop: PopulationSpec,
    on_record: Callable[[int, int, int], None] | None = None,
    data: Dataset | None = None,
    *,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[PopulationCheckpoint], None] | None = None,
    resume: PopulationCheckpoint | None = None,
    device: str | None = "cpu",
    base_dir: str | None = None,
    checkpoint_seconds: float | None = None,
    prune: Callable[[int, float], bool] | None = None,
) -> PopulationResult:
    """Train every member of ``pop``; returns per-member status and the recorder's data.

    ``on_record(step, n_active, n_diverged)`` is called after each record (progress).
    With ``checkpoint_every > 0``, ``on_checkpoint(ckpt)`` gets the full training state
    at the start of every step that is a multiple of it (never at the first step
    trained, nor the last); with ``checkpoint_seconds`` also at the first step boundary after every that
    many seconds of training. ``resume`` continues from such a checkpoint; the result is
    bit-for-bit the one of an uninterrupted run (metrics, weights, statuses).
    ``device``: ``cpu``, ``cuda`` or ``auto`` (:func:`resolve_device`). ``base_dir``: what relative
    data paths are relative to (the directory the sweep was launched from).

    With ``train.early_stop`` set, at every rung the members still training are halved by configuration
    (:func:`successive_halving`; stopped members get status ``stopped``, ``steps_done`` the rung) and are
    then dropped from every per-member tensor. ``prune(step, value)``, when given, is asked next with the
    mean rung metric of the members still training (an Optuna trial's one configuration): True stops them all.
    """
    t0 = time.perf_counter()
    cfg = pop.shared
    dev = resolve_device(device)
    dtype = DTYPES[cfg["dtype"]]
    data = (data if data is not None else load_data(cfg, base_dir)).to(dtype, dev)
    members = list(pop.members)
    P = len(members)

    # --- stacked initial parameters: member i initialised exactly as if trained alone (on the CPU,
    # under torch.manual_seed(its seed)), then moved to the device
    models = [init_model(m.config, data) for m in members]
    frozen = [n for n, p in models[0].named_parameters() if not p.requires_grad]  # constants, not trained
    params, buffers = stack_module_state(models)  # name -> (P, ...)
    buffers = {k: v.to(dev) for k, v in buffers.items()}
    buffers.update({k: params.pop(k).detach().to(dev) for k in frozen})
    params = {k: v.detach().to(dev).clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    base_eval = copy.deepcopy(base).eval()
    base.train()
    del models
    torch.manual_seed(_population_seed(members))  # dropout masks: reproducible, independent per member

    loss_name = cfg["loss"] or data.default_loss
    kind = data.kind
    autocast = dev if cfg.get("precision", "full") == "bf16" else None
    fns = PopulationFunctions(base, base_eval, loss_name, autocast)
    tensor = lambda vals: torch.tensor(vals, dtype=dtype, device=dev)  # noqa: E731

    hp = {k: tensor([float(m.config[k]) for m in members])
          for k in ("lr", "momentum", "dampening", "weight_decay", "beta1", "beta2", "eps")}
    # lr in NTK units: member i trains at lr_i / lambda0_i, lambda0 its NTK top eigenvalue at init
    x_curv, _ = curvature_batch(data, cfg["curvature_batch"])
    lambda0 = torch.full((P,), float("nan"), dtype=dtype, device=dev)
    if cfg["lr_units"] == "ntk":
        for i in range(P):
            p_i = {k: v[i] for k, v in params.items()}
            lambda0[i] = member_ntk(base_eval, p_i, {k: v[i] for k, v in buffers.items()}, x_curv)[0]
        hp["lr"] = hp["lr"] / lambda0
    # embedding parameters may have their own lr / weight decay (a second param group)
    own = lambda key: torch.tensor([m.config[key] is not None for m in members], device=dev)  # noqa: E731
    embed_hp = {**hp,
                "lr": torch.where(own("embed_lr"), tensor([float(member_embed_lr(m.config)) for m in members]),
                                  hp["lr"]),
                "weight_decay": tensor([float(member_embed_wd(m.config)) for m in members])}
    param_hp = {name: embed_hp for name in params if name.startswith("embed")}
    opt = PopulationOptimizer(cfg["optimizer"], hp, nesterov=bool(cfg["nesterov"]), param_hp=param_hp)
    schedule = Schedule([m.config for m in members], int(cfg["steps"]), dtype, dev)
    clip = tensor([float(m.config.get("clip_grad_norm") or "inf") for m in members])
    clipping = bool(torch.isfinite(clip).any())
    streams = [BatchStream(data.n_train, cfg["batch_size"], m.config["seed"]) for m in members]
    n_eval = min(cfg["eval_size"], data.n_train)
    # evaluation in sample chunks, so that P members' activations stay within ~2^25 elements
    per_sample = _activation_numel(base_eval, data.input_shape, bool(data.vocab))
    chunk = max(16, (1 << 25) // max(1, P * per_sample))
    if _batch_dependent_eval(base_eval):
        chunk = max(n_eval, int(data.x_test.shape[0]))

    @torch.no_grad()
    def evaluate(split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-member mean loss and accuracy on the first n samples of a split, in chunks."""
        total = min(n, data.n_train) if n is not None else int(data.x_test.shape[0])
        losses, accs, ns = [], [], []
        for start in range(0, total, chunk):
            x, y = data.head(split, min(chunk, total - start), start)
            out = fns.forward(params, buffers, x)  # (P, n, C)
            losses.append(vmap(lambda o: loss_fn(loss_name, o, y, vmapped=True))(out))
            accs.append(vmap(lambda o: accuracy(kind, o, y))(out))
            ns.append(len(y))
        w = tensor(ns) / sum(ns)
        return (torch.stack(losses, 1) * w).sum(1), (torch.stack(accs, 1) * w).sum(1)

    recorder = Recorder(cfg, members, params, lrs=hp["lr"].double().cpu().numpy(),
                        context={"model": base_eval, "buffers": buffers, "data": data, "loss": loss_name})
    results = [MemberResult(m.run_id, m.config, extra={"lambda0": float(lambda0[i]), "lr_actual": float(hp["lr"][i])})
               for i, m in enumerate(members)]
    # constrained training: members with fixed_norm keep the total norm they start with (after init scaling)
    constrained = torch.tensor([m.config.get("fixed_norm") is not None for m in members], device=dev)
    target_norm = total_norms(params)
    any_constrained = bool(constrained.any())
    state = TrainState(step=0, params=params, buffers=buffers, opt=opt, streams=streams,
                       active=torch.ones(P, dtype=torch.bool, device=dev), init_loss=None, members=results,
                       recorder=recorder, device=dev)
    nan = torch.full((P,), float("nan"), dtype=dtype, device=dev)

    # early stopping (train.early_stop): successive halving at rung steps; members that stop (or diverge) are
    # then dropped from every per-member tensor, so the rest of training costs only the members still training.
    # `live` maps the rows of those tensors to member indices (the recorder and `results` keep all P members).
    es = cfg.get("early_stop") or None
    rungs = set(early_stop_rungs(es, int(cfg["steps"])))
    groups = config_groups([m.config for m in members])
    live = np.arange(P)

    def compact(keep: np.ndarray) -> None:
        """Keep only rows ``keep`` (indices into the current rows) of every per-member tensor."""
        nonlocal params, buffers, hp, clip, constrained, target_norm, streams, nan, live, active
        k = torch.as_tensor(keep, dtype=torch.long, device=dev)
        params = {n: v.index_select(0, k) for n, v in params.items()}
        buffers = {n: v.index_select(0, k) for n, v in buffers.items()}
        opt.select(k)
        hp = opt.hp
        schedule.select(k)
        clip, constrained, target_norm, nan = (t.index_select(0, k) for t in (clip, constrained, target_norm, nan))
        streams = [streams[i] for i in keep.tolist()]
        live = live[keep]
        active = state.active.index_select(0, k)
        state.params, state.buffers, state.streams, state.active, state.live = params, buffers, streams, active, live
        if state.init_loss is not None:
            state.init_loss = state.init_loss.index_select(0, k)

    def full(t: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """Rows of the current members -> all P members (the others ``fill``), for the recorder."""
        if len(live) == P:
            return t
        out = t.new_full((P,) + tuple(t.shape[1:]), fill)
        out[torch.as_tensor(live, device=t.device)] = t
        return out

    active = state.active
    if resume is not None:
        if "live" in resume.arrays:  # the checkpoint was taken after members stopped: same rows as then
            compact(np.asarray(resume.arrays["live"], dtype=np.int64))
        state.restore(resume, pop.pop_id)  # in place: the names below stay bound to the state
    recorder, results, active = state.recorder, state.members, state.active
    alive = active.cpu().numpy().copy()  # host mirror of `active`: no device sync to read it
    factor = float(cfg["divergence_factor"])
    steps, every, eval_every = int(cfg["steps"]), int(cfg["record_every"]), int(cfg["eval_every"])
    start, before = state.step, state.elapsed_s  # a resumed run continues its step count and clock
    checked = False
    last_ckpt = time.perf_counter()
    per_step = recorder.per_step
    batches = BatchRows()
    host_check = dev.type == "cpu"
    limit_of = limit = limit_host = None

    for step in range(start, steps + 1):
        if on_checkpoint is not None and start < step < steps and (
                (checkpoint_every > 0 and step % checkpoint_every == 0)
                or (checkpoint_seconds and time.perf_counter() - last_ckpt >= checkpoint_seconds)):
            state.step, state.elapsed_s = step, before + time.perf_counter() - t0
            on_checkpoint(state.checkpoint(pop.pop_id))
            last_ckpt = time.perf_counter()
        idx = batches.next(streams)  # (P, B): each member its own order
        xb, yb = data.take("train", idx)
        if not checked:  # can vmap trace this model? (decided once, on the first batch)
            fns.check(params, buffers, xb, yb)
            checked = True
            if not fns.vectorised:
                warnings.warn(f"population {pop.pop_id}: model {cfg['model']!r} cannot be vectorised with vmap "
                              f"({fns.why_not}); training its {P} runs one by one in this trial",
                              NotVectorisedWarning, stacklevel=2)
        grads, batch_loss = fns.grad(params, buffers, xb, yb)

        eval_now = step % eval_every == 0 or step == steps
        record_now = eval_now or step % every == 0
        if eval_now:
            tr_loss, tr_acc = evaluate("train", n_eval)
        if state.init_loss is None:  # step 0 is always evaluated
            state.init_loss = tr_loss.clone().clamp_min(1e-12)
        init_loss = state.init_loss
        if init_loss is not limit_of:  # the divergence threshold, once per initial-loss tensor
            limit_of, limit = init_loss, factor * init_loss
            limit_host = limit.numpy() if host_check and limit.dtype in _NUMPY_FLOATS else None
        # divergence: NaN/inf or loss above factor x initial, on the batch or the eval set
        if limit_host is not None and batch_loss.dtype == limit.dtype:
            # on the CPU: the same comparisons in numpy, on the tensors' own memory (no torch op per step)
            bl = batch_loss.detach().numpy()
            bad_host = ~np.isfinite(bl) | (bl > limit_host)
            if eval_now:
                tl = tr_loss.detach().numpy()
                bad_host |= ~np.isfinite(tl) | (tl > limit_host)
            newly_host = alive & bad_host  # `alive` mirrors `active`
            any_new = bool(newly_host.any())
            newly = torch.from_numpy(newly_host.copy()) if any_new else None
        else:
            bad = ~torch.isfinite(batch_loss) | (batch_loss > limit)
            if eval_now:
                bad |= ~torch.isfinite(tr_loss) | (tr_loss > limit)
            newly = active & bad
            newly_host = newly.cpu().numpy()  # the one host sync of a step that does not record
            any_new = bool(newly_host.any())
        if record_now or any_new:
            mask = active.clone() if record_now else newly
            if eval_now or any_new:  # a diverging run gets a full evaluation at its last step
                if not eval_now:
                    tr_loss, tr_acc = evaluate("train", n_eval)
                te_loss, te_acc = evaluate("test", None)
                train, test = (tr_loss, tr_acc), (te_loss, te_acc)
                if not eval_now:  # only the diverging members get the evaluation on this step
                    train = (torch.where(newly, tr_loss, nan), torch.where(newly, tr_acc, nan))
                    test = (torch.where(newly, te_loss, nan), torch.where(newly, te_acc, nan))
            else:
                train, test = (nan, nan), (nan, nan)
            lr_now = hp["lr"] if (f := schedule.factor(step)) is None else hp["lr"] * f
            if len(live) == P:
                recorder.record(step, mask, params, grads, opt, train=train, test=test, batch_loss=batch_loss,
                                lr=lr_now, buffers=buffers)
            else:  # some members stopped: the recorder sees all P (the others masked out)
                recorder.record(step, full(mask, False), {n: full(v) for n, v in params.items()},
                                {n: full(v) for n, v in grads.items()}, opt,
                                train=tuple(full(t, math.nan) for t in train), test=tuple(full(t, math.nan) for t in test),
                                batch_loss=full(batch_loss, math.nan), lr=full(lr_now, math.nan),
                                buffers={n: full(v) for n, v in buffers.items()})
        if clipping:  # torch.nn.utils.clip_grad_norm_ per member, after recording the unclipped norm
            _, coef = clip_coefficients(grads, clip)
            grads = {k: g * coef.reshape((-1,) + (1,) * (g.dim() - 1)) for k, g in grads.items()}
        if per_step:  # per-step trackers (symmetry); diverging members included
            if len(live) == P:
                recorder.on_step(step, params, grads, active)
            else:
                recorder.on_step(step, {n: full(v) for n, v in params.items()}, {n: full(v) for n, v in grads.items()},
                                 full(active, False))
        for i in np.flatnonzero(newly_host).tolist():
            r = results[live[i]]
            r.status, r.diverged_step, r.steps_done = "diverged", step, step
        if any_new:
            active &= ~newly
            alive &= ~newly_host
        if step in rungs and alive.any():  # successive halving among the members still training
            metric = {"train_loss": tr_loss, "train_acc": tr_acc, "test_loss": te_loss, "test_acc": te_acc}[es["metric"]]
            values = metric.double().cpu().numpy()
            stop = successive_halving(values, groups[live], alive, int(es["eta"]), es["mode"])
            if prune is not None and len(stop) < alive.sum():  # then the searcher's verdict on the rest
                rest = values[alive & ~np.isin(np.arange(len(alive)), stop)]
                if prune(step, float(rest.mean()) if np.isfinite(rest).all() else math.nan):
                    stop = np.flatnonzero(alive)
            for i in stop.tolist():
                r = results[live[i]]
                r.status, r.steps_done = "stopped", step
            if len(stop):
                alive[stop] = False
                active[torch.as_tensor(stop, device=dev)] = False
        if record_now and on_record is not None:
            on_record(step, int(alive.sum()), sum(r.status == "diverged" for r in results))
        if not alive.any() or step == steps:
            break
        if es and not alive.all():  # drop stopped and diverged members: they cost nothing from here on
            keep = np.flatnonzero(alive)
            compact(keep)
            k = torch.as_tensor(keep, dtype=torch.long, device=dev)
            grads = {n: g.index_select(0, k) for n, g in grads.items()}
            alive = alive[keep].copy()
        opt.step(params, grads, active, schedule.factor(step), all_active=bool(alive.all()))
        if any_constrained:
            renormalise(params, target_norm, constrained & active)
        if per_step:
            recorder.after_update(step, opt if len(live) == P else _FullOpt(opt, full))

    for i, r in enumerate(results):
        r.extra["vectorised"] = fns.vectorised
        if r.status == "completed":
            r.steps_done = steps
    return PopulationResult(results, recorder, before + time.perf_counter() - t0)
