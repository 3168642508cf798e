"""Ask/tell refinement on planted boundaries: located within tolerance, with fewer runs than a dense grid."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from raydyn.aggregate.bisect import GridRefiner, Refiner, dense_grid_size

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "0"))


def step_oracle(c, left="a", right="b"):
    return lambda x: left if x <= c else right


def test_planted_boundary_linear_beats_dense_grid():
    print(f"RAYDYN_TEST_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    tol = 1e-3
    n_dense = dense_grid_size(0.0, 1.0, tol, log=False)
    assert n_dense == 1001
    for c in rng.uniform(0.01, 0.99, size=20):
        x0 = np.linspace(0, 1, 5)
        oracle = step_oracle(c)
        r = Refiner(x0, [oracle(v) for v in x0], log=False, tol=tol).run(oracle)
        (b,) = r.boundaries()
        assert b.contains(c) and b.upper - b.lower <= tol * (1 + 1e-9)
        assert abs(b.location - c) <= tol / 2 + 1e-12
        # 5 initial + ceil(log2(0.25 / tol)) = 5 + 8 bisections
        assert r.n_told_ == 5 + math.ceil(math.log2(0.25 / tol))
        assert r.n_told_ < n_dense / 50
        assert r.done and r.ask(3) == []


def test_planted_boundary_log_axis():
    rng = np.random.default_rng(SEED + 1)
    tol = 0.01  # relative: upper/lower <= 1.01
    for c in 10 ** rng.uniform(-4.5, -0.5, size=10):
        x0 = np.geomspace(1e-5, 1, 6)
        oracle = step_oracle(c, "lazy", "diverged")
        r = Refiner(x0, [oracle(v) for v in x0], log=True, tol=tol).run(oracle)
        (b,) = r.boundaries()
        assert b.log and b.contains(c)
        assert b.upper / b.lower <= 1 + tol + 1e-12
        assert b.resolved_width <= tol * (1 + 1e-9)
        # geometric bisection of one decade down to 1% needs ceil(log2(ln10/ln1.01)) = 8 steps
        assert r.n_told_ == 6 + 8
        assert r.n_told_ < dense_grid_size(1e-5, 1, tol, log=True) / 50
    # log='auto' recognises the geometric grid
    assert Refiner(np.geomspace(1e-5, 1, 6), ["a"] * 6).log_


def test_batches_do_parallel_n_section():
    c, tol = 0.6180339, 1e-3
    oracle = step_oracle(c)
    x0 = np.linspace(0, 1, 5)
    seq = Refiner(x0, [oracle(v) for v in x0], log=False, tol=tol).run(oracle, batch_size=1)
    r = Refiner(x0, [oracle(v) for v in x0], log=False, tol=tol)
    rounds = 0
    while True:
        vals = r.ask(7)
        if not vals:
            break
        assert len(vals) == len(set(vals))
        r.tell(vals, [oracle(v) for v in vals])
        rounds += 1
    (b,) = r.boundaries()
    assert b.contains(c) and b.width <= tol * (1 + 1e-9)
    seq_rounds = seq.n_told_ - 5
    assert rounds <= math.ceil(seq_rounds / 3)  # 7 points per round ~ 3 bisections per round


def test_ask_is_pending_aware_and_budget_is_respected():
    r = Refiner([0.0, 1.0], ["a", "b"], log=False, tol=1e-3, budget=5)
    first = r.ask(1)
    second = r.ask(1)
    assert first == [0.5] and second != first and r.pending == sorted(first + second)
    third = r.ask(10)
    assert len(third) == 3 and r.budget_left == 0 and r.ask(1) == [] and r.done
    r.tell(first + second + third, ["a"] * 5)
    assert r.pending == [] and r.n_told_ == 7


def test_several_boundaries_all_resolved():
    cuts = [0.21, 0.5, 0.77]
    names = ["lazy", "converged", "catapult", "diverged"]

    def oracle(x):
        return names[int(np.searchsorted(cuts, x, side="right"))]

    x0 = np.linspace(0, 1, 9)
    r = Refiner(x0, [oracle(v) for v in x0], log=False, tol=1e-3).run(oracle, batch_size=2)
    bs = r.boundaries()
    assert [(b.left_phase, b.right_phase) for b in bs] == list(zip(names[:-1], names[1:]))
    for b, c in zip(bs, cuts):
        assert b.contains(c) and b.width <= 1e-3 * (1 + 1e-9)


def test_refinement_discovers_hidden_phase_between_grid_points():
    # 'b' lives in (0.30, 0.36): invisible to the coarse grid until bisection lands in it
    def oracle(x):
        return "a" if x <= 0.30 else ("b" if x <= 0.36 else "c")

    x0 = [0.0, 0.25, 0.5, 0.75, 1.0]
    r = Refiner(x0, [oracle(v) for v in x0], log=False, tol=1e-3).run(oracle)
    assert [(b.left_phase, b.right_phase) for b in r.boundaries()] == [("a", "b"), ("b", "c")]


def test_noisy_band_terminates_as_stuck():
    # each "seed" is a coin flip within +-0.02 of the boundary 0.5: wider than tol
    rng = np.random.default_rng(SEED + 2)

    def oracle(x):
        if abs(x - 0.5) < 0.02:
            return [str(rng.choice(["a", "b"])) for _ in range(3)]
        return ["a" if x < 0.5 else "b"] * 3

    x0 = np.linspace(0, 1, 5)
    r = Refiner(x0, [oracle(v) for v in x0], log=False, tol=1e-3, budget=500).run(oracle)
    assert r.n_asked_ < 500  # stopped on its own, did not burn the budget on noise
    assert r.done
    bs = r.boundaries()
    assert bs and all(0.45 < b.location < 0.55 for b in bs)
    assert all(b in r.stuck() or r.is_resolved(b) for b in bs)


def test_grid_refiner_2d_planted_curve():
    def xc(y):
        return 0.5 + 0.3 * math.sin(2 * math.pi * y)

    def oracle(x, y):
        return "lazy" if x <= xc(y) else "catapult"

    xs = np.linspace(0, 1, 5)
    ys = np.linspace(0, 1, 11)
    tol = 1e-3
    labels = [[oracle(x, y) for x in xs] for y in ys]
    g = GridRefiner(xs, ys, labels, log=False, tol=tol).run(oracle, batch_size=4)
    for y, bs in g.boundaries().items():
        assert len(bs) == 1 and bs[0].contains(xc(y)) and bs[0].width <= tol * (1 + 1e-9)
    n_dense = len(ys) * dense_grid_size(0, 1, tol, log=False)
    assert g.n_told_ < n_dense / 50
    assert g.done and g.ask(1) == []


def test_grid_refiner_budget_and_validation():
    xs, ys = [0.0, 1.0], [0.0, 1.0]
    g = GridRefiner(xs, ys, [["a", "b"], ["a", "b"]], log=False, tol=1e-3, budget=3)
    pts = g.ask(10)
    assert len(pts) == 3 and g.done
    with pytest.raises(ValueError, match="not a row"):
        g.tell([(0.5, 0.7)], ["a"])
    with pytest.raises(ValueError, match="rows"):
        GridRefiner(xs, ys, [["a", "b"]])


def test_refiner_validation():
    with pytest.raises(ValueError, match="at least 2"):
        Refiner([1.0, 1.0], ["a", "b"])
    with pytest.raises(ValueError, match="tol"):
        Refiner([0.0, 1.0], ["a", "b"], tol=0)
    with pytest.raises(ValueError, match="budget"):
        Refiner([0.0, 1.0], ["a", "b"], budget=-1)
    with pytest.raises(ValueError, match="n must"):
        Refiner([0.0, 1.0], ["a", "b"]).ask(0)
    with pytest.raises(ValueError, match="positive"):
        Refiner([1.0, 2.0], ["a", "b"], log=True).tell([-1.0], ["a"])
