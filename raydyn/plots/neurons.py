"""Neuron modes over training: OPT fraction per activation layer, with test accuracy alongside."""
from __future__ import annotations

from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_modes_over_time(df: Any, labels: Mapping[str, Any] | None = None, column: str = "neuron_opt"):
    """One panel per run: ``column`` (a list per row, one value per activation layer) over steps, one
    line per layer, and test accuracy (dashed, right axis) where it was evaluated.

    df: pandas frame with ``run_id``, ``step``, ``column`` and optionally ``test_acc``.
    labels: run_id -> text for the panel title (e.g. its learning rate). Returns the figure.
    """
    runs = list(dict.fromkeys(df.run_id))
    if not runs:
        raise ValueError("no runs to plot")
    n = len(runs)
    ncol = min(n, 2)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(5.2 * ncol, 3.2 * nrow), squeeze=False)
    for ax, rid in zip(axes.flat, runs):
        sub = df[df.run_id == rid].sort_values("step")
        vals = np.array([np.asarray(v, dtype=float) for v in sub[column]])
        for j in range(vals.shape[1] if vals.ndim == 2 else 0):
            ax.plot(sub.step, vals[:, j], lw=1.4, label=f"layer {j}")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("OPT fraction" if column == "neuron_opt" else column)
        title = f"run {rid}" + (f" · lr={labels[rid]:g}" if labels and rid in labels else "")
        ax.set_title(title, fontsize=9)
        if "test_acc" in sub and sub.test_acc.notna().any():
            ev = sub[sub.test_acc.notna()]
            ax2 = ax.twinx()
            ax2.plot(ev.step, ev.test_acc, "k--", lw=1.0, label="test acc")
            ax2.set_ylim(-0.02, 1.02)
            ax2.set_ylabel("test accuracy", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ report section
def report_section(store, sweep: str, max_runs: int = 4) -> list[tuple[str, bytes]]:
    """`raydyn report`'s neurons section: OPT fraction per layer over training next to test accuracy
    (recorded with train.record: [neurons]), and the basins vs learning rate (from `analyze neurons`)."""
    from raydyn.plots.labels import fig_png as png

    out = []
    tables = set(store.tables())
    from raydyn.errors import StoreError

    try:
        df = store.table("metrics", sweep=sweep, columns=["run_id", "step", "neuron_opt", "test_acc"]).to_pandas()
    except StoreError:  # not recorded with train.record: [neurons]
        df = None
    if df is not None and len(df):
        runs = store.table("runs", sweep=sweep, columns=["run_id", "lr"]).to_pandas().sort_values(["lr", "run_id"])
        ids = runs.run_id.tolist()
        picks = [ids[i] for i in np.unique(np.linspace(0, len(ids) - 1, min(max_runs, len(ids))).round().astype(int))]
        fig = plot_modes_over_time(df[df.run_id.isin(picks)], labels=dict(zip(runs.run_id, runs.lr)))
        out.append(("OPT (order-preserving) fraction per layer over training, with test accuracy (dashed)", png(fig)))
    if "neurons_summary" in tables:
        s = store.table("neurons_summary", sweep=sweep).to_pandas()
        r = store.table("runs", sweep=sweep, columns=["run_id", "lr"]).to_pandas()
        s = s.merge(r, on="run_id")
        if len(s):
            fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
            for ax, col in zip(axes, ("basin_sample", "basin_weight")):
                ax.scatter(s.lr, s[col], c=s.opt_fraction, cmap="viridis", s=25)
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
                ax.set_ylabel(col)
            axes[0].set_title("sample-space basin (relative radius)")
            axes[1].set_title("weight-space basin (relative sigma)")
            out.append(("Attraction basins vs learning rate (colour: OPT fraction)", png(fig)))
    return out
