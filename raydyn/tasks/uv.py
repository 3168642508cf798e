"""Catapult-mechanism toy tasks (Lewkowycz et al. 2020), as pure trajectories.

Two full-batch-GD tasks whose learning-rate phases are known, used as oracles for
phase classification and boundary refinement:

* :func:`train_uv` -- the two-layer linear "uv" model ``f = v.u / sqrt(m)`` on one
  sample ``x = 1, y = 0`` with loss ``f^2/2``. Its NTK is exactly
  ``lambda = (|u|^2 + |v|^2)/m`` and GD obeys (exactly)

      f_{t+1}      = f_t (1 - eta lambda_t + eta^2 f_t^2 / m)
      lambda_{t+1} = lambda_t + eta f_t^2 (eta lambda_t - 4) / m

  so for large ``m``: ``eta lambda_0 < 2`` lazy (lambda ~ constant, loss decays),
  ``2 < eta lambda_0 < 4`` catapult (loss grows to O(m)-ish, lambda falls below
  ``2/eta``, then the loss converges), ``eta lambda_0 > 4`` diverged.
  At finite ``m`` the loss peak just above 2 is small: it scales like
  ``(eta lambda_0 - 2)^2 m / f_0^2``, so a loss-based detector sees the onset
  a little above 2 (about 2.05-2.1 at ``m = 1000`` with a "peak > 2x initial" rule).

* :func:`train_relu_teacher` -- a wide two-layer ReLU network in NTK
  parameterisation, ``f(x) = v . relu(W x / sqrt(d)) / sqrt(m)``, on Gaussian
  inputs with a Gaussian linear teacher, loss ``1/(2n) sum (f - y)^2``; its
  ``lambda_0`` is measured with :func:`raydyn.analysis.curvature.ntk_top_eigenvalue`
  (default scale ``1/n``, consistent with that loss).

Both return a plain dict whose keys ``steps``, ``train_loss``, ``ntk`` and
``status`` match the fields of :class:`raydyn.analysis.phase.RunTrajectory`.
No I/O, no Ray.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from raydyn.analysis.curvature import ntk_top_eigenvalue

__all__ = ["train_uv", "uv_lambda0", "train_relu_teacher", "relu_teacher_problem", "relu_net"]


def _check_pos(name: str, value: float) -> float:
    if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _np_dtype(dtype: Any) -> np.dtype:
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return dt


def _uv_init(m: int, seed: int, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal(m).astype(dt), rng.standard_normal(m).astype(dt)


def uv_lambda0(m: int = 1000, seed: int = 0) -> float:
    """NTK ``(|u|^2 + |v|^2)/m`` of the uv model at its initialisation (``u, v ~ N(0, I_m)``)."""
    m = _check_int("m", m, 1)
    u, v = _uv_init(m, seed, np.dtype(np.float64))
    return float((u @ u + v @ v) / m)


def train_uv(
    eta_lambda0: float,
    m: int = 1000,
    steps: int = 2000,
    seed: int = 0,
    dtype: Any = "float64",
    max_loss: float = 1e30,
) -> dict[str, Any]:
    """Full-batch GD on the uv model at learning rate ``eta = eta_lambda0 / lambda_0``.

    Args:
        eta_lambda0: the dimensionless learning rate ``eta * lambda_0`` (> 0).
        m: width (number of entries of ``u`` and ``v``).
        steps: number of GD steps.
        seed: seed of the ``N(0, 1)`` initialisation of ``u`` and ``v``.
        dtype: ``"float64"`` (default) or ``"float32"`` (numpy or torch dtype accepted).
        max_loss: training stops with status ``"diverged"`` once the loss is
            non-finite or exceeds this value.

    Returns:
        dict with ``steps`` (T+1,) int, ``train_loss`` (T+1,) the loss ``f^2/2``
        before each update (entry 0 is at initialisation), ``ntk`` (T+1,) the exact
        NTK ``(|u|^2+|v|^2)/m`` at the same points, ``status`` (``"completed"`` or
        ``"diverged"``; a diverged run is truncated after the offending step),
        ``lambda0``, ``eta``, ``eta_lambda0``, ``m``, ``seed``.
    """
    eta_lambda0 = _check_pos("eta_lambda0", eta_lambda0)
    m = _check_int("m", m, 1)
    steps = _check_int("steps", steps, 1)
    max_loss = _check_pos("max_loss", max_loss)
    dt = _np_dtype(dtype)
    u, v = _uv_init(m, seed, dt)
    sqm = dt.type(math.sqrt(m))
    lam0 = float((u @ u + v @ v) / m)
    eta = dt.type(eta_lambda0 / lam0)
    loss = np.empty(steps + 1)
    ntk = np.empty(steps + 1)
    status = "completed"
    t_end = steps
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps + 1):
            f = (u @ v) / sqm
            loss[t] = 0.5 * float(f) ** 2
            ntk[t] = float((u @ u + v @ v) / m)
            if not (math.isfinite(loss[t]) and loss[t] <= max_loss):
                status, t_end = "diverged", t
                break
            if t == steps:
                break
            # dL/du = f v / sqrt(m), dL/dv = f u / sqrt(m); simultaneous update.
            u, v = u - eta * f * v / sqm, v - eta * f * u / sqm
    n = t_end + 1
    return {
        "steps": np.arange(n),
        "train_loss": loss[:n].copy(),
        "ntk": ntk[:n].copy(),
        "status": status,
        "lambda0": lam0,
        "eta": float(eta),
        "eta_lambda0": eta_lambda0,
        "m": m,
        "seed": int(seed),
    }


def relu_teacher_problem(
    width: int = 2048, n: int = 64, d: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Initial parameters and data of the ReLU-teacher task.

    Returns ``(params, X, y)``: ``params = {"W": (width, d), "v": (width,)}`` drawn
    ``N(0, 1)``; ``X`` (n, d) ~ ``N(0, I_d)``; ``y = X beta / sqrt(d)`` (n,) with
    ``beta ~ N(0, I_d)`` (a Gaussian linear teacher).
    """
    width = _check_int("width", width, 1)
    n = _check_int("n", n, 1)
    d = _check_int("d", d, 1)
    g = torch.Generator().manual_seed(int(seed))
    X = torch.randn(n, d, generator=g, dtype=dtype)
    beta = torch.randn(d, generator=g, dtype=dtype)
    y = X @ beta / math.sqrt(d)
    params = {
        "W": torch.randn(width, d, generator=g, dtype=dtype),
        "v": torch.randn(width, generator=g, dtype=dtype),
    }
    return params, X, y


def relu_net(params: dict[str, torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``f(X) = relu(X W^T / sqrt(d)) v / sqrt(m)``; X (n, d) -> (n,). NTK parameterisation."""
    W, v = params["W"], params["v"]
    return torch.relu(X @ W.T / math.sqrt(W.shape[1])) @ v / math.sqrt(W.shape[0])


def train_relu_teacher(
    eta_lambda0: float,
    width: int = 2048,
    n: int = 64,
    d: int = 10,
    steps: int = 300,
    seed: int = 0,
    ntk_every: int = 10,
    dtype: torch.dtype = torch.float64,
    max_loss_factor: float = 1e8,
) -> dict[str, Any]:
    """Full-batch GD on the two-layer ReLU network at ``eta = eta_lambda0 / lambda_0``.

    ``lambda_0`` is the top eigenvalue of the empirical NTK ``(1/n) J J^T`` at
    initialisation, measured by :func:`ntk_top_eigenvalue` (power iteration), the
    convention under which the loss ``1/(2n) sum (f - y)^2`` is linearly stable
    iff ``eta lambda_0 < 2``.

    Args:
        eta_lambda0: dimensionless learning rate ``eta * lambda_0`` (> 0).
        width, n, d: hidden width ``m``, number of samples, input dimension.
        steps: number of GD steps.
        seed: seed of data, teacher and initialisation.
        ntk_every: the NTK top eigenvalue is measured every ``ntk_every`` steps (and
            at the last step); ``ntk`` is NaN in between. Each measurement is
            warm-started from the previous eigenvector.
        dtype: torch floating dtype.
        max_loss_factor: stop with status ``"diverged"`` when the loss is non-finite
            or exceeds ``max_loss_factor`` x the initial loss.

    Returns:
        dict with ``steps`` (T+1,), ``train_loss`` (T+1,) before each update,
        ``ntk`` (T+1,) (NaN where not measured), ``status``, ``lambda0``, ``eta``,
        ``eta_lambda0``, ``width``, ``seed``.
    """
    eta_lambda0 = _check_pos("eta_lambda0", eta_lambda0)
    steps = _check_int("steps", steps, 1)
    ntk_every = _check_int("ntk_every", ntk_every, 1)
    max_loss_factor = _check_pos("max_loss_factor", max_loss_factor)
    params, X, y = relu_teacher_problem(width, n, d, seed, dtype)
    lam0, vec = ntk_top_eigenvalue(relu_net, params, X, n_iter=200, tol=1e-8, return_vector=True)
    eta = eta_lambda0 / lam0
    p = {k: t.clone().requires_grad_(True) for k, t in params.items()}
    loss = np.full(steps + 1, np.nan)
    ntk = np.full(steps + 1, np.nan)
    ntk[0] = lam0
    status, t_end = "completed", steps
    for t in range(steps + 1):
        L = 0.5 * ((relu_net(p, X) - y) ** 2).mean()
        loss[t] = float(L.detach())
        if not (math.isfinite(loss[t]) and loss[t] <= max_loss_factor * loss[0]):
            status, t_end = "diverged", t
            break
        if t > 0 and (t % ntk_every == 0 or t == steps):
            ntk[t], vec = ntk_top_eigenvalue(
                relu_net, {k: q.detach() for k, q in p.items()}, X, n_iter=100, tol=1e-7, v0=vec, return_vector=True
            )
        if t == steps:
            break
        grads = torch.autograd.grad(L, list(p.values()))
        with torch.no_grad():
            for q, g in zip(p.values(), grads):
                q -= eta * g
    k = t_end + 1
    return {
        "steps": np.arange(k),
        "train_loss": loss[:k].copy(),
        "ntk": ntk[:k].copy(),
        "status": status,
        "lambda0": float(lam0),
        "eta": float(eta),
        "eta_lambda0": eta_lambda0,
        "width": int(width),
        "seed": int(seed),
    }
