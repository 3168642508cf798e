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


# ------------------------------------------------------------------------------ report section
def result_from_tables(modes: Any, layer_errors: dict[str, float] | None = None, error: float = float("nan")):
    """A :class:`~raydyn.analysis.cmd.CMDResult` for drawing, from one run's ``cmd_modes`` rows.

    ``modes``: a pandas frame of ``cmd_modes`` (or ``cmd_online_modes``) rows of one run. The
    per-parameter assignment is rebuilt from the per-layer member counts (order within a layer
    is not stored); ``a``/``b`` are zeros. Returns ``(result, steps)``.
    """
    modes = modes.sort_values("mode")
    refs = np.array([np.asarray(r, dtype=np.float64) for r in modes.reference])
    names = tuple(modes.layer_names.iloc[0])
    counts = np.array([np.asarray(c, dtype=np.int64) for c in modes.layer_members]).T  # (L, M)
    layer_index = np.repeat(np.arange(len(names), dtype=np.int32), counts.sum(axis=1))
    assignment = np.concatenate([np.repeat(np.arange(refs.shape[0]), counts[k]) for k in range(len(names))])
    n = assignment.size
    res = CMDResult(refs, modes.reference_index.to_numpy(np.int64), assignment.astype(np.int64), np.zeros(n),
                    np.zeros(n), float(error), dict(layer_errors or {}), np.array([refs.shape[0]]),
                    np.array([error]), layer_index, names)
    return res, np.asarray(modes.steps.iloc[0], dtype=np.int64)


def report_section(store, sweep: str, max_runs: int = 3) -> list[tuple[str, bytes]]:
    """`raydyn report`'s CMD section, per kind (post-hoc, online): accuracy of reconstructed vs real weights
    over runs, then reference trajectories and modes per layer for the runs with the fewest, median and
    most modes."""
    from raydyn.plots.labels import fig_png as png

    out = []
    tables = set(store.tables())
    for label, pre in (("CMD", "cmd"), ("online CMD", "cmd_online")):
        if f"{pre}_summary" not in tables or f"{pre}_modes" not in tables:
            continue
        summary = store.table(f"{pre}_summary", sweep=sweep).to_pandas()
        if summary.empty:
            continue
        modes = store.table(f"{pre}_modes", sweep=sweep).to_pandas()
        real, rec = summary[f"{pre}_test_acc_real"], summary[f"{pre}_test_acc_recon"]
        if real.notna().any():
            fig, ax = plt.subplots(figsize=(4.6, 4.2))
            sc = ax.scatter(100 * real, 100 * rec, c=summary[f"{pre}_modes_needed"], cmap="viridis", s=22)
            lo, hi = float(np.nanmin(100 * np.r_[real, rec])), float(np.nanmax(100 * np.r_[real, rec]))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
            ax.set_xlabel("final test accuracy, real weights (%)")
            ax.set_ylabel("reconstructed weights (%)")
            fig.colorbar(sc, ax=ax, label="modes")
            out.append((f"{label}: test accuracy of reconstructed vs real weights, {len(summary)} runs", png(fig)))
        order = summary.sort_values([f"{pre}_modes_needed", "run_id"]).run_id.tolist()
        picks = list(dict.fromkeys([order[0], order[len(order) // 2], order[-1]]))[:max_runs]
        errs = dict(zip(summary.run_id, summary[f"{pre}_recon_error"]))
        for rid in picks:
            res, steps = result_from_tables(modes[modes.run_id == rid], error=errs[rid])
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.0), gridspec_kw={"width_ratios": [3, 2]})
            plot_cmd_references(res, steps=steps, ax=axes[0])
            plot_cmd_layer_modes(res, ax=axes[1])
            fig.suptitle(f"{label}, run {rid}")
            out.append((f"{label}, run {rid}: reference trajectories and modes per layer", png(fig)))
    return out
