"""Every benchmark in one command, and one table of their headline figures against their targets.

    python benchmarks/run_all.py                  # documented sizes (about 25 minutes on 2 cores, 15 of them HMM)
    python benchmarks/run_all.py --quick          # reduced sizes, a smoke check in a few minutes
    python benchmarks/run_all.py --only sweep,koopman --logs bench-logs/

Each benchmark runs as its own process (``python benchmarks/<file> <args>``), one after another, so a
benchmark never shares the machine with another. Their own repeats and alternation apply: every timing
figure is a median of 3 (``--repeats 3`` or the script's default), the two paths of a comparison
alternated (A B A B) where the script measures both. The figures are read from each script's printed
output (the patterns below), so what the table shows is what the script printed; its whole output is
kept under ``--logs``.

The table: benchmark, figure, raydyn, baseline, ratio (what the target is stated on), target, met or
not, the load average at the start and end of that benchmark, the CPU cores its workers actually got,
and its wall time. Also printed: the CPU cores available to this process and the machine's load before
and after. On a loaded machine the load and cores columns say so; compare ratios, not absolute times.
With ``--quick`` a target stated for the documented size is shown but not judged ("quick").

"cores (workers got)" comes from the ``cores:`` lines every benchmark prints (``benchmarks/_machine.py``):
CPU seconds over wall seconds of its timed sections, i.e. how many cores' worth its workers (Ray workers,
or the benchmark's own process where it has none) received. It shows the range over the timed sections'
worker lines (the process lines where a benchmark has no workers), "of N" for the Ray CPUs, and in
brackets the range of the probes (one task per Ray CPU spinning 0.6 s, after ``ray.init`` and after the
timed part).

"scaling" (printed before the first benchmark and after the table, :func:`_machine.scaling_line`): how
much work two single-threaded processes at once do against one alone, on a numpy kernel of 6x6 linear
algebra (what an HMM fit is made of) and a torch ``bmm`` kernel (what a population step is made of). It
is the most a 2-core fan-out can gain on this machine: 2.00 where the two cores do not slow each other.
A target stated against one process (HMM 1.8x, Koopman 10x, sweep 0.25x) has that much less room on a
machine whose figure is below 2. For the HMM target the benchmark also measures that bound on the fits
themselves: the same fits on a plain process pool, timed in the same rounds (the "bound" row).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import scaling_line  # noqa: E402

NUM = r"([-+]?\d+(?:\.\d+)?)"


@dataclass
class Row:
    figure: str
    raydyn: float | None
    baseline: float | None
    ratio: float | None
    target: str
    met: bool | None  # None: not judged (no target, quick size, or not parsed)


@dataclass
class Bench:
    key: str
    title: str
    script: str
    full: list[str]
    quick: list[str]
    parse: Callable[[str, bool], list[Row]]
    note: str = ""
    rows: list[Row] = field(default_factory=list)


def _find(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text, flags=re.M)
    return float(m.group(1)) if m else None


def _judge(value: float | None, op: str, bound: float, quick: bool, at_full_size_only: bool = False) -> bool | None:
    if value is None or (quick and at_full_size_only):
        return None
    return value <= bound if op == "<=" else value >= bound if op == ">=" else value < bound


def _ratio_row(figure: str, text: str, quick: bool, raydyn: str, baseline: str, op: str, bound: float,
               kind: str, full_only: bool = True, printed: str | None = None) -> Row:
    """``printed``: the pattern of the ratio as the script itself printed it (computed from its unrounded
    medians; for an overhead, in percent). Preferred to one recomputed from the rounded times above."""
    a, b = _find(raydyn, text), _find(baseline, text)
    own = _find(printed, text) if printed else None
    if own is not None:
        ratio = own / 100 if kind == "overhead" else own
    elif a is None or b is None or b == 0 or a == 0:
        ratio = None
    elif kind == "ratio":  # raydyn / baseline
        ratio = a / b
    elif kind == "speedup":  # baseline / raydyn
        ratio = b / a
    else:  # overhead: raydyn / baseline - 1
        ratio = a / b - 1
    target = f"{op} {bound:+.0%}" if kind == "overhead" else f"{op} {bound:g}x"
    return Row(figure, a, b, ratio, target, _judge(ratio, op, bound, quick, full_only))


def parse_sweep(text: str, quick: bool) -> list[Row]:
    bare = r"^bare loop \(1 torch thread\):\s+" + NUM + " s"
    return [
        _ratio_row("sweep time / bare sequential loop", text, quick, r"^raydyn, first/last step recorded:\s+" + NUM,
                   bare, "<=", 0.25, "ratio", printed=r"^raydyn / bare\s+=\s+" + NUM),
        _ratio_row("recording overhead (record_every 10 + weights)", text, quick,
                   r"^raydyn, record_every=10 \+ weights:\s+" + NUM, r"^\s+\+ evaluation every 100 steps:\s+" + NUM,
                   "<=", 0.15, "overhead", printed=r"^recording overhead\s+=\s+" + NUM + "%"),
    ]


def parse_koopman(text: str, quick: bool) -> list[Row]:
    return [_ratio_row("pairwise Wasserstein, Ray fan-out vs scipy double loop", text, quick,
                       r"^raydyn Ray fan-out .*?median\s+" + NUM + " s", r"^baseline .*?median\s+" + NUM + " s",
                       ">=", 10.0, "speedup", printed=r"^speed-up over baseline:\s+" + NUM + "x")]


def parse_hmm(text: str, quick: bool) -> list[Row]:
    rows = [_ratio_row("HMM model selection, Ray tasks vs sequential", text, quick,
                       r"^median total\s+ray tasks:\s+" + NUM + " s", r"^median total\s+sequential:\s+" + NUM + " s",
                       ">=", 1.8, "speedup", printed=r"^speed-up sequential / ray:\s+" + NUM + "x")]
    bound = _find(r"^bound sequential / process pool:\s+" + NUM + "x", text)
    if bound is not None:  # the machine's ceiling for the same fits: a plain process pool, timed in the same rounds
        rows.append(Row("  bound: the same fits on a plain process pool vs sequential (no Ray)",
                        _find(r"^median total\s+process pool:\s+" + NUM + " s", text),
                        _find(r"^median total\s+sequential:\s+" + NUM + " s", text), bound, "(none)", None))
    return rows


def parse_load(text: str, quick: bool) -> list[Row]:
    rows = [(int(m.group(1)), float(m.group(2))) for m in
            re.finditer(r"^\s*(\d+)\s+\d+\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s*$", text, flags=re.M)]
    if not rows:
        return [Row("driver peak RSS (MiB)", None, None, None, "<= 400 MiB at 2,000 runs", None)]
    n, rss = max(rows)
    return [Row(f"driver peak RSS at {n:,} runs (MiB)", rss, None, None, "<= 400 MiB at 2,000 runs",
                rss <= 400 if n >= 2000 else None)]


def _seconds_row(figure: str, text: str, pattern: str, bound: float) -> Row:
    v = _find(pattern, text)
    return Row(figure, v, None, None, f"< {bound:g} s", None if v is None else v < bound)


def parse_curves(text: str, quick: bool) -> list[Row]:
    return [_seconds_row("raydyn curves, 10^4 runs x 50 steps (s)" if not quick else "raydyn curves (s)", text,
                         r"median of \d+ = " + NUM + "s", 10.0)]


def parse_report(text: str, quick: bool) -> list[Row]:
    return [_seconds_row("raydyn report, 10^4 runs x 50 steps (s)" if not quick else "raydyn report (s)", text,
                         r"median of \d+ = " + NUM + "s", 10.0)]


def parse_track(text: str, quick: bool) -> list[Row]:
    out = []
    for m in re.finditer(r"^(.{30}) +\d+ +" + NUM + " +" + NUM + r" +([-+]\d+(?:\.\d+)?)%", text, flags=re.M):
        bare, tracked, over = float(m.group(2)), float(m.group(3)), float(m.group(4)) / 100
        out.append(Row(f"raydyn.track overhead: {m.group(1).strip()}", tracked, bare, over, "< +10%",
                       _judge(over, "<", 0.10, quick, True)))
    return out or [Row("raydyn.track overhead", None, None, None, "< +10%", None)]


def parse_early_stop(text: str, quick: bool) -> list[Row]:
    m = re.search(r"^\s+run_sweep wall time \(s\)\s+" + NUM + r"\s+" + NUM, text, flags=re.M)
    same = re.search(r"^\s+same: (True|False)", text, flags=re.M)
    if not m:
        return [Row("early stopping: sweep wall time, early_stop / full grid", None, None, None, "(none)", None)]
    a, b = float(m.group(1)), float(m.group(2))
    return [Row("early stopping: sweep wall time, early_stop / full grid"
                + ("" if same is None else f" (same best lr: {same.group(1)})"), b, a, b / a, "(none)", None)]


BENCHES = [
    Bench("sweep", "sweep throughput (64 MLPs x 2,000 steps)", "sweep_throughput.py",
          ["--repeats", "3", "--skip-tune"], ["--configs", "16", "--steps", "300", "--repeats", "3", "--skip-tune"],
          parse_sweep),
    Bench("koopman", "Koopman pairwise (2,000 spectra x 10)", "koopman_pairwise.py",
          ["--repeats", "3", "--skip-dmd"], ["--n-spectra", "400", "--baseline-pairs", "5000", "--repeats", "3",
                                             "--skip-dmd"], parse_koopman),
    Bench("hmm", "HMM fan-out (64 groups x k=1..6 x 3 restarts)", "hmm_fits.py", ["--repeats", "3"],
          ["--groups", "8", "--repeats", "3"], parse_hmm),
    Bench("load", "load test (2,000 runs through the CLI)", "load_2000.py", ["--sizes", "2000"],
          ["--sizes", "200"], parse_load, note="memory: one sweep per size"),
    Bench("curves", "raydyn curves (10^4 runs)", "curves_10k.py", [], ["--runs", "2000"], parse_curves),
    Bench("report", "raydyn report (10^4 runs)", "report_10k.py", ["--no-browser"], ["--runs", "2000", "--no-browser"],
          parse_report),
    Bench("track", "raydyn.track overhead (3 loops x 3,000 steps)", "track_overhead.py", [], ["--steps", "500"],
          parse_track),
    Bench("early_stop", "early stopping on the quickstart grid", "early_stop.py", [], ["--quick"], parse_early_stop),
]


CORES = re.compile(r"^cores: visible (\d+)(?:, ray ([\d.]+))?, (workers|process) got ([-\d.na]+) "
                   r"\(load ([-\d.na]+)\) \[(probe|timed)[^\]]*\]", flags=re.M)


def cores_cell(text: str) -> str:
    """The "cores (workers got)" cell: timed workers (else timed process) range, of the Ray CPUs; probes."""
    lines = [(m.group(3), float(m.group(4)), m.group(6), m.group(2)) for m in CORES.finditer(text)]

    def span(vals: list[float]) -> str:
        vals = [v for v in vals if v == v]  # no NaN
        if not vals:
            return "-"
        lo, hi = min(vals), max(vals)
        return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"

    workers = [g for who, g, kind, _ in lines if kind == "timed" and who == "workers"]
    process = [g for who, g, kind, _ in lines if kind == "timed" and who == "process"]
    probes = [g for _, g, kind, _ in lines if kind == "probe"]
    rays = {float(r) for *_, r in lines if r}
    cell = span(workers) if workers else (span(process) + " (process)" if process else "")
    if workers and rays:
        cell += f" of {max(rays):g}"
    if probes:
        cell += f" [probe {span(probes)}]"
    return cell.strip() or "-"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _fmt(v: float | None, pct: bool = False) -> str:
    if v is None:
        return "-"
    if pct:
        return f"{v:+.1%}"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sizes (targets shown, not judged)")
    ap.add_argument("--only", default="", help="comma-separated keys: " + ", ".join(b.key for b in BENCHES))
    ap.add_argument("--logs", default=None, help="folder for each benchmark's full output (default: a temp folder)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds per benchmark")
    args = ap.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.key in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b.key for b in BENCHES}
    if unknown:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}; known: "
                         + ", ".join(b.key for b in BENCHES))
    import tempfile

    logs = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="raydyn-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    start = time.strftime("%Y-%m-%d %H:%M")
    print(f"raydyn benchmarks, {start}, {'quick sizes' if args.quick else 'documented sizes'}; "
          f"{cores()} CPU cores available, {os.cpu_count()} visible; load average {os.getloadavg()[0]:.2f}; "
          f"python {sys.version.split()[0]}; logs in {logs}", flush=True)
    scaling = [scaling_line()]
    print(scaling[0], flush=True)
    results = []
    for b in chosen:
        argv = [sys.executable, str(HERE / b.script), *(b.quick if args.quick else b.full)]
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        print(f"running {b.key}: {' '.join(argv[1:])}", flush=True)
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, cwd=HERE.parent)
            text, rc = p.stdout + "\n" + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text, rc = f"{e.stdout or ''}\n{e.stderr or ''}\ntimed out after {args.timeout:g} s", -1
        wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
        (logs / f"{b.key}.txt").write_text(text if isinstance(text, str) else str(text))
        got = cores_cell(text)
        rows = b.parse(text, args.quick) if rc == 0 else [Row(f"FAILED (exit {rc}; see {logs / (b.key + '.txt')})",
                                                             None, None, None, "", False)]
        results.append((b, rows, load0, load1, wall, got))
        for r in rows:
            print(f"  {r.figure}: raydyn {_fmt(r.raydyn)}, baseline {_fmt(r.baseline)}, ratio "
                  f"{_fmt(r.ratio, 'overhead' in r.figure)} (target {r.target or '-'})", flush=True)
        print(f"  cores (workers got): {got}", flush=True)

    print()
    header = ("benchmark", "figure", "raydyn", "baseline", "ratio", "target", "met", "load start→end",
              "cores (workers got)", "wall")
    table = [header]
    for b, rows, load0, load1, wall, got in results:
        for r in rows:
            pct = r.target.startswith(("<= +", "< +"))
            met = "quick" if (args.quick and r.met is None and r.target not in ("", "(none)")) else (
                "-" if r.met is None else "yes" if r.met else "NO")
            table.append((b.key, r.figure, _fmt(r.raydyn), _fmt(r.baseline), _fmt(r.ratio, pct), r.target or "-", met,
                          f"{load0:.2f}→{load1:.2f}", got, f"{wall:.0f} s"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; {cores()} CPU cores available")
    scaling.append(scaling_line())
    print("at the start " + scaling[0] + "\nat the end   " + scaling[1])
    failed = [b.key for b, rows, *_ in results if any(r.met is False for r in rows)]
    if failed:
        print(f"targets not met: {', '.join(failed)}")


if __name__ == "__main__":
    main()
