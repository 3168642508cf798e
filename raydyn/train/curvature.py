"""Curvature of population members while they train: NTK top eigenvalue and sharpness.

The glue between the population trainer (stacked parameters, a model on the
``meta`` device called through ``functional_call``) and the pure math of
:mod:`raydyn.analysis.curvature`. Used three ways:

* :func:`member_ntk` -- ``lambda_0`` for ``train.lr_units: ntk`` (population and
  reference loop call the same function, so both train at the same step size);
* the ``ntk`` and ``sharpness`` probes (:data:`raydyn.train.recorder.PROBES`),
  measured every ``train.curvature_every`` steps on the *curvature batch*: the
  first ``train.curvature_batch`` training samples (all of them when the data set is
  smaller, i.e. the full batch of full-batch GD).

Conventions are those of :mod:`raydyn.analysis.curvature`: the NTK is
``(1/n) J J^T`` over the n samples' flattened outputs, which for raydyn's ``mse``
loss (``1/(2n) sum ||f - y||^2``) makes full-batch GD linearly stable iff
``lr * lambda < 2``; sharpness is the top eigenvalue of the Hessian of the
training loss on the curvature batch (Lanczos on Hessian-vector products).
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from torch.func import functional_call

from raydyn.analysis.curvature import ntk_top_eigenvalue, sharpness
from raydyn.train.objectives import loss_fn

__all__ = ["curvature_batch", "member_ntk", "member_sharpness", "ntk_probe", "sharpness_probe", "due"]

# power iteration for lambda_0 (sets the step size: tight) and along training (tracking, warm-started)
LAMBDA0_ITERS, LAMBDA0_TOL = 1000, 1e-10
TRACK_ITERS, TRACK_TOL = 200, 1e-7
LANCZOS_RESTARTS, LANCZOS_TOL = 50, 1e-6


def curvature_batch(data: Any, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training samples ``(x, y)`` (fewer if the training set is smaller)."""
    return data.head("train", n)


def _model_fn(model: torch.nn.Module, buffers: dict[str, torch.Tensor]):
    return lambda p, x: functional_call(model, (p, buffers), (x,))


def member_ntk(model: torch.nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               x: torch.Tensor, *, n_iter: int = LAMBDA0_ITERS, tol: float = LAMBDA0_TOL,
               v0: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Top eigenvalue of one model's empirical NTK on inputs ``x`` (n, ...), and its eigenvector (n*k,).

    ``params``/``buffers`` are one member's tensors (no leading P axis). Deterministic:
    the random start vector has seed 0, so a population member and the same run
    trained alone get the same value.
    """
    lam, vec = ntk_top_eigenvalue(_model_fn(model, buffers), params, x, n_iter=n_iter, tol=tol, v0=v0,
                                  return_vector=True)
    return float(lam), vec


def member_sharpness(model: torch.nn.Module, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                     x: torch.Tensor, y: torch.Tensor, loss_name: str) -> float:
    """Top Hessian eigenvalue of the loss of one model on ``(x, y)`` (Lanczos)."""
    f = _model_fn(model, buffers)
    with warnings.catch_warnings():  # partial Lanczos convergence: the best Ritz value is kept
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sharpness(lambda p: loss_fn(loss_name, f(p, x), y), params, n_iter=LANCZOS_RESTARTS,
                               tol=LANCZOS_TOL, method="lanczos"))


def due(ctx: dict[str, Any]) -> bool:
    """True on steps where the curvature probes measure (every ``curvature_every``, and the last step)."""
    cfg = ctx["cfg"]
    return ctx["step"] % int(cfg["curvature_every"]) == 0 or ctx["step"] == int(cfg["steps"])


def _members(ctx: dict[str, Any]):
    """Yield (i, params_i, buffers_i) for members recorded on this step whose parameters are finite."""
    params, buffers = ctx["params"], ctx.get("buffers") or {}
    mask = ctx.get("mask")
    P = next(iter(params.values())).shape[0]
    for i in range(P):
        if mask is not None and not bool(mask[i]):
            continue
        p_i = {k: v[i] for k, v in params.items()}
        if not all(torch.isfinite(v).all() for v in p_i.values()):
            continue
        yield i, p_i, {k: v[i] for k, v in buffers.items()}


def _nan_column(ctx: dict[str, Any]) -> torch.Tensor:
    params = ctx["params"]
    first = next(iter(params.values()))
    return torch.full((first.shape[0],), math.nan, dtype=torch.float64)


def ntk_probe(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Column ``ntk_top``: NTK top eigenvalue per member on the curvature batch (NaN off schedule).

    Warm-started from the member's previous eigenvector (kept in ``ctx['state']``).
    """
    out = _nan_column(ctx)
    if not due(ctx):
        return {"ntk_top": out}
    x, _ = curvature_batch(ctx["data"], ctx["cfg"]["curvature_batch"])
    state = ctx["state"].setdefault("ntk_vectors", {})
    for i, p_i, b_i in _members(ctx):
        try:
            lam, vec = member_ntk(ctx["model"], p_i, b_i, x, n_iter=TRACK_ITERS, tol=TRACK_TOL, v0=state.get(i))
        except FloatingPointError:  # parameters finite but outputs blew up: a diverging member
            continue
        out[i], state[i] = lam, vec
    return {"ntk_top": out}


def sharpness_probe(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Column ``sharpness``: top Hessian eigenvalue of the loss on the curvature batch (NaN off schedule)."""
    out = _nan_column(ctx)
    if not due(ctx):
        return {"sharpness": out}
    x, y = curvature_batch(ctx["data"], ctx["cfg"]["curvature_batch"])
    for i, p_i, b_i in _members(ctx):
        try:
            val = member_sharpness(ctx["model"], p_i, b_i, x, y, ctx["loss"])
        except (FloatingPointError, RuntimeError):  # non-finite HVPs or no Lanczos convergence
            continue
        out[i] = val if np.isfinite(val) else math.nan
    return {"sharpness": out}
