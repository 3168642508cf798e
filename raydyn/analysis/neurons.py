"""Neuron transformation modes, linearity probes and attraction basins.

After Lin, Feng, Zhang & Zhao, "Network Dynamics-Based Framework for Understanding Deep
Neural Networks" (arXiv:2501.02436, 2025), who classify neurons by whether their
transformation of the samples is *order-preserving* (OPT) or *non-order-preserving* (NPT),
and relate the mix of modes across layers, and the sizes of attraction basins in sample and
weight space, to learning phases. No code was published with that paper: **every definition
below is raydyn's own operationalisation** of its description, chosen to be precise, cheap
and testable, and may differ from the authors' in the details listed.

Modes (on a fixed reference subset of training inputs)
    Each activation function f is strictly increasing on an open interval (lo, hi) -- its
    *order-preserving range* -- and not beyond it: ReLU (0, inf); ReLU6 (0, 6); LeakyReLU,
    PReLU and RReLU with a positive slope, ELU, CELU, SELU and Softplus everywhere
    (-inf, inf); the non-monotone GELU (x > -0.7518; tanh form -0.7525), SiLU (x > -1.2785),
    Mish (x > -1.1924) and Hardswish (x > -1.5) above their minimum. A neuron is

    * OPT: every reference event's pre-activation lies in the range, so the neuron maps the
      events in a strictly order-preserving way (for ReLU: it acts linearly on all of them);
    * NPT: some events lie in the range and some outside (for ReLU: some are cut to 0, their
      order lost);
    * dead: no event lies in the range (for ReLU: inactive everywhere). The paper's NPT is
      raydyn's NPT plus dead.

    So a LeakyReLU or ELU neuron is always OPT (those functions preserve order everywhere).
    For a dense layer an event is a sample. Neurons are the channel axis of the activation's
    input: the last axis when that input comes straight from an ``nn.Linear`` (e.g. a
    transformer MLP's (N, S, C): an event is a (sample, position) pair), else axis 1
    (PyTorch's (N, C, *spatial) convolution layout: an event is a (sample, position) pair).

Linearity probe
    For one activation module at a time, replace it by the identity (forward
    hook returning its input) and report the change in loss and accuracy on
    (X, y). A ReLU layer whose pre-activations are all positive on X changes by
    exactly 0 (ReLU is the identity there). (The paper's L-Map substitutes linear maps
    for neurons; this is raydyn's per-layer version; its rank probability distribution is
    not implemented.)

Sample-space basin
    For sample x with predicted class c and random unit directions u_i in input
    space, the keep fraction is kappa(eps) = mean_i [argmax f(x + eps |x| u_i) = c].
    The basin radius is the largest relative radius eps in [0, eps_max] with
    kappa(eps) >= keep (default 0.95), found by bisection (the directions are
    fixed, so kappa is a deterministic step function; bisection returns the
    crossing it brackets, the largest one when kappa is monotone as it is for
    a linear model). A sample with kappa(eps_max) >= keep gets eps_max and is
    flagged censored.

Weight-space basin
    For draw d with standard normal noise Z_d (one tensor per perturbed
    parameter W), the perturbed weights are
    W + sigma * (|W|_F / sqrt(numel W)) * Z_d, so each tensor moves by about
    sigma times its own norm (E|dW|_F^2 = sigma^2 |W|_F^2; an all-zero tensor is not
    moved). The accuracy at sigma
    is the median over draws of the accuracy on (X, y); the basin is the largest
    sigma in [0, sigma_max] whose accuracy is at least base accuracy - drop
    (default drop = 0.01, one percentage point), by bisection with common
    random numbers.

All functions switch the model to eval mode while they run (batch norm uses
running statistics, dropout is off, RReLU uses its mean slope) and restore the previous
mode, the weights and all hooks before returning. Tensors in, numpy/dataclasses out.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "RELU_LIKE",
    "order_preserving_range",
    "activation_rates",
    "neuron_modes",
    "LinearityProbe",
    "linearity_probe",
    "SampleBasin",
    "sample_basin",
    "WeightBasin",
    "weight_basin",
]

RELU_LIKE: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ReLU6, nn.ELU, nn.CELU, nn.SELU,
    nn.GELU, nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish,
)


# Where the non-monotone activations have their minimum (argmin of f, found numerically;
# tests/analysis/test_neurons.py checks them against torch): f is strictly increasing above it.
_GELU_MIN = -0.7517915246935645
_GELU_TANH_MIN = -0.7524614220710163
_SILU_MIN = -1.278464542761074
_MISH_MIN = -1.1924312145154954
_HARDSWISH_MIN = -1.5


def order_preserving_range(module: nn.Module) -> tuple[np.ndarray | float, float]:
    """(lo, hi): the open interval on which ``module``'s activation is strictly increasing.

    ``lo`` is a float, or a (C,) array for a per-channel PReLU. A neuron whose pre-activations
    all lie in (lo, hi) transforms its inputs order-preservingly (OPT).
    """
    inf = float("inf")
    if isinstance(module, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(module, nn.ReLU):
        return 0.0, inf
    if isinstance(module, nn.LeakyReLU):
        return (-inf if module.negative_slope > 0 else 0.0), inf
    if isinstance(module, nn.PReLU):
        w = module.weight.detach().to("cpu", torch.float64).numpy()
        lo = np.where(w > 0, -inf, 0.0)
        return (float(lo[0]) if lo.size == 1 else lo), inf
    if isinstance(module, nn.RReLU):  # eval mode: slope (lower + upper) / 2
        return (-inf if module.lower + module.upper > 0 else 0.0), inf
    if isinstance(module, (nn.ELU, nn.CELU)):
        return (-inf if module.alpha > 0 else 0.0), inf
    if isinstance(module, (nn.SELU, nn.Softplus)):
        return -inf, inf
    if isinstance(module, nn.GELU):
        return (_GELU_TANH_MIN if module.approximate == "tanh" else _GELU_MIN), inf
    if isinstance(module, nn.SiLU):
        return _SILU_MIN, inf
    if isinstance(module, nn.Mish):
        return _MISH_MIN, inf
    if isinstance(module, nn.Hardswish):
        return _HARDSWISH_MIN, inf
    raise ValueError(f"no order-preserving range known for {type(module).__name__}; "
                     f"supported: {[t.__name__ for t in RELU_LIKE]}")


# ---------------------------------------------------------------- helpers


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_X(X: object, name: str = "X", tokens: bool = False) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (N, ...), got {type(X).__name__}")
    if X.ndim < 2 or X.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N >= 1, ...) with a feature axis, got {tuple(X.shape)}")
    if tokens and X.dtype in (torch.int64, torch.int32):  # token inputs (modular arithmetic)
        return X
    if not torch.is_floating_point(X):
        raise ValueError(f"{name} must be floating point, got {X.dtype}")
    if not torch.isfinite(X).all():
        raise ValueError(f"{name} contains NaN or inf")
    return X


def _check_y(y: object, n: int) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"y must be a 1-D tensor of {n} class labels, got "
                         f"{getattr(y, 'shape', type(y).__name__)}")
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    return y


def _check_pos_int(v: object, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


def _check_pos(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
            or not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


def _check_frac(v: object, name: str, lo_open: bool = True) -> float:
    ok = isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and (
        (0 < v <= 1) if lo_open else (0 <= v <= 1))
    if not ok:
        raise ValueError(f"{name} must be in {'(0, 1]' if lo_open else '[0, 1]'}, got {v!r}")
    return float(v)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes.items():
            m.train(t)


def _activation_modules(
    model: nn.Module, types: Sequence[type[nn.Module]]
) -> list[tuple[str, nn.Module]]:
    types = tuple(types)
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise ValueError(f"types must be a non-empty sequence of nn.Module classes, got {types!r}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, types)]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _predict_classes(model: nn.Module, X: torch.Tensor, batch_size: int) -> torch.Tensor:
    outs = [model(X[sl]) for sl in _batches(X.shape[0], batch_size)]
    out = torch.cat(outs)
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        return (out.reshape(-1) > 0).long()  # single logit: class 1 iff logit > 0
    if out.ndim != 2:
        raise ValueError(f"model output must be (N, K) logits or (N,) / (N, 1), got {tuple(out.shape)}")
    return out.argmax(dim=1)


# ---------------------------------------------------------------- modes


def activation_rates(
    model: nn.Module,
    X_ref: torch.Tensor,
    types: Sequence[type[nn.Module]] = RELU_LIKE,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """Fraction of events on which each neuron's pre-activation lies in its activation's
    order-preserving range (:func:`order_preserving_range`; for ReLU: is > 0).

    X_ref: (N, ...) reference inputs (float, or int64 tokens). Returns activation-module name -> (C,)
    float array in [0, 1]. C is the channel axis of the activation's input: the last axis when
    the input is an ``nn.Linear``'s output, axis 1 otherwise (dense (N, C), conv (N, C, ...)).
    Each activation module must be called exactly once per forward pass.
    """
    _check_model(model)
    _check_X(X_ref, "X_ref", tokens=True)
    batch_size = _check_pos_int(batch_size, "batch_size")
    acts = _activation_modules(model, types)
    if not acts:
        raise ValueError(f"model has no activation module of types {[t.__name__ for t in types]}")
    ranges = {n: order_preserving_range(m) for n, m in acts}
    pos: dict[str, torch.Tensor] = {}
    tot: dict[str, int] = {}
    seen: set[str] = set()
    linear_out: list[torch.Tensor] = []  # the output of the nn.Linear that ran last

    def on_linear(mod: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        linear_out[:] = [out]

    def hook(name: str) -> Callable:
        # a pre-hook sees the pre-activation even for inplace activations
        def f(mod: nn.Module, inputs: tuple) -> None:
            z = inputs[0]
            if name in seen:
                raise ValueError(
                    f"activation module {name!r} ran 2 times in one forward pass; "
                    "give each use its own module instance")
            seen.add(name)
            if z.ndim <= 1:
                zc = z.reshape(1, -1)
            else:
                axis = -1 if (z.ndim > 2 and linear_out and linear_out[0] is z) else 1
                zc = z.movedim(axis, 0).reshape(z.shape[axis], -1)
            lo, hi = ranges[name]
            lo_t = torch.as_tensor(lo, dtype=zc.dtype).reshape(-1, 1) if np.ndim(lo) else lo
            cnt = ((zc > lo_t) & (zc < hi)).sum(dim=1)
            if name in pos and pos[name].shape != cnt.shape:
                raise ValueError(f"activation module {name!r} saw {cnt.shape[0]} channels, earlier {pos[name].shape[0]}")
            pos[name] = pos.get(name, 0) + cnt
            tot[name] = tot.get(name, 0) + zc.shape[1]
        return f

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in acts]
    handles += [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        with _eval_mode(model):
            for sl in _batches(X_ref.shape[0], batch_size):
                seen.clear()
                linear_out.clear()
                model(X_ref[sl])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in acts if n not in pos]
    if missing:
        raise ValueError(f"activation modules {missing} never ran in the forward pass")
    return {n: (pos[n].double() / tot[n]).numpy() for n, _ in acts}


def neuron_modes(
    model: nn.Module,
    X_ref: torch.Tensor,
    types: Sequence[type[nn.Module]] = RELU_LIKE,
    batch_size: int = 1024,
) -> dict[str, tuple[float, float, float]]:
    """(opt, npt, dead) fractions of the neurons of each activation layer.

    OPT: pre-activation in the activation's order-preserving range on every event of X_ref
    (for ReLU: > 0); dead: on none; NPT: otherwise. Fractions of the layer's neurons; they
    sum to 1.
    Returns activation-module name -> (opt, npt, dead).
    """
    rates = activation_rates(model, X_ref, types, batch_size)
    out = {}
    for n, r in rates.items():
        opt = float(np.mean(r == 1.0))
        dead = float(np.mean(r == 0.0))
        out[n] = (opt, float(np.mean((r > 0.0) & (r < 1.0))), dead)
    return out


# ---------------------------------------------------------------- linearity


@dataclass(frozen=True)
class LinearityProbe:
    """Loss/accuracy change when one activation layer is replaced by identity.

    base_loss, base_accuracy: unmodified model on (X, y).
    delta_loss, delta_accuracy: layer name -> (linearised - base); accuracy as
    a fraction in [-1, 1].
    """

    base_loss: float
    base_accuracy: float
    delta_loss: dict[str, float]
    delta_accuracy: dict[str, float]


def _loss_acc(model, X, y, loss_fn, batch_size) -> tuple[float, float]:
    outs = torch.cat([model(X[sl]) for sl in _batches(X.shape[0], batch_size)])
    loss = loss_fn(outs, y)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn(outputs, y) must return a scalar tensor (use reduction='mean')")
    if outs.ndim == 2 and outs.shape[1] > 1:
        pred = outs.argmax(1)
    else:
        pred = (outs.reshape(-1) > 0).long()
    return float(loss), float((pred == y).double().mean())


def linearity_probe(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
    types: Sequence[type[nn.Module]] = RELU_LIKE,
    layers: Sequence[str] | None = None,
    batch_size: int = 4096,
) -> LinearityProbe:
    """Linearise one activation layer at a time and measure the damage.

    X: (N, ...) inputs, y: (N,) integer labels; loss_fn(outputs, y) -> scalar
    (mean over the N samples, so it does not depend on batch_size).
    layers: activation-module names to probe (default: all of ``types``).
    The model is left exactly as it was (hooks removed, mode restored).
    """
    _check_model(model)
    _check_X(X)
    _check_y(y, X.shape[0])
    batch_size = _check_pos_int(batch_size, "batch_size")
    if not callable(loss_fn):
        raise ValueError("loss_fn must be callable(outputs, y) -> scalar tensor")
    acts = dict(_activation_modules(model, types))
    if layers is None:
        names = list(acts)
    else:
        names = list(layers)
        bad = [n for n in names if n not in acts]
        if bad:
            raise ValueError(f"layers {bad} are not activation modules; allowed: {list(acts)}")
    if not names:
        raise ValueError("no activation layer to probe")
    with _eval_mode(model):
        base_loss, base_acc = _loss_acc(model, X, y, loss_fn, batch_size)
        dl, da = {}, {}
        for n in names:
            saved: list[torch.Tensor] = []
            # keep a copy of the pre-activation (inplace activations overwrite it)
            # and hand it on instead of the activation's output
            h1 = acts[n].register_forward_pre_hook(lambda m, inp: saved.append(inp[0].clone()))
            h2 = acts[n].register_forward_hook(lambda m, inp, out: saved.pop())
            try:
                loss, acc = _loss_acc(model, X, y, loss_fn, batch_size)
            finally:
                h1.remove()
                h2.remove()
            dl[n], da[n] = loss - base_loss, acc - base_acc
    return LinearityProbe(base_loss, base_acc, dl, da)


# ---------------------------------------------------------------- basins


@dataclass(frozen=True)
class SampleBasin:
    """Sample-space attraction basin.

    radii: (N,) relative radius eps per sample (|delta| = eps |x|); NaN for x = 0.
    median: nanmedian of radii.
    censored: (N,) True where even eps_max kept >= keep of the directions.
    """

    radii: np.ndarray
    median: float
    censored: np.ndarray


def _keep_fraction(model, X, cls, U, eps, norms, batch_size) -> np.ndarray:
    """kappa_n(eps_n): (N,) fraction of directions keeping class cls[n]."""
    N, D = X.shape[0], U.shape[-1]
    R = U.shape[-2]
    step = torch.as_tensor(eps, dtype=X.dtype) * norms
    out = np.empty(N)
    chunk = max(1, batch_size // R)
    for sl in _batches(N, chunk):
        n = sl.stop - sl.start
        P = X[sl].reshape(n, 1, D) + step[sl].reshape(n, 1, 1) * U[sl]
        pred = _predict_classes(model, P.reshape(n * R, *X.shape[1:]), batch_size).reshape(n, R)
        out[sl] = (pred == cls[sl].reshape(n, 1)).double().mean(1).numpy()
    return out


def sample_basin(
    model: nn.Module,
    X: torch.Tensor,
    n_directions: int = 32,
    eps_max: float = 1.0,
    tol: float = 1e-3,
    keep: float = 0.95,
    seed: int = 0,
    directions: torch.Tensor | None = None,
    batch_size: int = 8192,
) -> SampleBasin:
    """Largest relative input perturbation that keeps the predicted class.

    X: (N, ...) inputs. Directions: ``n_directions`` independent uniform unit
    vectors in the flattened input space per sample (seeded), or the given
    ``directions`` of shape (R, D) or (N, R, D) (rows are normalised).
    eps_max: upper end of the search; tol: absolute bisection tolerance on eps.
    Returns :class:`SampleBasin`; the radius is the lower end of the final
    bracket, so it is within tol below the crossing.
    """
    _check_model(model)
    _check_X(X)
    eps_max = _check_pos(eps_max, "eps_max")
    tol = _check_pos(tol, "tol")
    keep = _check_frac(keep, "keep")
    batch_size = _check_pos_int(batch_size, "batch_size")
    N = X.shape[0]
    D = int(np.prod(X.shape[1:]))
    if directions is None:
        R = _check_pos_int(n_directions, "n_directions")
        g = torch.Generator().manual_seed(int(seed))
        U = torch.randn(N, R, D, generator=g, dtype=torch.float64).to(X.dtype)
    else:
        if not isinstance(directions, torch.Tensor) or directions.ndim not in (2, 3) \
                or directions.shape[-1] != D or (directions.ndim == 3 and directions.shape[0] != N):
            raise ValueError(f"directions must have shape (R, {D}) or ({N}, R, {D}), got "
                             f"{getattr(directions, 'shape', type(directions).__name__)}")
        U = directions.to(X.dtype)
        U = U.expand(N, *U.shape) if U.ndim == 2 else U
    nrm = U.norm(dim=-1, keepdim=True)
    if (nrm == 0).any():
        raise ValueError("directions contain a zero vector")
    U = U / nrm
    norms = X.reshape(N, -1).norm(dim=1)
    with _eval_mode(model):
        cls = _predict_classes(model, X, batch_size)
        lo = np.zeros(N)
        hi = np.full(N, eps_max)
        censored = _keep_fraction(model, X, cls, U, hi, norms, batch_size) >= keep
        lo[censored] = eps_max
        active = ~censored
        while active.any() and np.max(hi[active] - lo[active]) > tol:
            mid = np.where(active, 0.5 * (lo + hi), lo)
            ok = _keep_fraction(model, X, cls, U, mid, norms, batch_size) >= keep
            lo = np.where(active & ok, mid, lo)
            hi = np.where(active & ~ok, mid, hi)
            active = active & (hi - lo > tol)
    radii = lo.copy()
    radii[(norms == 0).numpy()] = np.nan
    med = float(np.nanmedian(radii)) if np.isfinite(radii).any() else float("nan")
    return SampleBasin(radii, med, censored)


@dataclass(frozen=True)
class WeightBasin:
    """Weight-space attraction basin.

    sigma: largest layer-relative noise scale keeping median accuracy within
    ``drop`` of base; base_accuracy: unperturbed accuracy; accuracy: median
    accuracy at sigma; censored: True when sigma_max itself stayed within.
    """

    sigma: float
    base_accuracy: float
    accuracy: float
    censored: bool


def weight_basin(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    n_draws: int = 8,
    sigma_max: float = 1.0,
    tol: float = 1e-3,
    drop: float = 0.01,
    seed: int = 0,
    include: Callable[[str], bool] | None = None,
    noise: Sequence[Mapping[str, torch.Tensor]] | None = None,
    batch_size: int = 8192,
) -> WeightBasin:
    """Largest layer-relative weight perturbation that keeps train accuracy.

    Each perturbed parameter tensor W (all parameters, or those whose name
    passes ``include``) becomes W + sigma * |W|_F / sqrt(numel W) * Z with Z
    standard normal: ``n_draws`` seeded draws, or the given ``noise`` (a list of
    name -> tensor dicts, one per draw). accuracy(sigma) = median over draws;
    the basin is the largest sigma in [0, sigma_max] with accuracy(sigma) >=
    base - drop, by bisection to absolute tolerance tol. The weights are
    restored exactly afterwards.
    """
    _check_model(model)
    _check_X(X)
    _check_y(y, X.shape[0])
    sigma_max = _check_pos(sigma_max, "sigma_max")
    tol = _check_pos(tol, "tol")
    drop = _check_frac(drop, "drop", lo_open=False)
    batch_size = _check_pos_int(batch_size, "batch_size")
    params = {n: p for n, p in model.named_parameters() if include is None or include(n)}
    if not params:
        raise ValueError("no parameters selected for perturbation (check include)")
    if noise is None:
        n_draws = _check_pos_int(n_draws, "n_draws")
        noise = []
        for d in range(n_draws):
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + d)
            noise.append({n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
                          for n, p in params.items()})
    else:
        noise = list(noise)
        if not noise:
            raise ValueError("noise must hold at least one draw")
        for d, z in enumerate(noise):
            for n, p in params.items():
                if n not in z or tuple(z[n].shape) != tuple(p.shape):
                    raise ValueError(f"noise[{d}] must map {n!r} to a tensor of shape {tuple(p.shape)}")
    orig = {n: p.detach().clone() for n, p in params.items()}
    scale = {n: (w.norm() / np.sqrt(max(w.numel(), 1))) for n, w in orig.items()}

    def accuracy(sigma: float) -> float:
        accs = []
        for z in noise:
            for n, p in params.items():
                p.copy_(orig[n] + sigma * scale[n] * z[n])
            accs.append(float((_predict_classes(model, X, batch_size) == y).double().mean()))
        for n, p in params.items():
            p.copy_(orig[n])
        return float(np.median(accs))

    try:
        with _eval_mode(model):
            base = float((_predict_classes(model, X, batch_size) == y).double().mean())
            target = base - drop - 1e-12
            top = accuracy(sigma_max)
            if top >= target:
                return WeightBasin(sigma_max, base, top, True)
            lo, hi, acc_lo = 0.0, sigma_max, base
            while hi - lo > tol:
                mid = 0.5 * (lo + hi)
                a = accuracy(mid)
                if a >= target:
                    lo, acc_lo = mid, a
                else:
                    hi = mid
            return WeightBasin(lo, base, acc_lo, False)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(orig[n])
