"""Time `raydyn curves` (curve_table in DuckDB + the drawing) on a 10^4-run sweep.

Writes a store to a temp dir: ``--runs`` runs (lr x width x seed) x ``--steps`` steps of
metrics (test_loss, train_loss, with a few NaN steps), written with ``Store.write_part`` in
``--parts`` parts, plus the runs table (the RUNS_REQUIRED columns and lr/width/seed) and a
tracked-sweep record so the CLI resolves the sweep name. Then prints the median of
``--repeat`` wall times of

- the whole command, in-process (``raydyn curves SWEEP --metric test_loss --group-by lr --facet
  width --band iqr --log-y --out curves.png``: sweep lookup, the query, the drawing, the PNG);
- ``curve_table`` alone (the DuckDB aggregation) and the drawing alone.

Target: the command under 10 s at 10^4 runs x 50 steps (the default sizes).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import Cores, machine_line  # noqa: E402

from raydyn.store import open_store  # noqa: E402

TARGET_S = 10.0
LRS = [1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0]
WIDTHS = [16, 32, 64, 128, 256]


def build(root: str, n_runs: int, n_steps: int, n_parts: int, seed: int = 0) -> None:
    from raydyn.track import tracked_sweep_text

    store = open_store(root)
    store.put_sweep("big", tracked_sweep_text("big"), {"kind": "tracked", "method": "tracked"})
    rng = np.random.default_rng(seed)
    i = np.arange(n_runs)
    lr = np.array(LRS)[i % len(LRS)]
    width = np.array(WIDTHS)[(i // len(LRS)) % len(WIDTHS)]
    seeds = i // (len(LRS) * len(WIDTHS))
    ids = [f"r{k:05d}" for k in i]
    store.write_part("runs", "big", "all", pa.table({
        "run_id": ids, "population": ids, "status": ["completed"] * n_runs,
        "seed": pa.array(seeds, pa.int64()), "steps_done": pa.array(np.full(n_runs, n_steps), pa.int64()),
        "wall_time_s": rng.uniform(1, 10, n_runs),
        "config_json": [json.dumps({"lr": float(a), "width": int(b), "seed": int(c)}) for a, b, c in zip(lr, width, seeds)],
        "weights_layout": ["{}"] * n_runs, "versions": ["{}"] * n_runs,
        "lr": lr, "width": pa.array(width, pa.int64()),
    }))
    steps = np.arange(n_steps, dtype=np.int64) * 10
    per_part = int(np.ceil(n_runs / n_parts))
    for p in range(n_parts):
        sel = i[p * per_part:(p + 1) * per_part]
        if not sel.size:
            break
        t = np.tile(steps, sel.size)
        r = np.repeat(sel, n_steps)
        loss = np.exp(-lr[r] * t / 50) * (1 + 64 / width[r]) + rng.normal(0, 0.02, t.size) ** 2
        loss[rng.random(t.size) < 1e-3] = np.nan  # a few non-finite steps, skipped by the query
        store.write_part("metrics", "big", f"m{p:03d}", pa.table({
            "run_id": pa.array([ids[k] for k in r]), "step": pa.array(t), "test_loss": loss,
            "train_loss": loss * 0.9}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(machine_line(), flush=True)

    from typer.testing import CliRunner

    from raydyn.cli import app
    from raydyn.aggregate.curves import curve_table
    from raydyn.plots.curves import draw_curves

    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "store")
        t0 = time.perf_counter()
        build(root, a.runs, a.steps, a.parts)
        print(f"built {a.runs} runs x {a.steps} steps ({a.runs * a.steps} metric rows, {a.parts} parts) "
              f"in {time.perf_counter() - t0:.1f}s")
        out = Path(tmp) / "curves.png"
        args = ["curves", "big", "--metric", "test_loss", "--group-by", "lr", "--facet", "width", "--band", "iqr",
                "--log-y", "--out", str(out), "--store", root]
        cmd, query, draw = [], [], []
        meter = Cores("raydyn curves command")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            with meter:
                r = CliRunner().invoke(app, args)
            cmd.append(time.perf_counter() - t0)
            if r.exit_code != 0:
                raise SystemExit(f"raydyn curves failed: {r.output}{r.exception!r}")
            st = open_store(root)
            t0 = time.perf_counter()
            table = curve_table(st, "big", "test_loss", "lr", "width", "iqr")
            query.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            draw_curves(table, Path(tmp) / "again.png", log_y=True)
            draw.append(time.perf_counter() - t0)
        med = statistics.median(cmd)
        print(meter.line())
        print(f"curve table: {table.num_rows} rows ({len(set(table.column('group').to_pylist()))} groups x "
              f"{len(set(table.column('facet').to_pylist()))} facets x {a.steps} steps), "
              f"{int(np.median(table.column('n').to_numpy()))} runs per point (median)")
        print(f"curve_table (DuckDB): median {statistics.median(query):.3f}s; drawing: median "
              f"{statistics.median(draw):.3f}s")
        print(f"raydyn curves ({a.runs} runs x {a.steps} steps): median of {a.repeat} = {med:.2f}s "
              f"(runs {', '.join(f'{x:.2f}' for x in cmd)}); target < {TARGET_S:g}s: "
              + ("met" if med < TARGET_S else "NOT met"))


if __name__ == "__main__":
    main()
