"""Pictures for the Koopman analysis: spectra in the complex plane, clustered distance matrix.

Compute first, draw second: :func:`distance_matrix_order` returns the dendrogram
order (testable without drawing); the plotting functions only draw. Agg backend,
figures are returned and written to ``path`` when one is given.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402
from scipy.spatial.distance import squareform  # noqa: E402

__all__ = ["plot_spectra", "distance_matrix_order", "plot_distance_matrix"]


def _save(fig: Figure, path) -> None:
    if path is not None:
        fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_spectra(
    spectra: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    *,
    path=None,
    title: str | None = None,
    unit_circle: bool = True,
    ax=None,
) -> Figure:
    """Eigenvalues in the complex plane, one colour per group.

    Parameters
    ----------
    spectra : {group name: (n,) complex array, or a list of them (e.g. one per seed)}
    path : optional file to write (PNG by extension)
    unit_circle : draw |lambda| = 1 (set False for continuous-time eigenvalues)
    """
    if not spectra:
        raise ValueError("spectra is empty: give {group name: eigenvalues}")
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
    else:
        fig = ax.figure
    if unit_circle:
        th = np.linspace(0, 2 * np.pi, 400)
        ax.plot(np.cos(th), np.sin(th), "k--", lw=0.8, alpha=0.6)
    markers = "o^s*Dvp<>h"
    for k, (name, eigs) in enumerate(spectra.items()):
        if isinstance(eigs, np.ndarray) and eigs.ndim == 1:
            eigs = [eigs]
        pts = np.concatenate([np.asarray(e, dtype=np.complex128).ravel() for e in eigs])
        ax.scatter(pts.real, pts.imag, s=22, marker=markers[k % len(markers)],
                   color=f"C{k % 10}", alpha=0.75, label=f"{name} ({len(eigs)})")
    ax.axhline(0, color="0.8", lw=0.5, zorder=0)
    ax.axvline(0, color="0.8", lw=0.5, zorder=0)
    ax.set_xlabel(r"Re $\lambda$")
    ax.set_ylabel(r"Im $\lambda$")
    if unit_circle:
        ax.set_aspect("equal", "datalim")
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title)
    _save(fig, path)
    return fig


def distance_matrix_order(distance_matrix: np.ndarray, method: str = "average") -> tuple[np.ndarray, np.ndarray]:
    """(leaf order, linkage matrix) of the hierarchical clustering of a distance matrix."""
    d = np.asarray(distance_matrix, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] != d.shape[1]:
        raise ValueError(f"distance_matrix must be square, got shape {d.shape}")
    if d.shape[0] < 2:
        return np.arange(d.shape[0]), np.empty((0, 4))
    z = hierarchy.linkage(squareform(d, checks=False), method=method)
    return hierarchy.leaves_list(z), z


def plot_distance_matrix(
    distance_matrix: np.ndarray,
    labels: Sequence[str] | None = None,
    *,
    groups: Sequence | None = None,
    method: str = "average",
    path=None,
    title: str | None = None,
) -> Figure:
    """Heatmap of a distance matrix in dendrogram order, dendrogram on top.

    Parameters
    ----------
    distance_matrix : (N, N) symmetric (e.g. pairwise Wasserstein distances)
    labels : optional N tick labels (shown when N <= 60)
    groups : optional N group keys; a coloured strip marks each row's group
    """
    d = np.asarray(distance_matrix, dtype=np.float64)
    order, z = distance_matrix_order(d, method)
    n = d.shape[0]
    fig = plt.figure(figsize=(6.5, 7))
    ax_den = fig.add_axes([0.12, 0.80, 0.70, 0.15])
    ax_map = fig.add_axes([0.12, 0.08, 0.70, 0.70])
    ax_bar = fig.add_axes([0.85, 0.08, 0.03, 0.70])
    if n >= 2:
        hierarchy.dendrogram(z, ax=ax_den, no_labels=True, color_threshold=0,
                             above_threshold_color="k")
    ax_den.axis("off")
    im = ax_map.imshow(d[np.ix_(order, order)], cmap="viridis", interpolation="nearest", aspect="auto")
    fig.colorbar(im, cax=ax_bar, label="distance")
    if groups is not None:
        keys = list(dict.fromkeys(groups))
        codes = np.array([keys.index(g) for g in groups])[order]
        strip = fig.add_axes([0.08, 0.08, 0.03, 0.70])
        strip.imshow(codes[:, None], cmap="tab10", vmin=0, vmax=9, aspect="auto", interpolation="nearest")
        strip.set_xticks([])
        strip.set_yticks([])
    if labels is not None and n <= 60:
        lab = [str(labels[i]) for i in order]
        ax_map.set_xticks(range(n), lab, rotation=90, fontsize=6)
        ax_map.set_yticks(range(n), lab, fontsize=6)
        if groups is not None:
            ax_map.set_yticks([])
    else:
        ax_map.set_xticks([])
        ax_map.set_yticks([])
    if title:
        ax_den.set_title(title)
    _save(fig, path)
    return fig
