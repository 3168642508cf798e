"""Sweep throughput: one set of MLP-on-digits configs trained three ways, side by side in one run.

    python benchmarks/sweep_throughput.py            # 64 configs x 2000 steps (bare loop >= ~1 min)
    python benchmarks/sweep_throughput.py --steps 300 --configs 16   # quick look

1. bare:    a sequential PyTorch loop (nn.Module + torch.optim), one config after another,
            torch at 1 thread (faster than 2 for these tiny models on this machine; see --bare-threads).
2. raydyn:  `run_sweep` on an embedded Ray with 2 CPUs: configs grouped into populations
            (vectorised with torch.func), one Tune trial per population, results written to a store.
            Measured three ways: recording only the first/last step; the same with a full evaluation
            every 100 steps; record_every=10 with weights on (whose default evaluation is every 100
            steps). Recording overhead = third / second (same evaluation); evaluation cost = second / first.
3. tune:    plain Ray Tune, one config per trial (1 CPU each, 2 at a time), same bare loop inside.

Ray's start-up is paid once before the Ray timings and printed separately. Each timing is the
median of --repeats runs. Targets: raydyn <= 0.25x bare (issue 18; 0.5x in issue 2); recording overhead <= 15%.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _machine import Cores, machine_line, ray_cores_line  # noqa: E402


def sweep_text(name: str, n_configs: int, steps: int, record_every: int, record: str,
               eval_every: int | None = None) -> str:
    n_lr = 8
    n_seed = max(1, n_configs // n_lr)
    lrs = [round(0.01 * (i + 1), 4) for i in range(n_lr)]
    return f"""
name: {name}
task: {{dataset: digits, model: mlp, depth: 2, width: 64}}
train: {{steps: {steps}, batch_size: 64, optimizer: sgd, momentum: 0.9, lr: 0.05, record_every: {record_every}, record: {record}{f", eval_every: {eval_every}" if eval_every else ""}}}
method: grid
parameters:
  lr: {{values: {lrs}}}
  seed: {{values: {list(range(n_seed))}}}
resources: {{cpu: 1, population_size: {max(1, (n_lr * n_seed + 1) // 2)}}}
"""


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--bare-threads", type=int, default=1)
    ap.add_argument("--skip-tune", action="store_true", help="skip the (slow) plain-Tune baseline")
    ap.add_argument("--skip-bare", action="store_true", help="skip the bare loop (to re-measure the recording overhead)")
    args = ap.parse_args()
    print(machine_line(), flush=True)

    import torch
    from ray import tune

    from raydyn.spec import parse_sweep
    from raydyn.store import open_store
    from raydyn.sweep import ensure_ray, run_sweep
    from raydyn.tasks.build import load_data
    from raydyn.train.reference import train_single

    base = parse_sweep(sweep_text("bench", args.configs, args.steps, args.steps, "[]"))
    configs = [r.config for r in base.expand()]
    print(f"{len(configs)} configs: MLP 64-64-64-10 on digits, {args.steps} SGD steps of batch 64 each")

    torch.set_num_threads(args.bare_threads)
    data = load_data(configs[0])

    def bare():
        for cfg in configs:
            train_single(cfg, data=data, record=False)

    print(f"machine: {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}")
    bare_cores = Cores("bare loop")
    with bare_cores:
        t_bare = float("nan") if args.skip_bare else timed(bare, args.repeats)
    print(f"bare loop ({args.bare_threads} torch thread):      {t_bare:8.1f} s")

    t0 = time.perf_counter()
    ensure_ray(num_cpus=2)
    print(f"ray start-up (once):               {time.perf_counter() - t0:8.1f} s")
    print(ray_cores_line(), flush=True)
    sweep_cores, tune_cores = Cores("raydyn sweeps (trials)", "ray"), Cores("plain Tune trials", "ray")

    phases: dict[str, list[dict[str, float]]] = {}

    def raydyn(record_every: int, record: str, tag: str, eval_every: int | None = None):
        def go():
            with tempfile.TemporaryDirectory() as d, sweep_cores:
                text = sweep_text(f"bench-{tag}", args.configs, args.steps, record_every, record, eval_every)
                out = run_sweep(parse_sweep(text), text, open_store(d))
                assert out.trained == len(configs), out
                phases.setdefault(tag, []).append(out.phase_s)
        return go

    def where(tag: str) -> str:
        """Median over repeats of the trials' seconds (summed over the 2 trials) per phase."""
        ps = phases[tag]
        return ", ".join(f"{k} {statistics.median(p[k] for p in ps):.1f} s" for k in ("train", "tables", "write"))

    # A B A B: the two raydyn paths alternated, so drifting machine load hits both alike
    t_ray_all, t_eval_all, t_rec_all = [], [], []
    for _ in range(args.repeats):
        t_ray_all.append(timed(raydyn(args.steps, "[]", "norec"), 1))
        t_eval_all.append(timed(raydyn(args.steps, "[]", "eval", eval_every=100), 1))
        t_rec_all.append(timed(raydyn(10, "[weights]", "rec"), 1))
    t_ray, t_eval, t_rec = (statistics.median(v) for v in (t_ray_all, t_eval_all, t_rec_all))
    print(f"raydyn, first/last step recorded:  {t_ray:8.1f} s   (trials: {where('norec')})")
    print(f"  + evaluation every 100 steps:    {t_eval:8.1f} s   (trials: {where('eval')})")
    print(f"raydyn, record_every=10 + weights: {t_rec:8.1f} s   (trials: {where('rec')}; evaluation every 100 "
          "steps, the default for record_every=10)")

    def one_config(config):
        torch.set_num_threads(1)
        out = train_single(config["cfg"], record=False)
        tune.report({"ok": 1, "n": len(out["step"])})

    def plain_tune():
        with tempfile.TemporaryDirectory() as d:
            tuner = tune.Tuner(
                tune.with_resources(one_config, {"cpu": 1}),
                param_space={"cfg": tune.grid_search(configs)},
                tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: t.trial_id),
                run_config=tune.RunConfig(storage_path=d, verbose=0),
            )
            grid = tuner.fit()
            assert not grid.errors, grid.errors

    with tune_cores:
        t_tune = float("nan") if args.skip_tune else timed(plain_tune, args.repeats)
    print(f"plain Ray Tune, 1 config/trial:    {t_tune:8.1f} s")
    for meter, skipped in ((bare_cores, args.skip_bare), (sweep_cores, False), (tune_cores, args.skip_tune)):
        if not skipped:
            print(meter.line())
    print(ray_cores_line("probe: after the timed part"), flush=True)
    print()
    print(f"raydyn / bare        = {t_ray / t_bare:.3f}   (target <= 0.25)")
    print(f"plain Tune / bare    = {t_tune / t_bare:.3f}")
    print(f"raydyn / plain Tune  = {t_ray / t_tune:.3f}")
    print(f"recording overhead   = {100 * (t_rec / t_eval - 1):+.1f}%  (target <= 15%; metrics every 10 steps + "
          "weight snapshots, same evaluation schedule)")
    print(f"evaluation cost      = {100 * (t_eval / t_ray - 1):+.1f}%  (full train/test evaluation every 100 steps "
          "instead of first/last)")
    print(f"both                 = {100 * (t_rec / t_ray - 1):+.1f}%  (record_every=10 with its default evaluation, "
          "against first/last only)")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
