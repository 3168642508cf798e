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
    zoom: bool | None = None,
) -> Figure:
    """Eigenvalues in the complex plane, one colour per group.

    Parameters
    ----------
    spectra : {group name: (n,) complex array, or a list of them (e.g. one per seed)}
    path : optional file to write (PNG by extension)
    unit_circle : draw |lambda| = 1 (set False for continuous-time eigenvalues)
    zoom : add a second panel zoomed on the eigenvalues (None: when they fill less than a
        quarter of the full view, e.g. all clustered near 1; only for a new figure)
    """
    if not spectra:
        raise ValueError("spectra is empty: give {group name: eigenvalues}")
    groups = []
    for name, eigs in spectra.items():
        if isinstance(eigs, np.ndarray) and eigs.ndim == 1:
            eigs = [eigs]
        groups.append((name, len(eigs), np.concatenate([np.asarray(e, dtype=np.complex128).ravel() for e in eigs])))
    every = np.concatenate([pts for _, _, pts in groups])
    every = every[np.isfinite(every)]
    span = max(np.ptp(every.real), np.ptp(every.imag)) if every.size else 0.0
    full = max(2.0, 2 * float(np.abs(every).max())) if every.size else 2.0
    if zoom is None:
        zoom = ax is None and every.size > 0 and span < 0.25 * full
    if ax is None:
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(11.0 if zoom else 5.5, 5.5), squeeze=False)
        axes = list(axes[0])
    else:
        fig, axes, zoom = ax.figure, [ax], False
    markers = "o^s*Dvp<>h"
    for i, a in enumerate(axes):
        if unit_circle:
            th = np.linspace(0, 2 * np.pi, 2000)
            a.plot(np.cos(th), np.sin(th), "k--", lw=0.8, alpha=0.6)
        for k, (name, n, pts) in enumerate(groups):
            a.scatter(pts.real, pts.imag, s=22, marker=markers[k % len(markers)],
                      color=f"C{k % 10}", alpha=0.75, label=f"{name} ({n})" if i == 0 else None)
        a.axhline(0, color="0.8", lw=0.5, zorder=0)
        a.axvline(0, color="0.8", lw=0.5, zorder=0)
        a.set_xlabel(r"Re $\lambda$")
        a.set_ylabel(r"Im $\lambda$")
    if zoom:  # the same points, framed tightly (with the unit circle's arc through them)
        z = axes[1]
        pad = max(0.1 * span, 1e-3)
        cx, cy = (every.real.min() + every.real.max()) / 2, (every.imag.min() + every.imag.max()) / 2
        half = span / 2 + pad
        z.set_xlim(cx - half, cx + half)
        z.set_ylim(cy - half, cy + half)
        z.set_aspect("equal")
        z.set_title("zoomed", fontsize=9)
    if unit_circle:
        axes[0].set_aspect("equal", "datalim")
    axes[0].legend(loc="best", fontsize=8)
    if title:
        (fig.suptitle if zoom else axes[0].set_title)(title)
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


# ------------------------------------------------------------------------------ report section
def report_section(store, sweep: str) -> list[tuple[str, bytes]]:
    """`raydyn report`'s Koopman section: spectra in the complex plane (up to 12 groups) and the clustered
    distance matrix."""
    from raydyn.plots.labels import fig_png

    sp = store.table("koopman_spectra", sweep=sweep).to_pandas()
    groups = sorted(sp.group.unique())
    spectra = {g: (sp[sp.group == g].real + 1j * sp[sp.group == g].imag).to_numpy() for g in groups[:12]}
    out = [("Koopman eigenvalues per group (unit circle dashed)", fig_png(plot_spectra(spectra, title=sweep), tight=False))]
    dist = store.table("koopman_distances", sweep=sweep).to_pandas()
    if len(dist):
        idx = {g: i for i, g in enumerate(groups)}
        m = np.zeros((len(groups), len(groups)))
        for r in dist.itertuples():
            m[idx[r.group_a], idx[r.group_b]] = m[idx[r.group_b], idx[r.group_a]] = r.distance
        out.append(("Wasserstein distances between spectra, clustered",
                    fig_png(plot_distance_matrix(m, labels=groups, title=sweep), tight=False)))
    return out
