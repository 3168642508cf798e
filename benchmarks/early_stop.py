"""Early stopping (``train.early_stop``) on the quickstart grid: the full grid vs successive halving.

    python benchmarks/early_stop.py            # sweeps/quickstart.yaml as shipped (400 steps); 3 repeats
    python benchmarks/early_stop.py --quick    # 100 steps (record_every 5, eval_every 25, rungs 25 and 50)

The quickstart grid (lr x width x seed = 24 runs, one population per width) is trained twice per repeat
through the real sweep path (`run_sweep` on one embedded local Ray with 2 CPUs, a fresh store each time),
alternating A (full) and B (early_stop: {metric: test_loss, min_step: 100, eta: 2}: rungs 100 and 200 of
400 steps; 4 learning rates -> 2 -> 1 per width). Ray starts once before the first repeat, so its
start-up is in neither figure; per-trial overhead (worker start, store writes) is in both.

Reported (median of the repeats): runs trained to the end, member-steps (sum of steps_done over runs),
wall time of `run_sweep` and the trials' training seconds, their ratios B/A, and whether the best lr by
final test loss (median over seeds, runs that trained to the end) is the same, per width and over the
grid. Then the per-step time of the widest population (256) before and after each rung, trained in-process
with `train_population` (no Ray), with and without early stopping: the compute that stopping saves.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import yaml

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import Cores, machine_line, ray_cores_line  # noqa: E402


def sweep_texts(quick: bool) -> tuple[str, str]:
    with open(os.path.join(ROOT, "sweeps", "quickstart.yaml")) as f:
        d = yaml.safe_load(f)
    d["train"]["checkpoint_every"] = 0
    if quick:
        d["train"].update(steps=100, record_every=5, eval_every=25)
    min_step = 25 if quick else 100
    d["resources"]["cpu"] = 1
    full = dict(d, name="es-bench-full")
    es = dict(d, name="es-bench-es", train={**d["train"], "early_stop": {"metric": "test_loss", "min_step": min_step,
                                                                       "eta": 2}})
    return yaml.safe_dump(full, sort_keys=False), yaml.safe_dump(es, sort_keys=False)


def best_lr(runs) -> dict:
    """Best lr by median final test loss over seeds, among runs that trained to the end: per width and overall."""
    done = runs[runs.status == "completed"]
    med = done.groupby(["width", "lr"]).final_test_loss.median()
    out = {int(w): float(g.droplevel(0).idxmin()) for w, g in med.groupby(level=0)}
    out["grid"] = tuple(float(v) for v in med.idxmin()[::-1])  # (lr, width)
    return out


def one_sweep(text: str) -> dict:
    from raydyn.spec import parse_sweep
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep

    spec = parse_sweep(text)
    with tempfile.TemporaryDirectory(prefix="raydyn-esb-") as d:
        store = open_store(d)
        t = time.perf_counter()
        out = run_sweep(spec, text, store)
        wall = time.perf_counter() - t
        runs = store.runs(sweep=spec.name).to_pandas()
    assert not out.failed_populations, out.failed_populations
    return {"wall": wall, "train": out.phase_s.get("train", float("nan")), "to_end": int((runs.status == "completed").sum()),
            "member_steps": int(runs.steps_done.sum()), "statuses": runs.status.value_counts().to_dict(),
            "best": best_lr(runs), "n": len(runs)}


def per_step_times(text: str) -> list[tuple[int, int, float]]:
    """(from step, to step, ms per step) of the width-256 population between record steps, in-process."""
    from raydyn.spec import parse_sweep, populations
    from raydyn.train.population import train_population

    spec = parse_sweep(text)
    pop = max(populations(spec.expand(), 64), key=lambda p: p.shared["width"])
    marks: list[tuple[int, float]] = []
    train_population(pop, on_record=lambda step, a, d: marks.append((step, time.perf_counter())))
    return [(s0, s1, 1e3 * (t1 - t0) / (s1 - s0)) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine_line(), flush=True)
    import torch

    from raydyn.sweep import ensure_ray

    full_text, es_text = sweep_texts(args.quick)
    print(f"CPU cores: os.cpu_count()={os.cpu_count()}, available to this process={len(os.sched_getaffinity(0))}, "
          f"load average at start={os.getloadavg()[0]:.2f}; torch {torch.__version__}")
    t = time.perf_counter()
    ensure_ray(None, 2)
    print(f"embedded Ray (2 CPUs) started in {time.perf_counter() - t:.1f} s (in neither figure)")
    print(ray_cores_line(), flush=True)
    res: dict[str, list[dict]] = {"A full": [], "B early_stop": []}
    meters = {name: Cores(f"{name} sweeps (trials)", "ray") for name in res}
    for r in range(args.repeats):
        for name, text in (("A full", full_text), ("B early_stop", es_text)):
            with meters[name]:
                out = one_sweep(text)
            res[name].append(out)
            print(f"  repeat {r + 1} {name:13s} wall {out['wall']:6.1f} s  train {out['train']:6.1f} s  "
                  f"runs to the end {out['to_end']:2d}/{out['n']}  member-steps {out['member_steps']:5d}  "
                  f"{out['statuses']}")
    for meter in meters.values():
        print(meter.line())
    print(ray_cores_line("probe: after the timed sweeps"), flush=True)
    med = {n: {k: statistics.median(o[k] for o in v) for k in ("wall", "train", "to_end", "member_steps")}
           for n, v in res.items()}
    a, b = med["A full"], med["B early_stop"]
    print(f"\nmedian of {args.repeats}:            {'A full':>10s} {'B early_stop':>13s}   B/A")
    for k, label in (("to_end", "runs trained to the end"), ("member_steps", "member-steps"),
                     ("wall", "run_sweep wall time (s)"), ("train", "trial training time (s)")):
        print(f"  {label:26s} {a[k]:10.1f} {b[k]:13.1f}   {b[k] / a[k]:.2f}")
    ba, bb = res["A full"][0]["best"], res["B early_stop"][0]["best"]
    stable = all(o["best"] == ba for o in res["A full"]) and all(o["best"] == bb for o in res["B early_stop"])
    print(f"  best lr by median final test loss (per width; grid: (lr, width)):\n    A {ba}\n    B {bb}\n"
          f"    same: {ba == bb}{'' if stable else ' (NB: differs between repeats)'}")
    print(f"\nper-step time of the width-256 population, in-process (ms/step between record steps: median per "
          f"segment between rungs, median of {args.repeats}):")
    rungs = [25, 50] if args.quick else [100, 200]
    steps = 100 if args.quick else 400
    times: dict[str, list[list[float]]] = {"A full": [], "B early_stop": []}
    step_cores = Cores("in-process population training")
    for _ in range(args.repeats):  # alternated A B A B, median per segment
        for name, text in (("A full", full_text), ("B early_stop", es_text)):
            with step_cores:
                segs = per_step_times(text)
            times[name].append([statistics.median([ms for s0, s1, ms in segs if s0 >= lo and s1 <= hi])
                                for lo, hi in zip([0] + rungs, rungs + [steps])])
    for name, per in times.items():
        cells = [f"[{lo},{hi}) {statistics.median(p[i] for p in per):6.2f}"
                 for i, (lo, hi) in enumerate(zip([0] + rungs, rungs + [steps]))]
        print(f"  {name:13s} " + "   ".join(cells))
    print(step_cores.line())
    print(f"load average at end={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
