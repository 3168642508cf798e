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
