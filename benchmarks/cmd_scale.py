"""CMD at scale: post-hoc and online CMD on N parameters x T steps (float32, synthetic).

Run from the repo root::

    python benchmarks/cmd_scale.py                 # default 1,000,000 x 200
    python benchmarks/cmd_scale.py --n 200000 --t 100 --repeats 3

Synthetic data: ``--modes`` random-walk references, ``w_i(t) = a_i r_m(t) + b_i`` plus
Gaussian noise of std ``--noise`` times the RMS of the clean weights, stored float32.

Time: wall-clock (time.perf_counter) of runs without memory tracing; median over
``--repeats``.  Memory: tracemalloc (numpy reports its buffers to it), in one separate
traced run; the figures are traced bytes allocated by CMD itself, i.e. excluding the
(N, T) float32 input which exists before the run.  ru_maxrss (peak resident set of the
whole process, input included) is printed at the end as a cross-check.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import Cores, machine_line  # noqa: E402

from raydyn.analysis.cmd import OnlineCMD, decompose, fit_fixed_modes  # noqa: E402

MiB = 1024 * 1024


def make_weights(n: int, t: int, modes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) float32 planted trajectories, built in row chunks (no float64 copy of it all)."""
    rng = np.random.default_rng(seed)
    refs = np.cumsum(rng.normal(size=(modes, t)), axis=1)
    labels = rng.integers(0, modes, n)
    a = rng.choice([-1.0, 1.0], n) * rng.uniform(0.5, 2.0, n)
    b = rng.normal(size=n)
    w = np.empty((n, t), dtype=np.float32)
    rows = max(1, (1 << 22) // t)
    sq = 0.0
    for s in range(0, n, rows):
        e = min(n, s + rows)
        chunk = a[s:e, None] * refs[labels[s:e]] + b[s:e, None]
        w[s:e] = chunk
        sq += float(np.einsum("ij,ij->", chunk, chunk))
    sigma = noise * np.sqrt(sq / (n * t))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        w[s:e] += (sigma * rng.standard_normal(size=(e - s, t))).astype(np.float32)
    return w, labels


def run_online(w: np.ndarray, args: argparse.Namespace, checkpoints: tuple[int, ...] = (),
               traced: bool = False) -> tuple[OnlineCMD, list[float], dict[int, float]]:
    online = OnlineCMD(n_modes=args.online_modes, tolerance=args.tolerance, warmup=args.warmup,
                       n_samples=args.samples, random_state=0)
    step_times: list[float] = []
    mem: dict[int, float] = {}
    for t in range(w.shape[1]):
        col = np.ascontiguousarray(w[:, t])  # what a recorder hands over: one flat vector
        t0 = time.perf_counter()
        online.update(col)
        step_times.append(time.perf_counter() - t0)
        del col
        if traced and (t + 1) in checkpoints:
            mem[t + 1] = tracemalloc.get_traced_memory()[0] / MiB
    return online, step_times, mem


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="parameters N")
    p.add_argument("--t", type=int, default=200, help="recorded steps T")
    p.add_argument("--modes", type=int, default=5, help="planted modes")
    p.add_argument("--noise", type=float, default=1e-3, help="noise std relative to clean RMS")
    p.add_argument("--tolerance", type=float, default=2e-3)
    p.add_argument("--n-modes", type=int, default=None, help="fixed M (default: automatic)")
    p.add_argument("--samples", type=int, default=1000, help="K sampled parameters")
    p.add_argument("--warmup", type=int, default=20, help="online warm-up records")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median printed)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(machine_line(), flush=True)

    print(f"CMD scale benchmark: N={args.n:,} T={args.t} float32 ({args.n * args.t * 4 / MiB:.0f} MiB), "
          f"{args.modes} planted modes, noise {args.noise:g}, tolerance {args.tolerance:g}, K={args.samples}")
    t0 = time.perf_counter()
    w, labels = make_weights(args.n, args.t, args.modes, args.noise, args.seed)
    print(f"data generated in {time.perf_counter() - t0:.1f} s")

    # ---- post-hoc: timing (untraced) -------------------------------------------------
    post_times = []
    post_cores = Cores("post-hoc decompose")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with post_cores:
            res = decompose(w, n_modes=args.n_modes, tolerance=args.tolerance, n_samples=args.samples,
                        random_state=0)
        post_times.append(time.perf_counter() - t0)
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(labels, res.assignment)
    print(f"\npost-hoc decompose: M={res.n_modes} error={res.error:.3e} ARI={ari:.4f} "
          f"(error curve M=1..{min(6, res.error_curve.size)}: "
          + ", ".join(f"{e:.2e}" for e in res.error_curve[:6]) + ")")
    print(f"  time median {statistics.median(post_times):.2f} s over {args.repeats} run(s)")
    print(post_cores.line())

    # ---- online: timing (untraced) ---------------------------------------------------
    # The warm-up window (first records) has a smaller signal than the whole run, so the
    # automatic choice there would need a looser tolerance: use the post-hoc M instead.
    args.online_modes = args.n_modes if args.n_modes is not None else res.n_modes
    on_totals, warm_steps, later_steps = [], [], []
    online_cores = Cores("online CMD")
    for _ in range(args.repeats):
        with online_cores:
            online, st, _ = run_online(w, args)
        on_totals.append(sum(st))
        warm_steps.append(st[args.warmup - 1])
        later_steps.extend(st[args.warmup:])
    ores = online.result()
    print(f"\nonline CMD (warm-up {args.warmup}, n_modes={args.online_modes}): M={ores.n_modes} "
          f"error={ores.error:.3e} ARI={adjusted_rand_score(labels, ores.assignment):.4f}")
    print(f"  total update time median {statistics.median(on_totals):.2f} s; warm-up decompose step "
          f"{statistics.median(warm_steps):.2f} s; later update median "
          f"{1e3 * statistics.median(later_steps):.2f} ms/step")
    print(online_cores.line())
    t0 = time.perf_counter()
    ores = online.result()
    print(f"  result() {time.perf_counter() - t0:.2f} s")
    print(f"  ratio online total / post-hoc (medians): "
          f"{statistics.median(on_totals) / statistics.median(post_times):.2f}")
    check = fit_fixed_modes(w, online.reference_index_, online.assignment_)
    print(f"  vs post-hoc with the same modes: max|da|={np.abs(ores.a - check.a).max():.1e} "
          f"max|db|={np.abs(ores.b - check.b).max():.1e} "
          f"error {ores.error:.6e} vs {check.error:.6e}")
    del check

    # ---- memory (traced runs) --------------------------------------------------------
    tracemalloc.start()
    tracemalloc.reset_peak()
    res = decompose(w, n_modes=args.n_modes, tolerance=args.tolerance, n_samples=args.samples,
                    random_state=0)
    _, post_peak = tracemalloc.get_traced_memory()
    res_size = (res.a.nbytes + res.b.nbytes + res.assignment.nbytes + res.layer_index.nbytes) / MiB
    del res
    tracemalloc.stop()

    tracemalloc.start()
    checkpoints = tuple(sorted({args.warmup, args.warmup + 5, args.t // 4, args.t // 2, args.t}))
    online, _, mem = run_online(w, args, checkpoints, traced=True)
    _, online_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print("\nmemory (tracemalloc, CMD's own allocations, input excluded):")
    print(f"  post-hoc peak {post_peak / MiB:.0f} MiB (input {w.nbytes / MiB:.0f} MiB; "
          f"result arrays {res_size:.0f} MiB; ratio peak/input {post_peak / w.nbytes:.2f})")
    print(f"  online peak {online_peak / MiB:.0f} MiB (during the warm-up decompose)")
    print("  online state held after step: " + ", ".join(f"{k}: {v:.1f} MiB" for k, v in mem.items()))
    later = [k for k in mem if k > args.warmup]
    if len(later) >= 2:
        growth = mem[max(later)] - mem[min(later)]
        print(f"  growth from step {min(later)} to {max(later)}: {growth * 1024:.1f} KiB "
              f"(the M={online.n_modes_} reference trajectories grow by M*8 B per step)")
    print(f"\nru_maxrss (whole process, input included): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
