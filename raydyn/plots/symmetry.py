"""Pictures of broken conservation laws: theory (dashed) over measured curves per layer."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raydyn.analysis.symmetry import LawTrace  # noqa: E402

_YLABEL = {
    "translation": r"$\sum_k W_{kj}$",
    "scale": r"$\|\theta_c\|^2$",
    "rescale": r"$\|W_{l+1}[:,c]\|^2-\|\theta_{l,c}\|^2$",
}


def plot_traces(
    traces: Sequence[LawTrace],
    path: str | Path,
    max_units: int = 8,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """One panel per (kind, layer): measured (solid) and predicted (dashed) curves.

    traces: from :func:`raydyn.analysis.symmetry.traces`.
    max_units: at most this many units per panel (evenly spaced over the layer).
    Writes a PNG to ``path`` and returns it as a Path.
    """
    traces = list(traces)
    if not traces:
        raise ValueError("traces is empty: nothing to plot")
    if max_units < 1:
        raise ValueError(f"max_units must be >= 1, got {max_units}")
    n = len(traces)
    ncol = min(n, 3)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, tr in zip(axes.flat, traces):
        U = tr.measured.shape[1]
        cols = np.unique(np.linspace(0, U - 1, min(U, max_units)).round().astype(int))
        err = tr.relative_error
        for i, c in enumerate(cols):
            color = f"C{i % 10}"
            ax.plot(tr.steps, tr.measured[:, c], color=color, lw=1.2)
            ax.plot(tr.steps, tr.predicted[:, c], color=color, lw=1.6, ls="--")
        ax.set_title(f"{tr.kind} · {tr.layer}  (max rel err {err.max():.1e})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(_YLABEL.get(tr.kind, tr.kind), fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    handles = [
        plt.Line2D([], [], color="k", lw=1.2, label="measured"),
        plt.Line2D([], [], color="k", lw=1.6, ls="--", label="theory"),
    ]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ CLI and report
def plot_runs(store, sweep: str, run_ids: list[str], out_dir, method: str = "exact") -> list:
    """Theory (dashed) over measured curves per layer, one PNG per run in ``out_dir``."""
    from raydyn.jobs.symmetry import law_traces

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rid in run_ids:
        traces = law_traces(store, sweep, rid, method)
        if traces:
            paths.append(plot_traces(traces, out_dir / f"symmetry_{rid}_{method}.png",
                                     title=f"{sweep} · run {rid} · {method} law"))
    return paths


def after_run(store, sweep: str, options) -> list[str]:
    """After `raydyn analyze symmetry`: why runs got no law, and with ``--plots`` the PNGs written."""
    from raydyn.jobs.symmetry import refusal_lines

    lines = refusal_lines(store, sweep)
    if options.plots:
        summary = store.table("symmetry_summary", sweep=sweep, columns=["run_id"]).column("run_id").to_pylist()
        runs = store.table("runs", sweep=sweep, columns=["run_id", "lr"]).to_pylist()
        lr = {r["run_id"]: r["lr"] for r in runs}
        order = sorted(summary, key=lambda r: (lr.get(r, 0.0), r))
        picks = [order[i] for i in np.unique(np.linspace(0, len(order) - 1, min(options.max_plots, len(order)))
                                             .round().astype(int))] if order else []
        lines += [f"wrote {p}" for p in plot_runs(store, sweep, picks, options.plots, options.methods[0])]
    return lines


def report_section(store, sweep: str, max_runs: int = 2) -> list[tuple[str, bytes]]:
    """`raydyn report`'s symmetry section: errors of both laws per layer over runs, how strongly each law is
    broken vs lr, and theory over measured curves for the runs with the smallest and largest learning rate."""
    import tempfile

    from raydyn.jobs.symmetry import METHODS
    from raydyn.plots.labels import fig_png as png

    tables = set(store.tables())
    if "symmetry_laws" not in tables or "symmetry_summary" not in tables:
        return []
    laws = store.table("symmetry_laws", sweep=sweep).to_pandas()
    if laws.empty:
        return []
    runs = store.table("runs", sweep=sweep, columns=["run_id", "lr"]).to_pandas()
    laws = laws.merge(runs, on="run_id", how="left")
    out = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for ax, method in zip(axes, METHODS):
        sub = laws[laws.method == method].dropna(subset=["rel_err_max"])
        for i, ((kind, layer), g) in enumerate(sub.groupby(["kind", "layer"], sort=False)):
            g = g.sort_values("lr")
            ax.plot(g.lr, g.rel_err_max, "o-", color=f"C{i % 10}", ms=3, label=f"{kind} {layer}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("max relative error of the law")
        ax.set_title(f"{method} law vs recorded quantities")
        if len(sub):
            ax.legend(fontsize=7)
    out.append(("Conservation laws: prediction error per layer vs learning rate", png(fig)))
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    sub = laws[laws.method == laws.method.iloc[0]]
    for i, ((kind, layer), g) in enumerate(sub.groupby(["kind", "layer"], sort=False)):
        g = g.sort_values("lr")
        ax.plot(g.lr, g["break"], "o-", color=f"C{i % 10}", ms=3, label=f"{kind} {layer}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("median |q_T - q_0| / median |q_0|")
    ax.set_title("How strongly each law is broken")
    ax.legend(fontsize=7)
    out.append(("Conservation laws: relative change of each quantity over training vs learning rate", png(fig)))
    order = runs[runs.run_id.isin(laws.run_id)].sort_values(["lr", "run_id"]).run_id.tolist()
    picks = list(dict.fromkeys([order[0], order[-1]]))[:max_runs] if order else []
    with tempfile.TemporaryDirectory() as tmp:
        for p in plot_runs(store, sweep, picks, tmp, "exact"):
            rid = Path(p).stem.split("_")[1]
            out.append((f"Run {rid}: recorded quantities (solid) and the exact law (dashed)", Path(p).read_bytes()))
    return out
