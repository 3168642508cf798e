"""Optimisers as dynamical systems: the OMD / OGD / bisection validation case.

Redman et al. (NeurIPS 2024), after Ghai, Lu & Hazan (2022), "Non-convex online
learning via algorithmic equivalence": online mirror descent (OMD) with the
log-barrier mirror map R(x) = -sum log x_i on a box is equivalent (to first order
in the step size) to online gradient descent (OGD) on the reparameterised loss
f(exp(u)) in u = log x coordinates, so the two should share Koopman spectra; the
bisection method on the same loss is a non-conjugate control.

Setup, as in the reference implementation of Redman et al.:

* loss f(x) = sum_i tan(x_i), d = 2, eta = 0.01, T = 100 recorded states (the
  initial state included, i.e. 99 updates);
* box [1/T, 1]^2 = [0.01, 1]^2 for OMD, its image [log 0.01, 0]^2 for OGD; both
  projections are closed-form clips here (the log-barrier Bregman divergence and
  the squared distance are separable and convex with their minimum at the
  unprojected point), where the reference calls a numerical minimiser;
* 25 initial conditions on a 5 x 5 grid each: x0 in linspace(0.1, 0.9, 5)^2 for
  OMD, u0 in linspace(-2.3, -0.1, 5)^2 for OGD (about log x0), and bisection
  brackets a0 in linspace(-4/3, -1/3, 5)^2, b0 in linspace(1/7, 8/7, 5)^2 with
  f(a0) < 0 < f(b0), starting at (a0 + b0) / 2;
* OGD trajectories are analysed in u coordinates (as the reference does).

Published with 4 delays and full-rank DMD on all 25 trajectories pooled:
W1(OMD, OGD) ~ 0.0081, W1(OGD, bisection) ~ 0.75 (and W1(OMD, bisection) ~ 0.75).

All functions are pure numpy and return arrays of shape (n_init, T, d).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "ETA",
    "N_STEPS",
    "tan_loss",
    "tan_loss_grad",
    "grid",
    "omd_initial_conditions",
    "ogd_initial_conditions",
    "bisection_brackets",
    "online_mirror_descent",
    "online_gradient_descent",
    "bisection_method",
    "omd_ogd_bisection",
]

ETA = 0.01
N_STEPS = 100
GRID_RES = 5
DIM = 2


def tan_loss(x: np.ndarray) -> np.ndarray:
    """f(x) = sum_i tan(x_i) over the last axis: (..., d) -> (...)."""
    return np.tan(x).sum(axis=-1)


def tan_loss_grad(x: np.ndarray) -> np.ndarray:
    """grad f(x) = sec^2(x), elementwise: (..., d) -> (..., d)."""
    return 1.0 / np.cos(x) ** 2


def grid(lo: float, hi: float, res: int = GRID_RES) -> np.ndarray:
    """(res^2, 2) points of a res x res grid on [lo, hi]^2, ordered like the reference
    (``np.meshgrid`` then flattened: the first coordinate varies fastest)."""
    g = np.linspace(lo, hi, res)
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def omd_initial_conditions(res: int = GRID_RES) -> np.ndarray:
    """(res^2, 2) OMD starts on [0.1, 0.9]^2."""
    return grid(0.1, 0.9, res)


def ogd_initial_conditions(res: int = GRID_RES) -> np.ndarray:
    """(res^2, 2) OGD starts (u = log x coordinates) on [-2.3, -0.1]^2."""
    return grid(-2.3, -0.1, res)


def bisection_brackets(res: int = GRID_RES) -> tuple[np.ndarray, np.ndarray]:
    """(a0, b0), each (res^2, 2): a0 on [-4/3, -1/3]^2 (f < 0), b0 on [1/7, 8/7]^2 (f > 0)."""
    return grid(-4 / 3, -1 / 3, res), grid(1 / 7, 8 / 7, res)


def _check_points(x, name: str, dim: int | None = None) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{name} must have shape (n_init, d), got {np.shape(x)}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _check_common(eta: float, n_steps: int) -> None:
    if not (np.isfinite(eta) and eta > 0):
        raise ValueError(f"eta must be a positive finite number, got {eta!r}")
    if int(n_steps) != n_steps or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")


def online_mirror_descent(
    x0: np.ndarray | None = None,
    *,
    eta: float = ETA,
    n_steps: int = N_STEPS,
    bounds: tuple[float, float] = (1.0 / N_STEPS, 1.0),
) -> np.ndarray:
    """OMD with the log-barrier mirror map on the box [lo, hi]^d.

    Mirror step: grad R(y) = grad R(x) - eta grad f(x) with grad R(x) = -1/x, i.e.
    y = 1 / (1/x + eta sec^2 x); then the Bregman projection onto the box, which for
    this separable, convex divergence (y/x' - log(y/x') - 1 per coordinate) is the clip.

    Parameters
    ----------
    x0 : (n_init, d), default the 5 x 5 grid on [0.1, 0.9]^2; must lie in the box
    n_steps : number of recorded states T, the initial one included

    Returns
    -------
    (n_init, T, d) trajectories in x coordinates.
    """
    _check_common(eta, n_steps)
    x = _check_points(omd_initial_conditions() if x0 is None else x0, "x0")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds!r}")
    if np.any((x < lo) | (x > hi)):
        raise ValueError(f"x0 must lie in the box [{lo}, {hi}]^d")
    out = np.empty((x.shape[0], int(n_steps), x.shape[1]))
    out[:, 0] = x
    for t in range(1, int(n_steps)):
        x = np.clip(1.0 / (1.0 / x + eta * tan_loss_grad(x)), lo, hi)
        out[:, t] = x
    return out


def online_gradient_descent(
    u0: np.ndarray | None = None,
    *,
    eta: float = ETA,
    n_steps: int = N_STEPS,
    bounds: tuple[float, float] = (1.0 / N_STEPS, 1.0),
) -> np.ndarray:
    """OGD on f~(u) = f(exp(u)) in u = log x coordinates, projected onto [log lo, log hi]^d.

    u <- clip(u - eta exp(u) sec^2(exp(u)), log lo, log hi).

    Parameters
    ----------
    u0 : (n_init, d) in log coordinates, default the 5 x 5 grid on [-2.3, -0.1]^2
    n_steps : number of recorded states T, the initial one included
    bounds : the box in x coordinates

    Returns
    -------
    (n_init, T, d) trajectories in u = log x coordinates.
    """
    _check_common(eta, n_steps)
    u = _check_points(ogd_initial_conditions() if u0 is None else u0, "u0")
    lo, hi = bounds
    if not 0 < lo < hi:
        raise ValueError(f"bounds must satisfy 0 < lo < hi, got {bounds!r}")
    ulo, uhi = np.log(lo), np.log(hi)
    if np.any((u < ulo) | (u > uhi)):
        raise ValueError(f"u0 must lie in the box [{ulo:.4g}, {uhi:.4g}]^d")
    out = np.empty((u.shape[0], int(n_steps), u.shape[1]))
    out[:, 0] = u
    for t in range(1, int(n_steps)):
        x = np.exp(u)
        u = np.clip(u - eta * x * tan_loss_grad(x), ulo, uhi)
        out[:, t] = u
    return out


def bisection_method(
    a0: np.ndarray | None = None,
    b0: np.ndarray | None = None,
    *,
    n_steps: int = N_STEPS,
) -> np.ndarray:
    """Bisection on the segment [a, b] for a root of f (f(a) < 0 < f(b)).

    z_0 = (a0 + b0) / 2; at each step the bracket end with the same sign of f as z
    moves to z and z becomes the new midpoint. Once f(z) == 0 exactly the iterate
    stays put (the reference leaves such rows at zero; we repeat z instead).

    Returns
    -------
    (n_init, T, d) iterates z_t.
    """
    _check_common(1.0, n_steps)
    if (a0 is None) != (b0 is None):
        raise ValueError("give both a0 and b0, or neither")
    if a0 is None:
        a0, b0 = bisection_brackets()
    a = _check_points(a0, "a0")
    b = _check_points(b0, "b0", a.shape[1])
    if a.shape != b.shape:
        raise ValueError(f"a0 and b0 must have the same shape, got {a.shape} and {b.shape}")
    if np.any(tan_loss(a) >= 0) or np.any(tan_loss(b) <= 0):
        raise ValueError("every bracket needs f(a0) < 0 < f(b0)")
    z = (a + b) / 2
    out = np.empty((a.shape[0], int(n_steps), a.shape[1]))
    out[:, 0] = z
    for t in range(1, int(n_steps)):
        fz = tan_loss(z)[:, None]
        a = np.where(fz < 0, z, a)
        b = np.where(fz > 0, z, b)
        z = np.where(fz == 0, z, (a + b) / 2)
        out[:, t] = z
    return out


def omd_ogd_bisection(
    *, eta: float = ETA, n_steps: int = N_STEPS, res: int = GRID_RES
) -> dict[str, np.ndarray]:
    """The three systems of the validation sweep, each (res^2, T, 2).

    Keys: "omd" (x coordinates), "ogd" (u = log x coordinates), "bisection".
    """
    return {
        "omd": online_mirror_descent(omd_initial_conditions(res), eta=eta, n_steps=n_steps),
        "ogd": online_gradient_descent(ogd_initial_conditions(res), eta=eta, n_steps=n_steps),
        "bisection": bisection_method(*bisection_brackets(res), n_steps=n_steps),
    }
