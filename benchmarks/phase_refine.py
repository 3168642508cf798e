"""Runs needed to locate phase boundaries: adaptive refinement vs a dense grid.

For the same boundary accuracy (every boundary bracketed within ``tol``), count
the evaluations (training runs) each strategy needs:

* planted 1-D boundaries (linear and log axes), random locations;
* a planted 2-D boundary curve, refined along every row;
* the uv catapult model as a real oracle (classify.py labels real GD runs): both
  boundaries (eta*lambda_0 ~ 2 and 4) on [1, 5];
* with ``--relu``: the wide ReLU network's catapult window (slower, ~1 s per run).

Prints medians and the ratio dense/refined measured side by side in one run.
Usage: python benchmarks/phase_refine.py [--reps 20] [--relu]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import numpy as np

from raydyn.aggregate.bisect import GridRefiner, Refiner, dense_grid_size
from raydyn.aggregate.boundary import find_boundaries
from raydyn.analysis.phase import RunTrajectory, classify
from raydyn.tasks.uv import train_relu_teacher, train_uv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _machine import Cores, machine_line  # noqa: E402


def planted_1d(reps: int, tol: float, log: bool, rng: np.random.Generator) -> tuple[float, int, bool]:
    lo, hi = (1e-5, 1.0) if log else (0.0, 1.0)
    n_dense = dense_grid_size(lo, hi, tol, log)
    counts, ok = [], True
    for _ in range(reps):
        c = float(10 ** rng.uniform(-4.8, -0.2)) if log else float(rng.uniform(0.02, 0.98))
        oracle = lambda x: "a" if x <= c else "b"  # noqa: E731
        x0 = np.geomspace(lo, hi, 6) if log else np.linspace(lo, hi, 5)
        r = Refiner(x0, [oracle(v) for v in x0], log=log, tol=tol).run(oracle)
        (b,) = r.boundaries()
        ok &= b.contains(c) and r.is_resolved(b)
        counts.append(r.n_told_)
    return statistics.median(counts), n_dense, ok


def planted_2d(tol: float, ny: int = 21) -> tuple[int, int, bool]:
    def xc(y: float) -> float:
        return 0.5 + 0.3 * math.sin(2 * math.pi * y)

    def oracle(x: float, y: float) -> str:
        return "lazy" if x <= xc(y) else "catapult"

    xs, ys = np.linspace(0, 1, 5), np.linspace(0, 1, ny)
    labels = [[oracle(x, y) for x in xs] for y in ys]
    g = GridRefiner(xs, ys, labels, log=False, tol=tol).run(oracle, batch_size=8)
    ok = all(len(bs) == 1 and bs[0].contains(xc(y)) for y, bs in g.boundaries().items())
    return g.n_told_, ny * dense_grid_size(0, 1, tol, False), ok


def real_oracle(label, lo: float, hi: float, tol: float, n0: int) -> dict:
    t = time.perf_counter()
    x0 = np.linspace(lo, hi, n0)
    r = Refiner(x0, [label(e) for e in x0], log=False, tol=tol).run(label)
    t_ref = time.perf_counter() - t
    b_ref = r.boundaries()
    n_dense = dense_grid_size(lo, hi, tol, False)
    t = time.perf_counter()
    grid = np.linspace(lo, hi, n_dense)
    b_dense = find_boundaries(grid, [label(e) for e in grid], log=False)
    t_dense = time.perf_counter() - t
    return dict(n_ref=r.n_told_, n_dense=n_dense, t_ref=t_ref, t_dense=t_dense, b_ref=b_ref, b_dense=b_dense)


def fmt_b(bs) -> str:
    return ", ".join(f"{b.left_phase}->{b.right_phase} @ {b.location:.3f} [{b.lower:.3f}, {b.upper:.3f}]" for b in bs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20, help="random planted boundaries per 1-D case")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--relu", action="store_true", help="also the ReLU-network oracle (~2 min more)")
    args = ap.parse_args()
    print(machine_line(), flush=True)
    rng = np.random.default_rng(args.seed)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass

    print(f"{'case':42s} {'refined':>9s} {'dense':>7s} {'dense/refined':>14s}  ok")
    for tol in (1e-2, 1e-3, 1e-4):
        med, nd, ok = planted_1d(args.reps, tol, False, rng)
        print(f"{f'1-D linear [0,1], tol {tol:g} (median of {args.reps})':42s} {med:9.1f} {nd:7d} {nd / med:14.1f}  {ok}")
    for tol in (1e-1, 1e-2):
        med, nd, ok = planted_1d(args.reps, tol, True, rng)
        print(f"{f'1-D log [1e-5,1], rel tol {tol:g} (median)':42s} {med:9.1f} {nd:7d} {nd / med:14.1f}  {ok}")
    for tol in (1e-2, 1e-3):
        n, nd, ok = planted_2d(tol)
        print(f"{f'2-D 21 rows x [0,1], tol {tol:g}':42s} {n:9d} {nd:7d} {nd / n:14.1f}  {ok}")

    def uv_label(e: float) -> str:
        return classify(RunTrajectory.from_dict(train_uv(e)))

    uv_cores = Cores("uv catapult oracle runs")
    with uv_cores:
        res = real_oracle(uv_label, 1.0, 5.0, 0.02, 5)
    same = len(res["b_ref"]) == len(res["b_dense"]) and all(
        abs(a.location - b.location) <= 0.02 for a, b in zip(res["b_ref"], res["b_dense"])
    )
    print(
        f"{'uv catapult, eta*lambda0 in [1,5], tol 0.02':42s} {res['n_ref']:9d} {res['n_dense']:7d} "
        f"{res['n_dense'] / res['n_ref']:14.1f}  {same}"
    )
    print(f"    wall time: refined {res['t_ref']:.2f} s, dense {res['t_dense']:.2f} s "
          f"(ratio {res['t_dense'] / res['t_ref']:.1f})")
    print(f"    refined: {fmt_b(res['b_ref'])}")
    print(f"    dense:   {fmt_b(res['b_dense'])}")
    print(uv_cores.line())

    if args.relu:
        def relu_label(e: float) -> str:
            return classify(RunTrajectory.from_dict(train_relu_teacher(e, width=2048, steps=300, ntk_every=20)))

        relu_cores = Cores("ReLU oracle runs")
        with relu_cores:
            res = real_oracle(relu_label, 1.5, 4.5, 0.05, 4)
        print(f"{'ReLU w=2048, eta*lambda0 in [1.5,4.5], tol 0.05':42s} {res['n_ref']:9d} {res['n_dense']:7d} "
              f"{res['n_dense'] / res['n_ref']:14.1f}")
        print(f"    wall time: refined {res['t_ref']:.1f} s, dense {res['t_dense']:.1f} s")
        print(relu_cores.line())
        print(f"    refined: {fmt_b(res['b_ref'])}")
        print(f"    dense:   {fmt_b(res['b_dense'])}")


if __name__ == "__main__":
    main()
