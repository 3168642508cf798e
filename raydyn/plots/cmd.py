"""Pictures of a CMD result: mode reference trajectories and how modes spread over layers.

Numbers first, drawing second: :func:`reference_curves` and
:meth:`raydyn.analysis.cmd.CMDResult.layer_mode_fractions` compute what is drawn and
are testable without matplotlib.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from raydyn.analysis.cmd import CMDResult  # noqa: E402

__all__ = ["reference_curves", "plot_cmd_references", "plot_cmd_layer_modes"]


def reference_curves(result: CMDResult) -> np.ndarray:
    """``(M, T)`` reference trajectories rescaled to [0, 1] (min -> 0, max -> 1).

    A constant reference maps to all zeros.
    """
    refs = np.asarray(result.references, dtype=np.float64)
    lo = refs.min(axis=1, keepdims=True)
    span = refs.max(axis=1, keepdims=True) - lo
    return np.divide(refs - lo, span, out=np.zeros_like(refs), where=span > 0)


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def plot_cmd_references(result: CMDResult, path: str | Path | None = None,
                        steps: np.ndarray | None = None, ax: Any = None) -> Figure:
    """Each mode's reference trajectory over recorded steps, normalised to [0, 1].

    ``steps``: (T,) x values (e.g. the optimiser steps recorded); default 0..T-1.
    Writes a PNG to ``path`` if given; returns the figure.
    """
    curves = reference_curves(result)
    x = np.arange(result.n_steps) if steps is None else np.asarray(steps)
    if x.shape != (result.n_steps,):
        raise ValueError(f"steps must have shape (T,)=({result.n_steps},), got {x.shape}")
    counts = np.bincount(result.assignment, minlength=result.n_modes)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
    else:
        fig = ax.figure
    for m in range(result.n_modes):
        ax.plot(x, curves[m], lw=1.4,
                label=f"mode {m} ({counts[m]} params, ref #{int(result.reference_index[m])})")
    ax.set_xlabel("step" if steps is not None else "recorded step index")
    ax.set_ylabel("reference (min-max normalised)")
    ax.set_title(f"CMD reference trajectories (M={result.n_modes}, error={result.error:.3g})")
    if result.n_modes <= 12:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_cmd_layer_modes(result: CMDResult, path: str | Path | None = None, ax: Any = None) -> Figure:
    """Stacked bars: fraction of each layer's parameters that belong to each mode."""
    frac = result.layer_mode_fractions()  # (L, M)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(result.layer_names) + 2.5), 4.0))
    else:
        fig = ax.figure
    pos = np.arange(len(result.layer_names))
    bottom = np.zeros(len(pos))
    cmap = plt.get_cmap("tab20" if result.n_modes > 10 else "tab10")
    for m in range(result.n_modes):
        ax.bar(pos, frac[:, m], bottom=bottom, color=cmap(m % cmap.N), label=f"mode {m}")
        bottom += frac[:, m]
    ax.set_xticks(pos, result.layer_names, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction of layer's parameters")
    ax.set_title("CMD modes per layer")
    if result.n_modes <= 12:
        ax.legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, path)
