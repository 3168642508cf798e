"""Load: a sweep of 2,000 tiny runs through the CLI, the driver's peak memory, and a query over the result.

    python benchmarks/load_2000.py                     # 200 and 2,000 runs side by side (a few minutes on 2 cores)
    python benchmarks/load_2000.py --sizes 2000 --query-repeats 9

For each size: `raydyn sweep run` (embedded Ray, --num-cpus 2) in a subprocess trains teacher-student
regression MLPs (width 4, 20 steps, record_every 10, population_size 250); the driver's peak RSS is
its VmHWM from /proc/<pid>/status, polled until it exits (the CLI process only; Ray's own daemons
and trial workers are other processes). Then a filtered aggregate over the metrics table is timed
in-process with Store.sql and as a whole `raydyn query` process (interpreter start-up included).
Prints medians, and the driver-memory ratio between the largest and the smallest size.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import Cores, machine_line  # noqa: E402

QUERY = ("SELECT r.lr, avg(m.train_loss) AS final_loss, count(*) AS runs FROM metrics m JOIN runs r USING (run_id) "
         "WHERE m.step = 20 AND r.lr < 0.05 GROUP BY r.lr ORDER BY r.lr")


def sweep_text(name: str, runs: int, pop: int) -> str:
    n_lr = 20
    lrs = [round(0.005 * (i + 1), 4) for i in range(n_lr)]
    seeds = list(range(max(1, runs // n_lr)))
    return f"""
name: {name}
task: {{dataset: teacher, model: mlp, depth: 1, width: 4, data: {{n_train: 64, n_test: 32, d_in: 4}}}}
train: {{steps: 20, batch_size: 16, optimizer: sgd, lr: 0.05, record_every: 10}}
method: grid
parameters:
  lr: {{values: {lrs}}}
  seed: {{values: {seeds}}}
resources: {{cpu: 1, population_size: {pop}}}
"""


def vm_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_sweep_cli(sweep_file: Path, store: Path, num_cpus: int, env: dict[str, str], timeout: float) -> tuple[float, int, str]:
    """(wall seconds, driver peak RSS in KiB, output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "raydyn.cli", "sweep", "run", str(sweep_file), "--store", str(store),
                             "--num-cpus", str(num_cpus)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(ROOT))
    peak = 0
    out_chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        hwm = vm_hwm_kib(proc.pid)  # high-water mark: the last read before exit is the peak
        if hwm:
            peak = max(peak, hwm)
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            raise TimeoutError(f"sweep did not finish in {timeout} s")
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    out = "".join(out_chunks)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep failed ({proc.returncode}):\n{out[-3000:]}")
    return wall, peak, out[-400:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="200,2000", help="comma-separated numbers of runs")
    ap.add_argument("--population-size", type=int, default=250)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--query-repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--keep", action="store_true", help="keep the stores (printed) instead of deleting them")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    from raydyn.store import open_store

    work = Path(tempfile.mkdtemp(prefix="raydyn-load-"))
    ray_tmp = tempfile.mkdtemp(prefix="rdl", dir="/tmp")  # a private Ray temp dir: short, not the machine's
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=str(ROOT))
    rows = []
    try:
        for n in [int(s) for s in args.sizes.split(",")]:
            name = f"load{n}"
            f = work / f"{name}.yaml"
            f.write_text(sweep_text(name, n, args.population_size))
            store_dir = work / f"store{n}"
            # the Ray workers of the CLI's embedded Ray are this process's descendants: sampled from /proc
            meter = Cores(f"CLI sweep of {n} runs, its Ray start-up included", "ray", ray=args.num_cpus)
            with meter:
                wall, peak_kib, tail = run_sweep_cli(f, store_dir, args.num_cpus, env, args.timeout)
            print(meter.line(), flush=True)
            store = open_store(store_dir)
            n_runs = store.runs(sweep=name, columns=["run_id"]).num_rows
            n_metrics = store.metrics(sweep=name, columns=["run_id"]).num_rows
            assert n_runs == n, f"{n_runs} runs in the store, expected {n}"
            sql_times = []
            for _ in range(args.query_repeats):
                t = time.perf_counter()
                res = open_store(store_dir).sql(QUERY)  # a fresh Store each time: no cached footers
                sql_times.append(time.perf_counter() - t)
            cli_times = []
            for _ in range(args.query_repeats):
                t = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "raydyn.cli", "query", QUERY, "--store", str(store_dir),
                                    "--format", "csv"], capture_output=True, text=True, env=env, cwd=str(ROOT),
                                   timeout=120)
                cli_times.append(time.perf_counter() - t)
                assert r.returncode == 0, r.stderr
            rows.append((n, n_metrics, wall, peak_kib / 1024, statistics.median(sql_times),
                         statistics.median(cli_times), res.num_rows))
            print(f"{n} runs: {tail.strip().splitlines()[-2] if tail.strip() else ''}", flush=True)
    finally:
        if args.keep:
            print(f"stores kept under {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    print()
    print(f"{'runs':>6} {'metric rows':>11} {'sweep wall s':>12} {'driver peak RSS MiB':>20} "
          f"{'Store.sql median s':>19} {'raydyn query median s':>22}")
    for n, nm, wall, rss, sql_s, cli_s, _ in rows:
        print(f"{n:>6} {nm:>11} {wall:>12.1f} {rss:>20.0f} {sql_s:>19.3f} {cli_s:>22.2f}")
    if len(rows) > 1:
        (n0, _, w0, r0, *_), (n1, _, w1, r1, *_) = rows[0], rows[-1]
        print(f"\n{n1 // n0}x the runs: driver peak RSS x{r1 / r0:.2f}, sweep wall time x{w1 / w0:.2f}")
    worst = max(r[4] for r in rows)
    print(f"filtered aggregate (Store.sql) median <= {worst:.3f} s: {'OK' if worst < 1 else 'TOO SLOW'} (target < 1 s)")


if __name__ == "__main__":
    main()
