"""Time a filtered aggregate over a sweep-sized metrics table in a raydyn store.

Writes a store to a temp dir: ``--runs`` runs x ``--steps`` steps of metrics
(loss, acc, grad_norm) spread over ``--parts`` part files, plus the runs table,
then prints the median wall time of

- ``Store.sql``: mean loss over the last 10 steps per run, for runs with lr < 0.05
  (a join of runs and metrics, filtered, grouped);
- ``Store.sql``: the same aggregate over metrics alone (no join);
- ``Store.metrics(filter=...)`` + a pyarrow group_by (the Python-API route);
- the same two on a fresh Store object per call ("cold": no remembered footers);
- ``pyarrow.dataset`` directly over the same files (the floor: no store logic).

Default sizes are the integration target (2,000 runs x 50 steps, 100 parts);
run ``python benchmarks/store_query.py --help`` for flags.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import Cores, machine_line  # noqa: E402

from raydyn.store import open_store  # noqa: E402


def build(root: str, n_runs: int, n_steps: int, n_parts: int, seed: int) -> None:
    store = open_store(root, write=True)
    rng = np.random.default_rng(seed)
    per_part = int(np.ceil(n_runs / n_parts))
    for p in range(n_parts):
        ids = [f"r{i:05d}" for i in range(p * per_part, min(n_runs, (p + 1) * per_part))]
        if not ids:
            break
        n = len(ids)
        lr = rng.uniform(0.001, 0.1, n)
        runs = pa.table(
            {
                "run_id": ids,
                "population": [f"pop{p}"] * n,
                "status": pa.array(rng.choice(["completed", "diverged"], n).tolist()),
                "seed": pa.array(rng.integers(0, 2**31, n), pa.int64()),
                "steps_done": pa.array(np.full(n, n_steps), pa.int64()),
                "wall_time_s": rng.uniform(1, 10, n),
                "config_json": [json.dumps({"lr": float(x)}) for x in lr],
                "weights_layout": ["{}"] * n,
                "versions": ["{}"] * n,
                "lr": lr,
                "final_loss": rng.uniform(0, 1, n),
            }
        )
        rows = n * n_steps
        metrics = pa.table(
            {
                "run_id": np.repeat(np.array(ids, dtype=object), n_steps).tolist(),
                "step": pa.array(np.tile(np.arange(n_steps), n), pa.int64()),
                "loss": rng.uniform(0, 1, rows),
                "acc": rng.uniform(0, 1, rows),
                "grad_norm": rng.uniform(0, 5, rows),
            }
        )
        store.write_runs("bench", f"{p:04d}", runs=runs, metrics=metrics)


def median_time(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (also the value returned for cross-checking)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--parts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="store directory (default: a fresh temp dir)")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or str(Path(tmp) / "store")
        t0 = time.perf_counter()
        build(root, args.runs, args.steps, args.parts, args.seed)
        print(f"wrote {args.runs} runs x {args.steps} steps in {args.parts} parts in {time.perf_counter() - t0:.2f} s")
        store = open_store(root)
        last = args.steps - 10

        def sql_join():
            return store.sql(
                f"""SELECT m.run_id, avg(m.loss) AS mean_loss FROM metrics m
                    JOIN runs r ON r.run_id = m.run_id AND r.sweep = m.sweep
                    WHERE m.sweep = 'bench' AND m.step >= {last} AND r.lr < 0.05
                    GROUP BY m.run_id ORDER BY m.run_id"""
            )

        def sql_metrics():
            return store.sql(
                f"""SELECT run_id, avg(loss) AS mean_loss FROM metrics
                    WHERE sweep = 'bench' AND step >= {last} GROUP BY run_id ORDER BY run_id"""
            )

        def api():
            t = store.metrics(sweep="bench", columns=["run_id", "loss"], filter=pc.field("step") >= last)
            return t.group_by("run_id").aggregate([("loss", "mean")]).sort_by("run_id")

        def api_cold():  # a fresh Store each call: every footer read again (first query of a session)
            t = open_store(root).metrics(sweep="bench", columns=["run_id", "loss"], filter=pc.field("step") >= last)
            return t.group_by("run_id").aggregate([("loss", "mean")]).sort_by("run_id")

        def sql_cold():
            return open_store(root).sql(
                f"""SELECT run_id, avg(loss) AS mean_loss FROM metrics
                    WHERE sweep = 'bench' AND step >= {last} GROUP BY run_id ORDER BY run_id"""
            )

        def raw():
            d = ds.dataset(f"{root}/metrics", format="parquet", partitioning="hive")
            t = d.to_table(columns=["run_id", "loss"], filter=(pc.field("step") >= last))
            return t.group_by("run_id").aggregate([("loss", "mean")]).sort_by("run_id")

        results = {}
        meter = Cores("the queries")
        for name, fn in (("Store.sql (join runs+metrics)", sql_join), ("Store.sql (metrics only)", sql_metrics),
                         ("Store.metrics(filter=) + group_by", api),
                         ("Store.sql, cold (new Store)", sql_cold),
                         ("Store.metrics, cold (new Store)", api_cold), ("pyarrow.dataset floor", raw)):
            with meter:
                results[name] = median_time(fn, args.repeats)

        a = results["Store.sql (metrics only)"][1]
        b = results["Store.metrics(filter=) + group_by"][1]
        c = results["pyarrow.dataset floor"][1]
        assert a.num_rows == b.num_rows == c.num_rows == args.runs
        np.testing.assert_allclose(a.column("mean_loss").to_numpy(), b.column("loss_mean").to_numpy(), rtol=1e-12)
        floor = results["pyarrow.dataset floor"][0]
        print(meter.line())
        for name, (t, out) in results.items():
            print(f"{name:36s} median {t * 1e3:8.1f} ms  ({t / floor:5.2f}x floor)  rows={out.num_rows}")


if __name__ == "__main__":
    main()
