"""Time `raydyn report` (the whole HTML page, every run's curves embedded) on a 10^4-run sweep.

Writes the same synthetic store as ``benchmarks/curves_10k.py`` (``--runs`` runs, lr x width x seed,
x ``--steps`` steps of test_loss and train_loss with a few NaN steps, in ``--parts`` parts, and a
tracked-sweep record so the CLI resolves the sweep name; its axes are read from the runs' configs).
Then prints the median of ``--repeat`` wall times of

- the whole command, in-process (``raydyn report big --out report.html``: sweep lookup, the runs
  table, the curves pivot, Plotly's bundle, writing the page);
- ``build_report`` alone, and the curves pivot alone (``raydyn.report.html._curve_data``);

the page's size, and, when Debian's chromium is installed, how long headless Chromium takes until the
page reports ``data-ready`` (its plots drawn; informational: that is the reader's machine, not the
command), next to Chromium on an empty page.

Target: the command under 10 s at 10^4 runs x 50 steps (the default sizes).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import Cores, machine_line  # noqa: E402
from curves_10k import build  # noqa: E402  (the same synthetic 10^4-run store)

from raydyn.store import open_store  # noqa: E402

TARGET_S = 10.0
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--virtual-time-budget=600000"]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chromium_ready(chromium: str, url: str, user_dir: Path) -> tuple[float, str]:
    """Wall seconds until headless Chromium dumps the DOM (virtual time: it waits for the page to settle),
    and the <body> tag it dumped."""
    t0 = time.perf_counter()
    r = subprocess.run([chromium, *FLAGS, f"--user-data-dir={user_dir}", "--dump-dom", url], capture_output=True,
                       text=True, timeout=600)
    dt = time.perf_counter() - t0
    m = re.search(r"<body[^>]*>", r.stdout)
    return dt, m.group(0) if m else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--parts", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-browser", action="store_true", help="skip the Chromium timing")
    a = ap.parse_args()
    print(machine_line(), flush=True)

    from typer.testing import CliRunner

    from raydyn.cli import app
    from raydyn.report import build_report
    from raydyn.report.html import _curve_data
    from raydyn.track import parse_stored

    with tempfile.TemporaryDirectory() as tmp:
        root = str(Path(tmp) / "store")
        t0 = time.perf_counter()
        build(root, a.runs, a.steps, a.parts)
        print(f"built {a.runs} runs x {a.steps} steps ({a.runs * a.steps} metric rows, {a.parts} parts) "
              f"in {time.perf_counter() - t0:.1f}s; {cores()} CPU cores available")
        out = Path(tmp) / "report.html"
        args = ["report", "big", "--out", str(out), "--store", root]
        st = open_store(root)
        axes = parse_stored(st, "big").axes()
        cmd, direct, pivot = [], [], []
        meter = Cores("raydyn report command")
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            with meter:
                r = CliRunner().invoke(app, args)
            cmd.append(time.perf_counter() - t0)
            if r.exit_code != 0:
                raise SystemExit(f"raydyn report failed: {r.output}{r.exception!r}")
            st = open_store(root)
            t0 = time.perf_counter()
            build_report(st, "big", Path(tmp) / "again.html", axes=axes)
            direct.append(time.perf_counter() - t0)
            ids = st.table("runs", sweep="big", columns=["run_id"]).column("run_id").combine_chunks()
            t0 = time.perf_counter()
            curves = _curve_data(st, "big", ids)
            pivot.append(time.perf_counter() - t0)
        size = out.stat().st_size
        print(f"page: {size / 2**20:.1f} MiB ({curves['rows']} metric rows of {len(ids)} runs embedded, "
              f"{len(curves['metrics'])} metrics, {len(curves['steps'])} distinct steps; group-by choices: "
              f"{', '.join(axes) or 'none'})")
        print(f"curves pivot: median {statistics.median(pivot):.3f}s; build_report: median "
              f"{statistics.median(direct):.2f}s")
        med = statistics.median(cmd)
        print(meter.line())
        print(f"raydyn report ({a.runs} runs x {a.steps} steps): median of {a.repeat} = {med:.2f}s "
              f"(runs {', '.join(f'{x:.2f}' for x in cmd)}); target < {TARGET_S:g}s: "
              + ("met" if med < TARGET_S else "NOT met"))

        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if a.no_browser or chromium is None:
            print("headless Chromium: " + ("skipped (--no-browser)" if a.no_browser else "not installed, not timed"))
            return
        empty = Path(tmp) / "empty.html"
        empty.write_text("<!doctype html><title>empty</title><body>", encoding="utf-8")
        base, _ = chromium_ready(chromium, empty.as_uri(), Path(tmp) / "u0")
        dt, body = chromium_ready(chromium, out.as_uri(), Path(tmp) / "u1")
        ready = 'data-ready="1"' in body
        errors = re.search(r'data-errors="(\d+)"', body)
        print(f"headless Chromium (informational): page {'ready' if ready else 'NOT ready'} after {dt:.1f}s "
              f"(an empty page: {base:.1f}s){'; ' + errors.group(1) + ' script errors' if errors else ''}")


if __name__ == "__main__":
    main()
