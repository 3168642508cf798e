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
