"""Logging overhead of raydyn.track: one hand-written PyTorch loop timed with and without ``run.log``.

    python benchmarks/track_overhead.py               # MLP 64-256-256-10 on digits, 3000 steps, 3 repeats
    python benchmarks/track_overhead.py --steps 500   # quick look

The loop (SGD, minibatch 64, torch's default threads) is the same both ways; the tracked one calls
``run.log(step, train_loss=loss.item(), model=model)`` every ``--every`` steps (a weight snapshot
each time) into a fresh store in a temporary directory, flushing every 100 records and writing the
runs row at the end, all inside the timed region. The two ways alternate (bare, tracked, bare,
tracked, ...), each figure is the median of ``--repeats``, and the ratio is printed with the
overhead split into snapshot copies and store writes (measured in the tracked runs). A second,
smaller model (width 64) shows the worst case: the cheaper a step, the larger the relative cost
of a snapshot. Target (issue 14): overhead under 10% at record every 10 steps with snapshots on.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def make(width: int, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 10))


def loop(x, y, width: int, steps: int, every: int, store: str | None) -> dict[str, float]:
    import torch

    import raydyn

    model = make(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    n = x.shape[0]
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(n, generator=g)
    run = raydyn.track(store, sweep="bench", config={"width": width, "lr": 0.05}) if store else None
    t0 = time.perf_counter()
    pos = 0
    for step in range(steps):
        if pos + 64 > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + 64]
        pos += 64
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if run is not None and step % every == 0:
            run.log(step, train_loss=loss.item(), model=model)
    if run is not None:
        run.finish()
    return {"s": time.perf_counter() - t0}


def snapshot_cost(width: int, reps: int = 300) -> float:
    """Seconds per weight snapshot (the copy into the buffer), measured alone."""
    import raydyn.track as tr

    model = make(width)
    import numpy as np

    snap = tr._Snapshotter(model, {"max_size": 200_000, "projection_dim": 4096, "layers": None, "dtype": None})
    buf = np.zeros((10, snap.sizes()[0]), np.float32)  # touched once, reused (as the tracker's buffers are)
    t0 = time.perf_counter()
    for k in range(reps):
        snap.into(model, buf[k % 10], None)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--widths", default="256,64", help="comma-separated hidden widths (the first is the target)")
    args = ap.parse_args()

    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"cores available: {cores}; torch threads: {torch.get_num_threads()}; load average at start: "
          f"{os.getloadavg()[0]:.2f}")
    print(f"{args.steps} steps, run.log every {args.every} steps with a snapshot, median of {args.repeats} "
          "(bare and tracked alternated)")
    print(f"{'model':>22} {'params':>8} {'bare s':>8} {'tracked s':>10} {'overhead':>9} {'snapshot ms':>12} target")
    loop(x, y, 64, 200, args.every, None)  # warm-up: first-call costs out of the timings
    for k, width in enumerate(int(w) for w in args.widths.split(",")):
        bare, tracked = [], []
        for _ in range(args.repeats):
            bare.append(loop(x, y, width, args.steps, args.every, None)["s"])
            with tempfile.TemporaryDirectory() as tmp:
                tracked.append(loop(x, y, width, args.steps, args.every, os.path.join(tmp, "store"))["s"])
        b, t = statistics.median(bare), statistics.median(tracked)
        params = sum(p.numel() for p in make(width).parameters())
        over = t / b - 1
        target = ("< 10%: " + ("met" if over < 0.10 else "NOT met")) if k == 0 else "(worst case, no target)"
        print(f"{f'MLP 64-{width}-{width}-10':>22} {params:>8} {b:>8.3f} {t:>10.3f} {over:>+9.1%} "
              f"{1e3 * snapshot_cost(width):>12.3f} {target}")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
