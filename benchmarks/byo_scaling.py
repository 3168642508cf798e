"""Population advantage as the model grows: the plug-in VGG CNN (examples/byo_models.py) on the digits
image folder at three widths, trained three ways side by side, per member-step wall time.

    python benchmarks/byo_scaling.py                    # widths 8, 16, 32; 16 runs x 300 steps each; 3 repeats
    python benchmarks/byo_scaling.py --quick            # widths 4, 8; 4 runs x 10 steps; 1 repeat

1. raydyn:  `run_sweep` on an embedded Ray with 2 CPUs: the runs of one width split into 2 populations
            (vectorised with torch.func), one Tune trial each, results written to a store (first and last
            step recorded only).
2. bare:    a sequential PyTorch loop (nn.Module + torch.optim), one run after another, torch at 2 threads.
3. bare x2: the same loop in 2 processes (1 thread each), half of the runs each.
Every way pays its own fixed costs (Ray trials and their store writes; process start-up and imports for
bare x2); each process loads the data set once.

Conv cost per step grows with width^2 (widths 8 -> 32: ~16x). Each figure is the median of --repeats
runs, the three ways alternated within a repeat; the CPU cores the workers got are printed (load average
at start and end), so a loaded machine shows in the output.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import Cores, machine_line, ray_cores_line  # noqa: E402


def sweep_text(name: str, width: int, n_runs: int, steps: int, root: str) -> str:
    seeds = list(range(max(1, n_runs // 2)))
    return f"""
name: {name}
task:
  model: "examples.byo_models:vgg"
  dataset: image_folder
  data: {{root: {root}, size: 16}}
  depth: 2
  width: {width}
train: {{steps: {steps}, batch_size: 64, optimizer: sgd, momentum: 0.9, record_every: {steps}, record: [],
         eval_every: {steps}, checkpoint_every: 0}}
parameters:
  lr: {{values: [0.03, 0.1]}}
  seed: {{values: {seeds}}}
resources: {{cpu: 1, population_size: {max(1, n_runs // 2)}}}
"""


def _bare_chunk(args: tuple[list[dict], int]) -> None:
    configs, threads = args
    import torch

    from raydyn.tasks.build import load_data
    from raydyn.train.reference import train_single

    torch.set_num_threads(threads)
    data = load_data(configs[0])  # once per process, as a population trial does
    for cfg in configs:
        train_single(cfg, data=data, record=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--runs", type=int, default=16, help="runs per width (lr x seed)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="widths 4 8, 4 runs, 10 steps, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.widths, args.runs, args.steps, args.repeats = [4, 8], 4, 10, 1
    print(machine_line(), flush=True)
    os.chdir(ROOT)
    root = os.path.join(ROOT, "examples", "data", "digits_png")
    if not os.path.isdir(os.path.join(root, "train")):
        import subprocess

        subprocess.run([sys.executable, "examples/make_digits_images.py", "--size", "16"], check=True)

    from raydyn.spec import parse_sweep
    from raydyn.store import open_store
    from raydyn.sweep import ensure_ray, run_sweep

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    ensure_ray(num_cpus=2)
    import ray

    print(f"ray start-up (once): {time.perf_counter() - t0:.1f} s; Ray CPUs: {ray.cluster_resources().get('CPU')}; "
          f"machine cores: {os.cpu_count()}; load average at start: {load0:.2f}")
    print(ray_cores_line(), flush=True)
    meters = {"raydyn": Cores("raydyn trials", "ray"), "bare": Cores("bare, 1 process x 2 threads"),
              "bare x2": Cores("bare x2, 2 processes", "children")}
    ctx = mp.get_context("spawn")
    rows = []
    for width in args.widths:
        text = sweep_text(f"scale-w{width}", width, args.runs, args.steps, root)
        spec = parse_sweep(text)
        configs = [r.config for r in spec.expand()]
        n_member_steps = len(configs) * (args.steps + 1)
        times: dict[str, list[float]] = {"raydyn": [], "bare": [], "bare x2": []}
        for rep in range(args.repeats):
            order = ["raydyn", "bare", "bare x2"] if rep % 2 == 0 else ["bare x2", "bare", "raydyn"]
            for way in order:
                t = time.perf_counter()
                with meters[way]:
                    if way == "raydyn":
                        with tempfile.TemporaryDirectory() as d:
                            out = run_sweep(spec, text, open_store(d))
                            assert out.trained == len(configs), out
                    elif way == "bare":
                        _bare_chunk((configs, 2))
                    else:
                        with ctx.Pool(2) as pool:
                            pool.map(_bare_chunk, [(configs[0::2], 1), (configs[1::2], 1)])
                times[way].append(time.perf_counter() - t)
        med = {k: statistics.median(v) * 1e3 / n_member_steps for k, v in times.items()}  # ms per member-step
        rows.append((width, med))
        print(f"width {width:3d}: {len(configs)} runs x {args.steps} steps; ms per member-step (median of "
              f"{args.repeats}): raydyn {med['raydyn']:.2f}, bare {med['bare']:.2f}, bare x2 {med['bare x2']:.2f}",
              flush=True)
    for meter in meters.values():
        print(meter.line())
    print(ray_cores_line("probe: after the timed part"), flush=True)
    print()
    print(f"{'width':>5} {'raydyn ms':>10} {'bare ms':>9} {'bare x2 ms':>11} {'raydyn/bare':>12} {'raydyn/bare x2':>15}")
    for width, med in rows:
        print(f"{width:5d} {med['raydyn']:10.2f} {med['bare']:9.2f} {med['bare x2']:11.2f} "
              f"{med['raydyn'] / med['bare']:12.3f} {med['raydyn'] / med['bare x2']:15.3f}")
    cross = [w for w, m in rows if m["raydyn"] >= min(m["bare"], m["bare x2"])]
    print("crossover (raydyn no faster than the better bare loop): "
          + (f"from width {cross[0]}" if cross else "none in the widths measured"))
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
