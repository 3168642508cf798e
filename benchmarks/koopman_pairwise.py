"""Benchmark: pairwise Wasserstein matrix of many Koopman spectra, and DMD on large D.

1. Distance matrix of N spectra with n eigenvalues each (default 2,000 x 10):
   raydyn's Ray fan-out (``raydyn.fanout.pairwise_distance_matrix``, end to end:
   object-store put, tasks on Ray's worker pool, assembly) versus the plain Python double
   loop over i < j calling ``cdist`` + ``scipy.optimize.linear_sum_assignment``
   per pair (the reference implementation's ``wass_dist``). By default the
   baseline times a random subset of pairs and extrapolates to all N (N-1)/2
   pairs (printed as such); ``--baseline-pairs 0`` runs the full loop.
2. ``raydyn.analysis.koopman.spectrum`` on a random-walk trajectory of D weights x
   T steps (default 10,000 x 1,000, 4 delays): wall time and peak memory.

Run from the repository root:  python benchmarks/koopman_pairwise.py [--help]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Ray starts workers at niceness 15 by default: on a shared machine they would lose the CPU to other
# processes while the baseline (this driver, niceness 0) does not (as in hmm_fits.py)
os.environ.setdefault("RAY_worker_niceness", "0")

from _machine import Cores, machine_line, process_cores, ray_cores_line  # noqa: E402

from raydyn.analysis.koopman import fit_dmd, pairwise_wasserstein  # noqa: E402


def random_spectra(n_spectra: int, n_eigs: int, seed: int) -> list[np.ndarray]:
    """Spectra like DMD's of real systems: conjugate pairs (plus one real value if n is odd)
    spread over the unit disc."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_spectra):
        k = n_eigs // 2
        r = np.sqrt(rng.uniform(0.05, 1.0, k))
        th = rng.uniform(0, np.pi, k)
        e = np.concatenate([r * np.exp(1j * th), r * np.exp(-1j * th)])
        if n_eigs % 2:
            e = np.append(e, rng.uniform(-1, 1))
        out.append(e)
    return out


def baseline_pair(e1: np.ndarray, e2: np.ndarray) -> float:
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    s1 = np.vstack([np.real(e1), np.imag(e1)])
    s2 = np.vstack([np.real(e2), np.imag(e2)])
    d = cdist(s1.T, s2.T)
    r, c = linear_sum_assignment(d)
    return d[r, c].mean()


def bench_pairwise(args) -> None:
    import ray

    from raydyn.fanout import pairwise_distance_matrix

    spectra = random_spectra(args.n_spectra, args.n_eigs, args.seed)
    n_pairs = args.n_spectra * (args.n_spectra - 1) // 2
    print(f"\n== pairwise Wasserstein: {args.n_spectra} spectra x {args.n_eigs} eigenvalues, {n_pairs:,} pairs")

    rng = np.random.default_rng(args.seed + 1)
    iu, ju = np.triu_indices(args.n_spectra, 1)
    if args.baseline_pairs and args.baseline_pairs < n_pairs:
        pick = rng.choice(n_pairs, size=args.baseline_pairs, replace=False)
        note = f"timed on {args.baseline_pairs:,} random pairs, extrapolated to {n_pairs:,}"
    else:
        pick = np.arange(n_pairs)
        note = "full double loop"
    t0, c0 = time.perf_counter(), time.process_time()
    pure = pairwise_wasserstein(spectra)
    t_pure, c_pure = time.perf_counter() - t0, time.process_time() - c0

    # baseline and fan-out alternate, so a change in machine load hits both alike
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    base_times, base_cpu, times, mat, base_vals = [], [], [], None, None
    base_cores, fan_cores = Cores("baseline loop"), Cores("Ray fan-out actors", "ray")
    try:
        print(ray_cores_line(), flush=True)
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            with base_cores:
                base_vals = np.array([baseline_pair(spectra[i], spectra[j]) for i, j in zip(iu[pick], ju[pick])])
            base_times.append((time.perf_counter() - t0) / pick.size * n_pairs)
            base_cpu.append((time.process_time() - c0) / pick.size * n_pairs)
            t0 = time.perf_counter()
            with fan_cores:
                mat = pairwise_distance_matrix(spectra, n_actors=args.num_cpus)
            times.append(time.perf_counter() - t0)
        print(fan_cores.line())
        print(base_cores.line())
        print(process_cores(c_pure, t_pure, "timed: pure kernel"))
        print(ray_cores_line("probe: after the timed part"), flush=True)
    finally:
        ray.shutdown()
    base = float(np.median(base_times))
    print(f"baseline  (loop i<j, cdist + linear_sum_assignment): median {base:8.2f} s  [{note}]")
    print(f"raydyn pure kernel, 1 process (pairwise_wasserstein):  {t_pure:8.2f} s  (1 run)")
    cpu_base = float(np.median(base_cpu))
    print(f"CPU time (insensitive to other load): baseline {cpu_base / n_pairs * 1e6:.2f} us/pair, "
          f"pure kernel {c_pure / n_pairs * 1e6:.2f} us/pair -> {cpu_base / c_pure:.1f}x per core")
    fan = float(np.median(times))
    err = float(np.abs(mat[iu[pick], ju[pick]] - base_vals).max())
    print(f"raydyn Ray fan-out (tasks, {args.num_cpus} CPUs, end to end):  median {fan:8.2f} s  "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
    print(f"max |fan-out - baseline| on the timed pairs: {err:.2e};  |fan-out - pure kernel|: "
          f"{float(np.abs(mat - pure).max()):.2e}")
    print(f"speed-up over baseline: {base / fan:6.1f}x  (Ray fan-out),  {base / t_pure:6.1f}x  (pure kernel, 1 process)")
    # the fan-out's speed-up as its two factors: the kernel's gain per core, and what the fan-out adds
    # to an ideal split of the kernel's CPU time over the Ray CPUs (put, tasks, transfer, assembly)
    ideal = c_pure / args.num_cpus
    print(f"per-core kernel gain (CPU time per pair, baseline / kernel): {cpu_base / c_pure:.1f}x  "
          f"({cpu_base / n_pairs * 1e6:.2f} / {c_pure / n_pairs * 1e6:.2f} us)")
    print(f"fan-out overhead (wall - kernel CPU / {args.num_cpus} = {ideal:.2f} s): median {fan - ideal:.2f} s, "
          f"runs {', '.join(f'{t - ideal:.2f}' for t in times)} (the first run includes the workers' imports); "
          f"worker CPU beyond the kernel {fan_cores.cpu / len(times) - c_pure:.2f} s a run")


@contextlib.contextmanager
def _blas_threads(n: int):
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def bench_dmd(args) -> None:
    d, t, k = args.dmd_d, args.dmd_t, args.dmd_delays
    print(f"\n== DMD spectrum: random walk, D={d:,} weights x T={t:,} steps, {k} delays")
    rng = np.random.default_rng(args.seed)
    walk = np.cumsum(rng.normal(scale=1e-2, size=(t, d)), axis=0)
    walk += rng.normal(size=d)  # an initialisation offset, as weights have
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    with _blas_threads(args.blas_threads):
        tracemalloc.start()
        t0 = time.perf_counter()
        c0 = time.process_time()
        res = fit_dmd(walk, k)
        elapsed, c_fit = time.perf_counter() - t0, time.process_time() - c0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fit_dmd: {elapsed:.2f} s (BLAS threads: {args.blas_threads or 'library default'}), route '{res.reduced}', rank {res.rank}, "
          f"|lambda|max {np.abs(res.eigenvalues).max():.6f}")
    print(process_cores(c_fit, elapsed, "timed: fit_dmd"))
    print(f"input {walk.nbytes / 1024**2:.0f} MiB; peak numpy allocations during fit "
          f"{peak / 1024**2:.0f} MiB (tracemalloc); process peak RSS {rss1:.0f} MiB "
          f"(was {rss0:.0f} MiB before the fit); a dense Hankel of the raw data would be "
          f"{d * (k + 1) * (t - k) * 8 / 1024**3:.1f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-spectra", type=int, default=2000)
    ap.add_argument("--n-eigs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-pairs", type=int, default=20000,
                    help="pairs timed for the baseline (0 = all pairs; slow)")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--dmd-d", type=int, default=10_000)
    ap.add_argument("--dmd-t", type=int, default=1_000)
    ap.add_argument("--dmd-delays", type=int, default=4)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads for the DMD fit (0 = library default). Multi-threaded "
                         "OpenBLAS LAPACK slows down badly on oversubscribed cores; Ray workers "
                         "run single-threaded too")
    ap.add_argument("--skip-dmd", action="store_true")
    ap.add_argument("--skip-pairwise", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(machine_line(), flush=True)
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs visible, load average {os.getloadavg()[0]:.1f}")
    if not args.skip_dmd:
        bench_dmd(args)  # first, so the peak RSS is not the Ray driver's
    if not args.skip_pairwise:
        bench_pairwise(args)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
