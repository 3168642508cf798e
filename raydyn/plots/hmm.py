"""Draw an HMM training map (Hu et al. 2023) as a directed graph, with matplotlib only.

Takes the :class:`raydyn.analysis.hmm.TrainingMap` computed by
:func:`raydyn.analysis.hmm.training_map`; no numbers are computed here beyond layout.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from raydyn.analysis.hmm import TrainingMap  # noqa: E402
from raydyn.plots.labels import text_color_on  # noqa: E402

__all__ = ["plot_training_map"]

_RAD = 0.25  # curvature of edges, so that i -> j and j -> i are drawn apart


def _layout(k: int) -> list[tuple[float, float]]:
    """Node positions: states on a circle, state 0 at the left, then clockwise."""
    if k == 1:
        return [(0.0, 0.0)]
    if k == 2:
        return [(-1.0, 0.0), (1.0, 0.0)]
    return [(-math.cos(2 * math.pi * s / k), math.sin(2 * math.pi * s / k)) for s in range(k)]


def plot_training_map(
    tmap: TrainingMap,
    path: str | Path | None = None,
    *,
    top_features: int = 2,
    title: str | None = None,
    ax=None,
    dpi: int = 120,
    detours=(),
    max_labels: int = 8,
):
    """Draw states as circles (area ~ occupancy) and observed transitions as arrows.

    Args:
        tmap: from :func:`raydyn.analysis.hmm.training_map`.
        path: if given, the figure is written there as PNG (parent directories created).
        top_features: how many of the largest signed mean changes (z-units) to print on
            each edge; 0 prints only the transition probability.
        title: figure title.
        ax: draw into this matplotlib Axes instead of a new figure.
        dpi: resolution of the PNG.
        detours: states to mark as detour states (red ring, and named in a legend).
        max_labels: only the edges taken by the most runs (this many) carry a label, so that
            maps with many states stay legible; the others are drawn unlabelled.

    Returns:
        the matplotlib ``Figure``.

    Edge width is proportional to the fitted transition probability; edges are curved so
    that ``i -> j`` and ``j -> i`` do not overlap. Nodes are labelled with the state and
    its occupancy (fraction of all decoded time steps).
    """
    if not isinstance(tmap, TrainingMap):
        raise ValueError(f"tmap must be a TrainingMap from training_map(), got {type(tmap).__name__}")
    if top_features < 0:
        raise ValueError(f"top_features={top_features}; must be >= 0")
    k = len(tmap.nodes)
    pos = _layout(k)
    if max_labels < 0:
        raise ValueError(f"max_labels={max_labels}; must be >= 0")
    detours = {int(d) for d in detours}
    if ax is None:
        side = 6.0 + 0.4 * max(0, k - 5)  # more states: a larger canvas at the same font size
        fig, ax = plt.subplots(figsize=(side + 0.5, side))
    else:
        fig = ax.figure

    max_occ = max((n.occupancy for n in tmap.nodes), default=1.0) or 1.0
    # Node radius in data units: area proportional to occupancy, capped so nodes don't merge.
    r_max = 0.28 if k > 2 else 0.35
    radii = [max(0.06, r_max * math.sqrt(n.occupancy / max_occ)) for n in tmap.nodes]
    colors = plt.get_cmap("viridis")([s / max(k - 1, 1) for s in range(k)])
    circles = []
    for node, (x, y), r, c in zip(tmap.nodes, pos, radii, colors):
        ring = dict(edgecolor="red", linewidth=3.0) if node.state in detours else dict(edgecolor="black", linewidth=1.0)
        circles.append(ax.add_patch(plt.Circle((x, y), r, facecolor=c, alpha=0.85, zorder=2, **ring)))
        ax.annotate(
            f"{node.state}\n{node.occupancy:.0%}",
            (x, y),
            ha="center",
            va="center",
            fontsize=9,
            color=text_color_on(c),
            zorder=3,
        )
    if detours:
        ax.plot([], [], "o", markerfacecolor="none", markeredgecolor="red", markeredgewidth=2.5,
                label="detour state" + ("s " if len(detours) > 1 else " ") + ", ".join(map(str, sorted(detours))))
        ax.legend(loc="lower right", fontsize=8, frameon=False)

    labelled = {id(e) for e in sorted(tmap.edges, key=lambda e: (-e.n_runs, -e.count))[:max_labels]}
    for e in tmap.edges:
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        arrow = FancyArrowPatch(
            (x0, y0),
            (x1, y1),
            arrowstyle="-|>",
            mutation_scale=14,
            connectionstyle=f"arc3,rad={_RAD}",
            linewidth=0.6 + 6.0 * e.prob,
            color="0.25",
            patchA=circles[e.src],
            patchB=circles[e.dst],
            shrinkA=2,
            shrinkB=2,
            zorder=1,
        )
        ax.add_patch(arrow)
        if id(e) not in labelled:
            continue
        label = f"p={e.prob:.2f}"
        for name, change in e.ranked_features[:top_features]:
            label += f"\n{name} {change:+.2f}"
        # Label on the arc's midpoint: matplotlib's arc3 control point sits at
        # mid + rad * (dy, -dx), and a quadratic Bezier passes half-way to it.
        mx, my = (x0 + x1) / 2, (y0 + y1) / 2
        dx, dy = x1 - x0, y1 - y0
        ax.annotate(
            label,
            (mx + 0.5 * _RAD * dy, my - 0.5 * _RAD * dx),
            ha="center",
            va="center",
            fontsize=7,
            zorder=3,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.8),
        )

    ax.set_xlim(-1.6, 1.6)
    ax.set_ylim(-1.6, 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight")
    return fig


# ------------------------------------------------------------------------------ report section
def report_section(store, sweep: str) -> list[tuple[str, bytes]]:
    """`raydyn report`'s HMM section: the BIC curves, and the training maps of up to six groups."""
    import json

    import numpy as np

    from raydyn.analysis.hmm import MapEdge, MapNode
    from raydyn.plots.labels import fig_png

    out = []
    models = store.table("hmm_models", sweep=sweep).to_pandas()
    trans = store.table("hmm_transitions", sweep=sweep).to_pandas()
    states = store.table("hmm_states", sweep=sweep).to_pandas()
    summary = store.table("hmm_summary", sweep=sweep).to_pandas()
    detours = store.table("hmm_detours", sweep=sweep).to_pandas() if "hmm_detours" in store.tables() else []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for g, d in models.groupby("group"):
        ax.plot(d.k, d.bic, marker="o", label=g)
    ax.set_xlabel("hidden states k")
    ax.set_ylabel("BIC (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.append(("HMM model selection: BIC per group", fig_png(fig, tight=False)))
    for g in list(models.group.unique())[:6]:
        chosen = models[(models.group == g) & models.chosen].iloc[0]
        feats = tuple(json.loads(chosen.features))
        k = int(chosen.k)
        runs = summary[summary.hmm_group == g].run_id
        st = states[states.run_id.isin(runs)]
        first = st.sort_values("step").groupby("run_id").state.first()
        nodes = tuple(MapNode(s, float((st.state == s).mean()), int((st.state == s).sum()),
                              float(st.groupby("run_id").state.apply(lambda x: s in set(x)).mean()),
                              float((first == s).mean())) for s in range(k))
        means = np.array(json.loads(chosen.means))
        edges = []
        for e in (trans[trans.group == g] if len(trans) else trans).itertuples():
            change = means[e.dst] - means[e.src]
            order = np.argsort(-np.abs(change))
            edges.append(MapEdge(int(e.src), int(e.dst), float(e.prob), int(e.count), int(e.n_runs), change, order,
                                 tuple((feats[i], float(change[i])) for i in order)))
        det = detours[(detours.group == g) & detours.detour].state.astype(int).tolist() if len(detours) else []
        fig = plot_training_map(TrainingMap(nodes, tuple(edges), feats), title=f"{g}: {k} states", detours=det)
        out.append((f"training map {g}", fig_png(getattr(fig, "figure", fig), tight=False)))
    return out
