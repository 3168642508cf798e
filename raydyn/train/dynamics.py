"""Optimisers as dynamical systems (no neural network): runs whose "weights" are the iterate x_t.

For the Koopman validation case of Redman et al. (2024): online mirror descent (``omd``),
online gradient descent in log coordinates (``ogd``) and the bisection method
(``bisection``) on f(x) = sum_i tan(x_i) (dataset ``tan_sum``). A run's ``seed`` picks its
initial condition on the data set's grid (``grid`` x ``grid`` points). The trajectories
go to the store exactly like a network's (metrics: loss f(x_t) and gradient norm;
weights: x_t), so the store, the analyses and the phase maps treat them uniformly.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from raydyn.spec import PopulationSpec
from raydyn.train.population import MemberResult, PopulationResult
from raydyn.train.recorder import Recorder


def initial_condition(method: str, index: int, res: int) -> tuple[np.ndarray, ...]:
    """The index-th grid point of the method's initial conditions (row-major)."""
    from raydyn.tasks import dynamics as dyn

    n = res * res
    if not 0 <= index < n:
        raise ValueError(f"seed {index} is not an initial condition: the {res}x{res} grid has seeds 0..{n - 1}")
    if method == "omd":
        return (dyn.omd_initial_conditions(res)[index : index + 1],)
    if method == "ogd":
        return (dyn.ogd_initial_conditions(res)[index : index + 1],)
    a, b = dyn.bisection_brackets(res)
    return a[index : index + 1], b[index : index + 1]


def trajectory(method: str, index: int, eta: float, n_states: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, d) iterates in the coordinates the method works in, and (T, d) the point x where f is evaluated."""
    from raydyn.tasks import dynamics as dyn

    init = initial_condition(method, index, res)
    if method == "omd":
        z = dyn.online_mirror_descent(init[0], eta=eta, n_steps=n_states)[0]
        return z, z
    if method == "ogd":
        u = dyn.online_gradient_descent(init[0], eta=eta, n_steps=n_states)[0]
        return u, np.exp(u)
    z = dyn.bisection_method(init[0], init[1], n_steps=n_states)[0]
    return z, z


def train_dynamics(pop: PopulationSpec, on_record=None) -> PopulationResult:
    """Run every member's iteration for ``steps`` updates; record like the network trainer."""
    from raydyn.tasks import dynamics as dyn

    t0 = time.perf_counter()
    cfg = pop.shared
    members = list(pop.members)
    steps, every = int(cfg["steps"]), int(cfg["record_every"])
    res = int(cfg["data"]["grid"])
    paths = [trajectory(cfg["optimizer"], int(m.config["seed"]), float(m.config["lr"]), steps + 1, res) for m in members]
    z = torch.tensor(np.stack([p[0] for p in paths]))  # (P, T, d): the state the method iterates
    x = np.stack([p[1] for p in paths])  # (P, T, d): where the loss is evaluated
    loss = torch.tensor(dyn.tan_loss(x.reshape(-1, x.shape[-1])).reshape(x.shape[:2]))  # (P, T)
    grad = torch.tensor(dyn.tan_loss_grad(x))
    recorder = Recorder(cfg, members, {"x": z[:, 0]})
    mask = torch.ones(len(members), dtype=torch.bool)
    nan = torch.full((len(members),), float("nan"), dtype=torch.float64)
    for t in range(steps + 1):
        if t % every and t != steps:
            continue
        recorder.record(t, mask, {"x": z[:, t]}, {"x": grad[:, t]}, None, train=(loss[:, t], nan), test=(nan, nan),
                        batch_loss=loss[:, t])
        if on_record:
            on_record(t, len(members), 0)
    results = [MemberResult(m.run_id, m.config, steps_done=steps) for m in members]
    return PopulationResult(results, recorder, time.perf_counter() - t0)
