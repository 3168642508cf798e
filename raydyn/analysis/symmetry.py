"""Symmetry groups of a network and their broken conservation laws.

After Kunin, Sagastuy-Brena, Ganguli, Yamins & Tanaka, "Neural Mechanics:
Symmetry and Broken Conservation Laws in Deep Learning Dynamics", ICLR 2021
(arXiv:2012.04728). Written from the paper's statements; the authors' code
(github.com/danielkunin/neural-mechanics, ``metrics/{translation,scale,rescale}.py``
and ``optimizers/custom_sgd.py``) was read only to cross-check the time scale,
the damping constants and the integrands of the continuous laws.

Three symmetries (paper Sec. 3, "Symmetry and geometry"):

``translation``
    The loss is invariant under adding the same constant to every logit of a
    softmax cross-entropy. For the final linear layer ``z = W h + b`` this means
    ``W[:, j] -> W[:, j] + c`` (one group per input column ``j``) and
    ``b -> b + c`` (one group, the whole bias). The gradient is orthogonal to
    the all-ones vector of the group, so ``M = sum(theta_A)`` is conserved under
    gradient flow.
``scale``
    A linear / conv layer directly followed by batch norm (batch statistics,
    eps -> 0) is invariant under ``theta_c -> a theta_c`` (``a > 0``) for each
    output channel's incoming filter and bias. The gradient is orthogonal to
    ``theta_c``, so ``N = |theta_c|^2`` is conserved under gradient flow.
``rescale``
    A positively homogeneous activation (ReLU, LeakyReLU, identity, and the
    linear/max pools and dropout that commute with per-channel positive
    scaling) between layer ``l`` and ``l+1``: unit ``c``'s incoming weights
    and bias times ``a`` and its outgoing weights times ``1/a`` leave the loss
    unchanged, so ``<theta_in, g_in> = <theta_out, g_out>`` and
    ``D = |theta_out|^2 - |theta_in|^2`` is conserved under gradient flow.

Weight decay, momentum and the finite learning rate break these laws. This
module gives, for ``torch.optim.SGD``:

* ``method="exact"``: the exact discrete law of the PyTorch update (below),
  which reproduces recorded values to rounding error;
* ``method="continuous"``: the paper's modified-gradient-flow solution (Sec. 5
  "A realistic continuous model for SGD", Sec. 6 "Combining symmetry and
  modified gradient flow to derive exact learning dynamics", and the momentum
  derivation in its appendix). Equation numbers of the paper could not be
  verified from the sources available when this was written, so sections are
  cited instead.

Conventions used throughout:

* ``eta`` learning rate, ``lam`` weight decay, ``beta`` momentum, ``d``
  dampening; ``k = 0, 1, ...`` counts optimiser steps, and step ``k`` maps
  parameters ``theta_k`` to ``theta_{k+1}``.
* ``sq_norms[k]`` (length ``steps``) is the group's squared norm, at step
  ``k``, of the *loss gradient* ``g_k`` (plain SGD, ``momentum == 0``) or of the
  PyTorch *momentum buffer after the step* ``b_{k+1}`` (momentum > 0; this
  buffer includes weight decay). For ``rescale`` it is the outgoing group's
  squared norm minus the incoming group's. :func:`group_sq_norms` computes it
  from a name -> tensor dict in exactly this convention.
* Step 0 must be the optimiser's first step (empty momentum buffer).

Only plain ``torch.optim.SGD`` updates (with or without heavy-ball momentum, dampening and
weight decay) at one constant learning rate have these laws. :func:`predict` refuses Adam /
AdamW and Nesterov, and :func:`law_refusal` names, from a run's config, every other setting
without an exact law: ``fixed_norm`` (all parameters rescaled together after each step), a
learning-rate schedule or warm-up (a different eta every step), gradient-norm clipping (the
gradient rescaled by a data-dependent factor). :func:`layer_hyperparameters` gives each group
its own param group's lr / weight decay (``embed_lr`` / ``embed_weight_decay`` for parameters
named ``embed*``) and refuses a group whose members train with different ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
import torch
from scipy.signal import lfilter
from scipy.special import exprel
from torch import nn

__all__ = [
    "KINDS",
    "Member",
    "SymmetryGroup",
    "LawTrace",
    "find_groups",
    "quantities",
    "group_sq_norms",
    "residuals",
    "predict",
    "relative_error",
    "traces",
    "param_dict",
    "grad_dict",
    "buffer_dict",
    "OPTIMIZERS",
    "law_refusal",
    "layer_hyperparameters",
]

OPTIMIZERS: tuple[str, ...] = ("sgd",)
"""Optimisers with exact and continuous laws here (torch.optim.SGD, heavy-ball momentum, no Nesterov)."""

KINDS: tuple[str, ...] = ("translation", "scale", "rescale")
LOSSES: tuple[str, ...] = ("cross_entropy", "mse", "other")
METHODS: tuple[str, ...] = ("exact", "continuous")

# Leaves that act on each unit/channel separately and commute with multiplying
# a unit by a positive constant (positively homogeneous of degree 1).
_HOMOGENEOUS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
)
# Leaves that may sit between a layer and its batch norm (linear per channel).
_PASS_TO_BN = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
# Leaves that may follow the final linear layer without breaking translation.
_PASS_TO_LOSS = (nn.Identity, nn.Dropout, nn.Flatten)
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass(frozen=True)
class Member:
    """One parameter slice of a symmetry group.

    The slice is ``tensor[(slice(None),) * axis + (slice(start, stop),)]``
    (all of every other axis). ``sign`` is +1, or -1 for the incoming side of a
    rescale group (D = |out|^2 - |in|^2). ``shape`` is the parameter's shape.
    """

    param: str
    axis: int
    start: int
    stop: int
    sign: int
    shape: tuple[int, ...]

    @property
    def index(self) -> tuple[slice, ...]:
        """Index tuple selecting this member from an unbatched tensor."""
        return (slice(None),) * self.axis + (slice(self.start, self.stop),)


@dataclass(frozen=True)
class SymmetryGroup:
    """A set of parameters with one symmetry.

    kind:    "translation", "scale" or "rescale".
    layer:   name of the module that owns the group (translation, scale) or
             of the module that produces the hidden unit (rescale, incoming side).
    unit:    input column j (translation; -1 for the bias group), output
             channel c (scale), hidden unit c (rescale).
    members: the parameter slices; see :class:`Member`.
    """

    kind: str
    layer: str
    unit: int
    members: tuple[Member, ...]


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Leaf modules in registration order (= execution order for Sequential)."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        children = list(mod.named_children())
        if not children:
            out.append((prefix, mod))
            return
        if any(True for _ in mod.named_parameters(recurse=False)):
            # A container with parameters of its own: opaque, keeps chains apart.
            out.append((prefix, mod))
            return
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def _pname(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _n_out(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.out_features
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return mod.out_channels
    if isinstance(mod, _BATCHNORMS):
        return mod.num_features
    raise TypeError(type(mod).__name__)


def _incoming(name: str, mod: nn.Module, c: int) -> list[Member]:
    ms = [Member(_pname(name, "weight"), 0, c, c + 1, -1, tuple(mod.weight.shape))]
    if getattr(mod, "bias", None) is not None:
        ms.append(Member(_pname(name, "bias"), 0, c, c + 1, -1, tuple(mod.bias.shape)))
    return ms


def find_groups(model: nn.Module, loss: str = "cross_entropy") -> list[SymmetryGroup]:
    """Detect the translation, scale and rescale groups of ``model``.

    The model is read as a chain of leaf modules in registration order
    (nested ``nn.Sequential`` is flattened); supported parameter leaves are
    ``nn.Linear``, ``nn.Conv1d/2d`` and ``nn.BatchNorm1d/2d``. Any other leaf
    (e.g. ``Tanh``, ``LayerNorm``) breaks the chain at that point.

    * translation: only if ``loss == "cross_entropy"`` and the last parameter
      leaf is an ``nn.Linear`` followed only by Identity/Dropout/Flatten.
      One group per input column ``j`` (W[:, j]) plus one for the bias.
    * scale: each ``Linear``/``Conv`` whose output goes (through
      Identity/Dropout only) into a ``BatchNorm`` over the same channels; one
      group per output channel c = (W[c], b[c]). Requires batch statistics
      (train mode) and eps -> 0 for the symmetry to be exact.
    * rescale: each producer (``Linear``/``Conv``, or an affine ``BatchNorm``)
      whose output reaches the next ``Linear``/``Conv`` through positively
      homogeneous leaves only (ReLU, LeakyReLU, Identity, Dropout, max/avg
      pools, Flatten). One group per hidden unit c: incoming = producer's
      weight[c] (and bias[c]), outgoing = consumer's weight[:, c] (for a
      ``Flatten`` into a ``Linear``, the block of ``in_features / C`` columns
      of channel c). Grouped convolutions as consumers are skipped.

    Returns groups ordered translation, scale, rescale, then by layer and unit.
    Raises ValueError on an unknown ``loss``.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    leaves = _leaves(model)
    groups: list[SymmetryGroup] = []

    # translation: the final linear layer before softmax cross-entropy
    if loss == "cross_entropy":
        last = max(
            (i for i, (_, m) in enumerate(leaves) if any(True for _ in m.parameters())),
            default=None,
        )
        if last is not None:
            name, mod = leaves[last]
            tail_ok = all(isinstance(m, _PASS_TO_LOSS) for _, m in leaves[last + 1 :])
            if isinstance(mod, nn.Linear) and tail_ok:
                wname, wshape = _pname(name, "weight"), tuple(mod.weight.shape)
                for j in range(mod.in_features):
                    groups.append(
                        SymmetryGroup("translation", name, j, (Member(wname, 1, j, j + 1, 1, wshape),))
                    )
                if mod.bias is not None:
                    n = mod.out_features
                    groups.append(
                        SymmetryGroup(
                            "translation", name, -1,
                            (Member(_pname(name, "bias"), 0, 0, n, 1, (n,)),),
                        )
                    )

    # scale: layer directly followed by batch norm
    for i, (name, mod) in enumerate(leaves):
        if not isinstance(mod, _LAYERS):
            continue
        k = i + 1
        while k < len(leaves) and isinstance(leaves[k][1], _PASS_TO_BN):
            k += 1
        if k < len(leaves) and isinstance(leaves[k][1], _BATCHNORMS):
            if leaves[k][1].num_features != _n_out(mod):
                continue
            for c in range(_n_out(mod)):
                ms = tuple(
                    Member(m.param, 0, c, c + 1, 1, m.shape) for m in _incoming(name, mod, c)
                )
                groups.append(SymmetryGroup("scale", name, c, ms))

    # rescale: producer -> homogeneous leaves -> consumer
    for i, (name, mod) in enumerate(leaves):
        if isinstance(mod, _BATCHNORMS):
            if not mod.affine:
                continue
        elif not isinstance(mod, _LAYERS):
            continue
        k = i + 1
        flattened = False
        while k < len(leaves) and isinstance(leaves[k][1], _HOMOGENEOUS):
            flattened |= isinstance(leaves[k][1], nn.Flatten)
            k += 1
        if k >= len(leaves) or not isinstance(leaves[k][1], _LAYERS):
            continue
        cname, cons = leaves[k]
        n_units = _n_out(mod)
        if isinstance(cons, nn.Linear):
            width = cons.in_features
        else:
            if cons.groups != 1:
                continue
            width = cons.in_channels
        if width % n_units != 0 or (width != n_units and not flattened):
            continue
        block = width // n_units
        wname, wshape = _pname(cname, "weight"), tuple(cons.weight.shape)
        for c in range(n_units):
            out = Member(wname, 1, c * block, (c + 1) * block, 1, wshape)
            groups.append(SymmetryGroup("rescale", name, c, (out, *_incoming(name, mod, c))))
    return groups


# --------------------------------------------------------------------------
# quantities from name -> tensor dicts
# --------------------------------------------------------------------------


def _as_array(x: object, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"tensor for parameter {name!r} is None (no gradient/buffer?)")
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


@lru_cache(maxsize=64)
def _plan(groups: tuple[SymmetryGroup, ...]) -> dict:
    """Index plan: for each (param, axis), arrays of group index, start, stop, sign."""
    plan: dict[tuple[str, int], list[list[int]]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for gi, g in enumerate(groups):
        for m in g.members:
            shapes.setdefault(m.param, m.shape)
            plan.setdefault((m.param, m.axis), [[], [], [], []])
            for lst, v in zip(plan[(m.param, m.axis)], (gi, m.start, m.stop, m.sign)):
                lst.append(v)
    return {
        "keys": {k: tuple(np.asarray(v, dtype=np.int64) for v in vs) for k, vs in plan.items()},
        "shapes": shapes,
    }


def _evaluate(
    groups: Sequence[SymmetryGroup], tensors: Mapping[str, object], square: bool
) -> dict[str, np.ndarray]:
    groups = tuple(groups)
    if not groups:
        return {}
    for g in groups:
        if not isinstance(g, SymmetryGroup):
            raise ValueError(f"groups must be SymmetryGroup objects, got {type(g).__name__}")
    plan = _plan(groups)
    batch: tuple[int, ...] | None = None
    arrays: dict[str, np.ndarray] = {}
    for pname, shape in plan["shapes"].items():
        if pname not in tensors:
            raise ValueError(f"no tensor named {pname!r}; got names {sorted(tensors)[:10]}...")
        a = _as_array(tensors[pname], pname)
        if a.shape == shape:
            b: tuple[int, ...] = ()
        elif a.ndim == len(shape) + 1 and a.shape[1:] == shape:
            b = a.shape[:1]
        else:
            raise ValueError(
                f"tensor {pname!r} has shape {a.shape}; expected {shape} or (P, *{shape})"
            )
        if batch is None:
            batch = b
        elif b != batch:
            raise ValueError(
                f"tensor {pname!r} has population shape {b}, others have {batch}; "
                "batch all tensors or none"
            )
        arrays[pname] = a
    assert batch is not None
    nb = len(batch)
    out = np.zeros((len(groups), *batch))
    for (pname, axis), (gi, start, stop, sign) in plan["keys"].items():
        a = arrays[pname]
        a = a * a if square else a
        a = np.moveaxis(a, nb + axis, -1)
        per_unit = a.reshape(*batch, -1, a.shape[-1]).sum(axis=-2)  # (*batch, units)
        cs = np.concatenate([np.zeros((*batch, 1)), np.cumsum(per_unit, axis=-1)], axis=-1)
        vals = cs[..., stop] - cs[..., start]  # (*batch, n)
        np.add.at(out, gi, np.moveaxis(vals, -1, 0) * sign.reshape((-1,) + (1,) * nb))
    kinds = np.array([g.kind for g in groups])
    return {
        k: np.moveaxis(out[kinds == k], 0, -1) for k in KINDS if np.any(kinds == k)
    }


def quantities(
    groups: Sequence[SymmetryGroup], params: Mapping[str, object]
) -> dict[str, np.ndarray]:
    """The conserved-under-gradient-flow quantity of every group.

    params: name -> tensor (torch or numpy), shaped like the model's parameter
        or (P, *shape) for a population of P models (all or none batched).
    Returns kind -> float64 array of shape (n_kind,) or (P, n_kind), columns in
    the order of ``[g for g in groups if g.kind == kind]``:
    translation M = sum(theta_A); scale N = |theta_A|^2;
    rescale D = |W_{l+1}[:, c]|^2 - |W_l[c]|^2 - b_l[c]^2.
    """
    groups = tuple(groups)
    lin = tuple(g for g in groups if g.kind == "translation")
    sq = tuple(g for g in groups if g.kind != "translation")
    res = _evaluate(lin, params, square=False)
    res.update(_evaluate(sq, params, square=True))
    return {k: res[k] for k in KINDS if k in res}


def group_sq_norms(
    groups: Sequence[SymmetryGroup], tensors: Mapping[str, object]
) -> dict[str, np.ndarray]:
    """Squared norm of each group's slice of a gradient or momentum-buffer dict.

    Same layout as :func:`quantities`. For rescale groups the value is the
    outgoing slice's squared norm minus the incoming slices' (the ``sq_norms``
    convention of :func:`predict`).
    """
    return _evaluate(tuple(groups), tensors, square=True)


def residuals(
    groups: Sequence[SymmetryGroup],
    params: Mapping[str, object],
    grads: Mapping[str, object],
) -> dict[str, np.ndarray]:
    """How far each group's gradient identity is from holding (0 when exact).

    translation: sum of the group's gradient entries (Sigma_k dL/dW[k, j]);
    scale: <theta_A, g_A>; rescale: <theta_out, g_out> - <theta_in, g_in>.
    Same layout as :func:`quantities`. Compare against |theta| |g| to judge.
    """
    groups = tuple(groups)
    lin = tuple(g for g in groups if g.kind == "translation")
    rest = tuple(g for g in groups if g.kind != "translation")
    res = _evaluate(lin, grads, square=False)
    names = {m.param for g in rest for m in g.members}
    prods = {}
    for n in names:
        if n not in params or n not in grads:
            raise ValueError(f"parameter {n!r} missing from params or grads")
        a, b = _as_array(params[n], n), _as_array(grads[n], n)
        if a.shape != b.shape:
            raise ValueError(f"{n!r}: params shape {a.shape} != grads shape {b.shape}")
        prods[n] = a * b
    res.update(_evaluate(rest, prods, square=False))
    return {k: res[k] for k in KINDS if k in res}


def param_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> detached parameter tensor."""
    return {n: p.detach() for n, p in model.named_parameters()}


def grad_dict(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """name -> gradient (None where there is none)."""
    return {n: (None if p.grad is None else p.grad.detach()) for n, p in model.named_parameters()}


def buffer_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor | None]:
    """name -> ``torch.optim.SGD`` momentum buffer (None before the first step)."""
    return {
        n: optimizer.state.get(p, {}).get("momentum_buffer") for n, p in model.named_parameters()
    }


# --------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------


def law_refusal(cfg: Mapping[str, object]) -> str | None:
    """Why a run trained with config ``cfg`` has no exact symmetry law, or None when it has one.

    Reads ``optimizer``, ``nesterov``, ``fixed_norm``, ``schedule`` (constant when absent),
    ``warmup_steps`` (0 when absent) and ``clip_grad_norm`` (None when absent), so configs of
    runs trained before a setting existed are read as not using it.
    """
    if not isinstance(cfg, Mapping):
        raise ValueError(f"cfg must be a run config mapping, got {type(cfg).__name__}")
    reasons = []
    opt = str(cfg.get("optimizer", "sgd"))
    if opt not in OPTIMIZERS:
        reasons.append(f"optimizer {opt!r} (the laws cover SGD with or without momentum)")
    if cfg.get("nesterov"):
        reasons.append("Nesterov momentum")
    if cfg.get("fixed_norm") is not None:
        reasons.append(f"fixed_norm={cfg['fixed_norm']} (every step rescales all parameters together to a fixed "
                       "total norm, which no per-group law tracks)")
    schedule = cfg.get("schedule", "constant") or "constant"
    if schedule != "constant":
        reasons.append(f"schedule={schedule!r} (the laws assume one learning rate at every step)")
    warmup = cfg.get("warmup_steps", 0) or 0
    if float(warmup) > 0:
        reasons.append(f"warmup_steps={warmup} (the learning rate changes during warm-up)")
    if cfg.get("clip_grad_norm") is not None:
        reasons.append(f"clip_grad_norm={cfg['clip_grad_norm']} (clipping rescales the gradient by a "
                       "data-dependent factor)")
    return "; ".join(reasons) if reasons else None


def layer_hyperparameters(
    groups: Sequence[SymmetryGroup], cfg: Mapping[str, object], lr: float, weight_decay: float,
    embed_prefix: str = "embed",
) -> dict[tuple[str, str], tuple[float, float] | str]:
    """(kind, layer) -> the (lr, weight decay) its groups train with, or why there is none.

    ``lr`` / ``weight_decay`` are the run's (as trained); parameters whose names start with
    ``embed_prefix`` train with ``cfg['embed_lr']`` / ``cfg['embed_weight_decay']`` when set
    (raydyn's second param group). A group whose members fall in both param groups with
    different hyperparameters has no single law: its entry is the reason (a string).
    """
    base = (float(lr), float(weight_decay))
    embed = (float(cfg["embed_lr"]) if cfg.get("embed_lr") is not None else base[0],
             float(cfg["embed_weight_decay"]) if cfg.get("embed_weight_decay") is not None else base[1])
    seen: dict[tuple[str, str], set[tuple[float, float]]] = {}
    for g in groups:
        for m in g.members:
            seen.setdefault((g.kind, g.layer), set()).add(embed if m.param.startswith(embed_prefix) else base)
    out: dict[tuple[str, str], tuple[float, float] | str] = {}
    for key, hps in seen.items():
        out[key] = next(iter(hps)) if len(hps) == 1 else (
            f"{key[0]} groups of layer {key[1]} mix parameters of two param groups (embed_lr/embed_weight_decay "
            f"{embed[0]:g}/{embed[1]:g} vs lr/weight_decay {base[0]:g}/{base[1]:g}); a law needs one")
    return out


def _check_hparams(
    kind: str, steps: int, lr: float, weight_decay: float, momentum: float,
    method: str, dampening: float,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be finite and > 0, got {lr!r}")
    if not np.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be finite and >= 0, got {weight_decay!r}")
    if not (0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not (0.0 <= dampening < 1.0):
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")


def _oscillator_step(gamma: float, omega2: float, h: float) -> tuple[float, float, float, float, float, float]:
    """One step h of x'' + 2 gamma x' + omega2 x = F (F constant on the step).

    Returns (y1, G, dy1, dG, intG, G_for_v) such that
    x(h) = y1 x0 + G v0 + F intG,  v(h) = dy1 x0 + dG v0 + F G,
    with y1 the solution from (1, 0), G the Green's function (solution from
    (0, 1)), under-, critically or over-damped closed forms.
    """
    omega = np.sqrt(omega2)
    e = np.exp(-gamma * h)
    if omega2 > 0 and abs(gamma - omega) <= 1e-7 * max(gamma, omega):  # critical
        G = h * e
        dG = e * (1.0 - gamma * h)
        y1 = e * (1.0 + gamma * h)
        intG = (1.0 - y1) / omega2
    elif gamma < omega:  # underdamped
        mu = np.sqrt(omega2 - gamma**2)
        s, c = np.sin(mu * h), np.cos(mu * h)
        G = e * s / mu
        dG = e * (c - gamma * s / mu)
        y1 = e * (c + gamma * s / mu)
        intG = (mu - e * (gamma * s + mu * c)) / (mu * (gamma**2 + mu**2))
    else:  # overdamped (includes omega = 0)
        r = np.sqrt(gamma**2 - omega2)
        ap, am = -gamma + r, -gamma - r
        ep, em = np.exp(ap * h), np.exp(am * h)
        G = (ep - em) / (2 * r)
        dG = (ap * ep - am * em) / (2 * r)
        y1 = ((gamma + r) * ep - (gamma - r) * em) / (2 * r)
        intG = h * (exprel(ap * h) - exprel(am * h)) / (2 * r)
    dy1 = -omega2 * G
    return y1, G, dy1, dG, intG, G


def predict(
    kind: str,
    q0: object,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    sq_norms: object | None = None,
    method: str = "exact",
    dampening: float = 0.0,
    optimizer: str = "sgd",
    nesterov: bool = False,
) -> np.ndarray:
    r"""Predicted quantity at steps 0..steps under ``torch.optim.SGD``.

    Parameters
    ----------
    kind: "translation" (M), "scale" (N) or "rescale" (D).
    q0: the quantity at step 0, any shape S (e.g. (G,) or (P, G)).
    steps: number of optimiser steps.
    lr, weight_decay, momentum, dampening: the SGD hyperparameters
        (eta, lam, beta, d); PyTorch ignores dampening when momentum == 0.
    sq_norms: shape (steps, *S) (broadcastable), required for scale/rescale,
        ignored for translation: the group's squared norm of the loss gradient
        g_k (momentum == 0) or of the momentum buffer after step k, b_{k+1}
        (momentum > 0); for rescale outgoing minus incoming.
    method: "exact" or "continuous".
    optimizer, nesterov: the run's optimiser; anything but "sgd" without Nesterov is refused
        (ValueError): there is no law for it here.

    Returns float64 array of shape (steps + 1, *S).

    Exact discrete laws (method="exact")
    ------------------------------------
    Plain SGD: theta_{k+1} = (1 - eta lam) theta_k - eta g_k.

    * translation: sum(g_k) over the group is 0, so M_{k+1} = (1 - eta lam) M_k.
    * scale: <theta_k, g_k> = 0, so N_{k+1} = (1 - eta lam)^2 N_k + eta^2 |g_k|^2.
    * rescale: <theta_out, g_out> = <theta_in, g_in> cancels the cross terms,
      so D_{k+1} = (1 - eta lam)^2 D_k + eta^2 (|g_out,k|^2 - |g_in,k|^2).

    Momentum (PyTorch): f_k = g_k + lam theta_k; b_1 = f_0 (first step has no
    dampening); b_{k+1} = beta b_k + (1 - d) f_k for k >= 1;
    theta_{k+1} = theta_k - eta b_{k+1}.

    * translation: with v_k = sum(b_k) over the group, sum(g_k) = 0 gives the
      linear two-term recursion v_1 = lam M_0, v_{k+1} = beta v_k + (1-d) lam M_k,
      M_{k+1} = M_k - eta v_{k+1}.
    * scale: N_{k+1} = |theta_k - eta b_{k+1}|^2 = N_k - 2 eta a_{k+1} + eta^2 s_k
      with s_k = |b_{k+1}|^2 (recorded) and the auxiliary state
      a_{k+1} = <theta_k, b_{k+1}>. Using <theta_k, g_k> = 0,
      a_{k+1} = beta <theta_k, b_k> + (1-d) lam N_k, and
      <theta_k, b_k> = <theta_{k-1} - eta b_k, b_k> = a_k - eta s_{k-1}; so
      a_1 = lam N_0 and a_{k+1} = beta (a_k - eta s_{k-1}) + (1-d) lam N_k.
      The recursion needs only N_0, the hyperparameters and the s_k.
    * rescale: the same recursion for the differences D, a = <theta_out, b_out>
      - <theta_in, b_in> and s = |b_out|^2 - |b_in|^2, because the gradient
      inner products cancel (<theta_out, g_out> = <theta_in, g_in>).

    Continuous laws (method="continuous"; paper Secs. 5-6)
    -----------------------------------------------------
    Plain SGD, time t = eta k (modified gradient flow, paper Sec. 6):

    * translation: M(t) = e^{-lam t} M(0);
    * scale: N(t) = e^{-2 lam t} N(0) + eta \int_0^t e^{-2 lam (t - tau)} |g(tau)|^2 dtau;
    * rescale: the same with |g_out|^2 - |g_in|^2.

    Momentum, time t = h k with h = eta (1 - d): the heavy-ball update is a
    finite-difference scheme for the modified equation
    (h (1 + beta) / 2) theta'' + (1 - beta) theta' = -(g + lam theta) (paper
    Sec. 5, momentum as a damped particle), so each quantity obeys a damped
    driven harmonic oscillator x'' + 2 gamma x' + omega^2 x = F(t) with
    gamma = (1 - beta) / (h (1 + beta)) and

    * translation: omega^2 = 2 lam / (h (1 + beta)), F = 0;
    * scale / rescale: omega^2 = 4 lam / (h (1 + beta)), F = 2 |theta'|^2 with
      |theta'|^2 = |b|^2 / (1 - d)^2 (theta' = -eta b / h), i.e. F_k = 2 s_k / (1-d)^2;

    started at rest, x(0) = q0, x'(0) = 0 (as in the paper and its reference
    code). The solution is x(t) = y1(t) x(0) + \int_0^t G(t - tau) F(tau) dtau
    with the under- (gamma < omega), critically (gamma = omega) or over-damped
    (gamma > omega) homogeneous solution y1 and Green's function G. The integral
    is evaluated with F held constant over each step, propagated exactly step
    by step (so it is stable over long runs; the reference code instead
    accumulates e^{+gamma t}-weighted sums, which overflow).

    The continuous laws are O(eta)-accurate approximations of the discrete ones.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"no symmetry law for optimizer {optimizer!r}: the exact and continuous laws cover "
                         "torch.optim.SGD (with or without momentum) only")
    if nesterov:
        raise ValueError("no symmetry law for Nesterov momentum: the laws cover heavy-ball SGD only")
    _check_hparams(kind, steps, lr, weight_decay, momentum, method, dampening)
    q0 = np.asarray(q0, dtype=np.float64)
    if not np.all(np.isfinite(q0)):
        raise ValueError("q0 must be finite")
    s: np.ndarray | None = None
    if kind != "translation":
        if sq_norms is None:
            raise ValueError(f"sq_norms (shape (steps, *q0.shape)) is required for kind={kind!r}")
        s = np.asarray(sq_norms, dtype=np.float64)
        if s.ndim == 0 or s.shape[0] != steps:
            raise ValueError(
                f"sq_norms must have shape (steps={steps}, *{q0.shape}), got {s.shape}"
            )
        try:
            s = np.broadcast_to(s, (steps, *q0.shape))
        except ValueError:
            raise ValueError(
                f"sq_norms shape {s.shape} does not broadcast to (steps, *q0.shape) = "
                f"{(steps, *q0.shape)}"
            ) from None
    eta, lam, beta, d = float(lr), float(weight_decay), float(momentum), float(dampening)
    out = np.empty((steps + 1, *q0.shape))
    out[0] = q0
    if steps == 0:
        return out

    if method == "exact":
        if beta == 0.0:
            c = 1.0 - eta * lam
            if kind == "translation":
                for k in range(steps):
                    out[k + 1] = c * out[k]
            else:
                # x_{k+1} = c^2 x_k + eta^2 s_k, as a first-order IIR filter
                zi = (c * c * q0)[None]
                y, _ = lfilter([eta * eta], [1.0, -c * c], s, axis=0, zi=zi)
                out[1:] = y
            return out
        if kind == "translation":
            v = lam * q0
            out[1] = q0 - eta * v
            for k in range(1, steps):
                v = beta * v + (1 - d) * lam * out[k]
                out[k + 1] = out[k] - eta * v
            return out
        assert s is not None
        a = lam * q0
        out[1] = q0 - 2 * eta * a + eta * eta * s[0]
        for k in range(1, steps):
            a = beta * (a - eta * s[k - 1]) + (1 - d) * lam * out[k]
            out[k + 1] = out[k] - 2 * eta * a + eta * eta * s[k]
        return out

    # continuous
    if beta == 0.0:
        t = eta * np.arange(steps + 1).reshape((-1,) + (1,) * q0.ndim)
        if kind == "translation":
            out[:] = np.exp(-lam * t) * q0
            return out
        # x' = -2 lam x + eta |g|^2 with |g|^2 constant over each step of length eta
        decay = np.exp(-2 * lam * eta)
        gain = eta * eta * exprel(-2 * lam * eta)  # eta * int_0^eta e^{-2 lam u} du
        zi = (decay * q0)[None]
        y, _ = lfilter([gain], [1.0, -decay], s, axis=0, zi=zi)
        out[1:] = y
        return out
    h = eta * (1 - d)
    gamma = (1 - beta) / (h * (1 + beta))
    omega2 = (2.0 if kind == "translation" else 4.0) * lam / (h * (1 + beta))
    y1, G, dy1, dG, intG, _ = _oscillator_step(gamma, omega2, h)
    x = q0.copy()
    v = np.zeros_like(q0)
    for k in range(steps):
        F = 0.0 if s is None else 2.0 * s[k] / (1 - d) ** 2
        x, v = y1 * x + G * v + F * intG, dy1 * x + dG * v + F * G
        out[k + 1] = x
    return out


def relative_error(pred: object, recorded: object) -> np.ndarray:
    """Normalised sup error of a predicted trajectory, per series.

    pred, recorded: arrays of shape (T, *S) (time first).
    Returns shape S: max_k |pred_k - recorded_k| / max_k |recorded_k|
    (a series that is identically 0 is normalised by 1 instead). This stays
    meaningful for quantities that cross zero (translation sums, rescale D).
    """
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(recorded, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"pred shape {p.shape} != recorded shape {r.shape}")
    if p.ndim == 0 or p.shape[0] == 0:
        raise ValueError("pred/recorded need a leading time axis of length >= 1")
    scale = np.max(np.abs(r), axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    return np.max(np.abs(p - r), axis=0) / scale


@dataclass(frozen=True)
class LawTrace:
    """Measured and predicted trajectories of one layer's groups of one kind.

    steps: (T,) step numbers; measured, predicted: (T, U) for the U groups
    (units) of ``layer``; units: (U,) unit index of each column.
    """

    kind: str
    layer: str
    steps: np.ndarray
    measured: np.ndarray
    predicted: np.ndarray
    units: np.ndarray

    @property
    def relative_error(self) -> np.ndarray:
        """(U,) normalised sup error per unit, see :func:`relative_error`."""
        return relative_error(self.predicted, self.measured)


def traces(
    groups: Sequence[SymmetryGroup],
    measured: Mapping[str, object],
    predicted: Mapping[str, object],
    steps: object | None = None,
) -> list[LawTrace]:
    """Split kind -> (T, n_kind) trajectories into one :class:`LawTrace` per layer.

    measured / predicted: kind -> array (T, n_kind), columns ordered as in
    :func:`quantities` (unbatched). steps defaults to arange(T).
    """
    out: list[LawTrace] = []
    for kind in KINDS:
        if kind not in measured:
            continue
        if kind not in predicted:
            raise ValueError(f"predicted lacks kind {kind!r} present in measured")
        m = np.asarray(measured[kind], dtype=np.float64)
        p = np.asarray(predicted[kind], dtype=np.float64)
        kg = [g for g in groups if g.kind == kind]
        if m.ndim != 2 or m.shape != p.shape or m.shape[1] != len(kg):
            raise ValueError(
                f"{kind}: measured {m.shape} and predicted {p.shape} must both be "
                f"(T, {len(kg)})"
            )
        st = np.arange(m.shape[0]) if steps is None else np.asarray(steps)
        if st.shape != (m.shape[0],):
            raise ValueError(f"steps must have shape ({m.shape[0]},), got {st.shape}")
        layers = list(dict.fromkeys(g.layer for g in kg))
        for layer in layers:
            cols = np.array([i for i, g in enumerate(kg) if g.layer == layer])
            out.append(
                LawTrace(kind, layer, st, m[:, cols], p[:, cols],
                         np.array([kg[i].unit for i in cols]))
            )
    return out
