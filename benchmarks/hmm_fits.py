"""Benchmark: HMM model selection over many groups, sequential loop vs Ray tasks.

Each *group* stands for one cell of a sweep (e.g. one hyperparameter setting): a set of
training runs whose metric sequences get their own HMM. For every group we fit
k = 1..max_states with `restarts` random restarts (the independent ``fit_one`` jobs of
:mod:`raydyn.analysis.hmm`), then ``select`` in the driver.

    python benchmarks/hmm_fits.py                 # the issue's size: 64 x 6 x 3 = 1152 fits, ~5 min a repeat on 2 cores
    python benchmarks/hmm_fits.py --groups 16     # a quicker look: ~2-3 min

Fairness: BLAS/OpenMP threads are pinned to 1 for BOTH paths (environment variables set
before numpy is imported, inherited by Ray workers; ``fit_one`` additionally limits BLAS
to one thread), and Ray workers run at the driver's priority (``RAY_worker_niceness=0``;
Ray's default is 15). The only difference is that the Ray path runs ``num_cpus`` fits at once.
Ray workers are started and warmed up before timing; ``ray.init`` time is printed apart.
Both paths must give identical selections (checked).

The bound (``--no-bound`` skips it): the same fits, in the same order, on a plain process pool
(``concurrent.futures``, ``num_cpus`` spawned processes, warmed up, no Ray). It is the most any
fan-out over ``num_cpus`` cores gets from this machine for these fits: when two fits at once each run
slower than one alone (shared caches, clocks), it is below ``num_cpus``x whatever the executor does.
It is timed in the same rounds as the two other paths (their order rotates each repeat), so
"sequential / pool" is this machine's ceiling for the HMM target and "ray / pool" is what Ray adds.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"
# Ray starts workers at niceness 15 by default; on a shared machine they then lose the CPU to
# every other process while the sequential path (this driver, niceness 0) does not.
os.environ.setdefault("RAY_worker_niceness", "0")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cores_line, machine_line, ray_cores_line  # noqa: E402
from raydyn.analysis.hmm import HMMData, fit_one, fit_plan, prepare, select  # noqa: E402


def make_groups(n_groups: int, n_seq: int, length: int, n_features: int, seed: int = 0) -> list[HMMData]:
    """Synthetic groups: runs drawn from a random sticky 3-state Gaussian HMM per group,
    drifting left to right like training metrics."""
    from hmmlearn.hmm import GaussianHMM

    rng = np.random.default_rng(seed)
    groups = []
    for g in range(n_groups):
        m = GaussianHMM(3, covariance_type="diag", init_params="")
        m.startprob_ = np.array([1.0, 0.0, 0.0])
        m.transmat_ = np.array([[0.95, 0.05, 0.0], [0.0, 0.95, 0.05], [0.02, 0.0, 0.98]])
        m.means_ = rng.normal(0, 3, size=(3, n_features))
        m.covars_ = rng.uniform(0.5, 1.5, size=(3, n_features))
        runs = [m.sample(length, random_state=1000 * g + i)[0] for i in range(n_seq)]
        groups.append(prepare(runs, held_out=0.2, random_state=g))
    return groups


def _cpu_seconds(pids) -> float:
    """User+system CPU seconds of processes, from /proc (Linux); NaN where unavailable."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _worker_pid(_=None) -> int:
    time.sleep(0.01)  # long enough that every worker (Ray's or the pool's) gets one of the calls
    return os.getpid()


def run_sequential(groups, jobs, cov):
    per_group = []
    results = []
    t0, c0 = time.perf_counter(), time.process_time()
    for data in groups:
        tg = time.perf_counter()
        fits = [fit_one(data.train_sequences, k, s, cov) for k, s in jobs]
        results.append(select(data, fits))
        per_group.append(time.perf_counter() - tg)
    wall = time.perf_counter() - t0
    return wall, (time.process_time() - c0) / wall, per_group, results


def _fit_plain(payload):
    train, k, seed, cov = payload
    return fit_one(train, k, seed, cov)


def _fit(payload, shared):  # map_tasks' signature
    return _fit_plain(payload)


def _plan(groups, jobs, cov, largest_k_first=True):
    payloads = [(data.train_sequences, k, s, cov) for data in groups for k, s in jobs]
    order = sorted(range(len(payloads)), key=lambda i: -payloads[i][1]) if largest_k_first else list(range(len(payloads)))
    return payloads, order


def run_pool(groups, jobs, cov, pool, pool_pids, largest_k_first=True):
    """The bound: the same payloads in the same order on a plain process pool, results back in plan order."""
    c0 = _cpu_seconds(pool_pids)
    t0 = time.perf_counter()
    payloads, order = _plan(groups, jobs, cov, largest_k_first)
    futures = {i: pool.submit(_fit_plain, payloads[i]) for i in order}
    fits = [futures[i].result() for i in range(len(payloads))]
    n = len(jobs)
    results = [select(data, fits[i * n:(i + 1) * n]) for i, data in enumerate(groups)]
    wall = time.perf_counter() - t0
    return wall, (_cpu_seconds(pool_pids) - c0) / wall, results


def run_ray(groups, jobs, cov, remote_fit, worker_pids, largest_k_first=True):
    """raydyn's fan-out (raydyn.fanout.map_tasks, as `raydyn analyze hmm` uses it): one payload per fit
    (map_tasks puts several short ones in one task), submitted largest k first as the job plans them
    (the outcomes stay in payload order)."""
    from raydyn.fanout import map_tasks

    c0 = _cpu_seconds(worker_pids)
    t0 = time.perf_counter()
    payloads, order = _plan(groups, jobs, cov, largest_k_first)
    outcomes = map_tasks(_fit, payloads, order=order)
    assert not any(o.error for o in outcomes), [o.error for o in outcomes if o.error][:1]
    fits = [o.value for o in outcomes]
    n = len(jobs)
    results = [select(data, fits[i * n:(i + 1) * n]) for i, data in enumerate(groups)]
    wall = time.perf_counter() - t0
    return wall, (_cpu_seconds(worker_pids) - c0) / wall, results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=64, help="number of groups")
    ap.add_argument("--max-states", type=int, default=6)
    ap.add_argument("--restarts", type=int, default=3)
    ap.add_argument("--n-seq", type=int, default=10, help="runs per group")
    ap.add_argument("--length", type=int, default=100, help="time steps per run")
    ap.add_argument("--features", type=int, default=6)
    ap.add_argument("--covariance-type", default="full", choices=("full", "diag"))
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two paths this many times")
    ap.add_argument("--plan-order", action="store_true",
                    help="submit the Ray tasks in plan order (group, k, restart) instead of largest k first")
    ap.add_argument("--no-bound", action="store_true", help="skip the plain process pool (the machine's bound)")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)

    import ray

    groups = make_groups(args.groups, args.n_seq, args.length, args.features)
    jobs = fit_plan(args.max_states, args.restarts, random_state=0)
    n_fits = len(groups) * len(jobs)
    print(
        f"{len(groups)} groups x {len(jobs)} fits (k=1..{args.max_states} x {args.restarts} restarts) = {n_fits} fits; "
        f"{args.n_seq} runs x {args.length} steps x {args.features} features per group; "
        f"{args.covariance_type} covariance; BLAS/OpenMP threads = 1 in both paths"
    )

    pool = pool_pids = None
    if not args.no_bound:  # started before Ray: no Ray threads in the processes it spawns from
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        pool = ProcessPoolExecutor(args.num_cpus, mp_context=multiprocessing.get_context("spawn"))
        list(pool.map(_fit_plain, [(groups[0].train_sequences, 2, s, args.covariance_type)
                                   for s in range(2 * args.num_cpus)]))
        pool_pids = set(pool.map(_worker_pid, range(8 * args.num_cpus)))
        print(f"process pool: {len(pool_pids)} processes warmed up (not counted below)")

    t = time.perf_counter()
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    print(ray_cores_line(), flush=True)  # before the worker pids below are collected
    remote_fit = ray.remote(num_cpus=1)(fit_one)
    _pid = ray.remote(num_cpus=1)(_worker_pid)
    # warm-up: start one worker per CPU and import hmmlearn/sklearn there
    ray.get([remote_fit.remote(groups[0].train_sequences, 2, s, args.covariance_type) for s in range(2 * args.num_cpus)])
    worker_pids = set(ray.get([_pid.remote() for _ in range(4 * args.num_cpus)]))
    print(f"ray.init + worker warm-up: {time.perf_counter() - t:.1f} s (not counted below)")

    seq_times, ray_times, pool_times, group_medians, seq_cores, ray_cores_all, pool_cores = [], [], [], [], [], [], []
    cpu_parts = []  # (sequential CPU, Ray workers' CPU, Ray wall) per repeat
    paths = ["seq", "ray"] + ([] if pool is None else ["pool"])
    try:
        for rep in range(args.repeats):
            load0 = os.getloadavg()[0]
            out = {}
            # rotate which path goes first, so a drift in machine load favours none
            for name in paths[rep % len(paths):] + paths[:rep % len(paths)]:
                if name == "seq":
                    out[name] = run_sequential(groups, jobs, args.covariance_type)
                elif name == "ray":
                    out[name] = run_ray(groups, jobs, args.covariance_type, remote_fit, worker_pids, not args.plan_order)
                else:
                    out[name] = run_pool(groups, jobs, args.covariance_type, pool, pool_pids, not args.plan_order)
            load1 = os.getloadavg()[0]
            ts, cpu_share, per_group, res_seq = out["seq"]
            tr, ray_cores, res_ray = out["ray"]
            for name in paths[1:]:
                for a, b in zip(res_seq, out[name][-1]):
                    assert a.n_states == b.n_states and a.bic == b.bic, f"sequential and {name} selections differ"
            seq_times.append(ts)
            cpu_parts.append((ts * cpu_share, tr * ray_cores, tr))
            ray_times.append(tr)
            group_medians.append(statistics.median(per_group))
            seq_cores.append(cpu_share)
            ray_cores_all.append(ray_cores)
            pool_part = ""
            if "pool" in out:
                tp, pc, _ = out["pool"]
                pool_times.append(tp)
                pool_cores.append(pc)
                pool_part = f", pool {tp:.1f} s (bound {ts / tp:.2f}x)"
            print(
                f"repeat {rep}: sequential {ts:.1f} s, ray {tr:.1f} s, ratio {ts / tr:.2f}x{pool_part} "
                f"(CPU cores actually used: sequential {cpu_share:.2f}, ray workers {ray_cores:.2f}; "
                f"1-min load {load0:.1f} -> {load1:.1f})"
            )
            if cpu_share < 0.9 or ray_cores < 0.9 * args.num_cpus or max(load0, load1) > args.num_cpus + 0.5:
                print("  warning: other processes share these CPUs; the ratio understates the speed-up")
        # the cores got in the timed sections (the /proc CPU times above), medians over the repeats
        print(cores_line(statistics.median(ray_cores_all), "timed: ray tasks", ray=args.num_cpus))
        print(cores_line(statistics.median(seq_cores), "timed: sequential", who="process"))
        if pool_cores:
            print(cores_line(statistics.median(pool_cores), "timed: process pool"))
        print(ray_cores_line("probe: after the timed part"), flush=True)
    finally:
        ray.shutdown()
        if pool is not None:
            pool.shutdown()

    ks = [r.n_states for r in res_seq]
    ms, mr = statistics.median(seq_times), statistics.median(ray_times)
    print(f"selected k per group: {dict(sorted({k: ks.count(k) for k in set(ks)}.items()))} (identical on every path)")
    print(f"median per-group time, sequential: {statistics.median(group_medians):.2f} s")
    print(f"median total  sequential: {ms:8.1f} s   ({1000 * ms / n_fits:.0f} ms per fit)")
    print(f"median total  ray tasks:  {mr:8.1f} s   ({1000 * mr / n_fits:.0f} ms per fit, {args.num_cpus} CPUs)")
    print(f"speed-up sequential / ray: {ms / mr:.2f}x  (ideal: {args.num_cpus}x; os.cpu_count()={os.cpu_count()})")
    # what separates it from the ideal: the fits cost more CPU on the Ray path (concurrent fits, Ray's
    # per-task work), and the workers idle part of the time (gaps, the last fits, other load)
    c_seq, c_ray, w_ray = (statistics.median(x) for x in zip(*cpu_parts))
    if pool_times:
        mp = statistics.median(pool_times)
        print(f"median total  process pool: {mp:7.1f} s   (the same fits on {args.num_cpus} plain processes, no Ray)")
        print(f"bound sequential / process pool: {ms / mp:.2f}x  (this machine's most for these fits on "
              f"{args.num_cpus} cores); ray reaches {mp / mr:.1%} of it")
        c_pool = statistics.median(c * w for c, w in zip(pool_cores, pool_times))
        print(f"pool vs ideal: workers' CPU / sequential CPU {c_pool / c_seq:.3f}; workers idle "
              f"{1 - c_pool / (args.num_cpus * mp):.1%} of {args.num_cpus} x the pool wall time (medians)")
    print(f"ray vs ideal: workers' CPU / sequential CPU {c_ray / c_seq:.3f}; workers idle "
          f"{1 - c_ray / (args.num_cpus * w_ray):.1%} of {args.num_cpus} x the Ray wall time (medians)")


if __name__ == "__main__":
    main()
