"""Koopman conjugacy over a sweep (Redman et al., NeurIPS 2024), fanned out on Ray.

Units are groups of runs (``--group-by``; default: each run alone) treated as nearby
initialisations of one system: one DMD spectrum per group from its runs' weight
trajectories, computed on Ray workers. The driver then computes every pairwise
Wasserstein distance between spectra in blocks on Ray actors (spectra put in the
object store once) and clusters the distance matrix into conjugacy classes.

Tables: ``koopman_spectra`` (group, eigenvalue index, real, imag, |lambda|),
``koopman_distances`` (group_a, group_b, distance), ``koopman_summary`` (run_id,
koopman_group, koopman_class, koopman_max_abs_eig, koopman_n_eigs): the phase-map metrics.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from raydyn.jobs.base import Job, Unit, group_units, load_trajectories


class KoopmanJob(Job):
    name = "koopman"

    def __init__(self, group_by: list[str] | None = None, layers: list[str] | None = None, delays: int = 4,
                 rank: Any = None, pca: int | None = None, continuous: bool = False, p: float = 1.0,
                 threshold: float | None = None, n_classes: int | None = None, embed_dim: int | None = None):
        super().__init__(group_by=group_by, layers=layers, delays=delays, rank=rank, pca=pca, continuous=continuous,
                         p=p, threshold=threshold, n_classes=n_classes, embed_dim=embed_dim)

    def plan(self, store, sweep: str) -> list[Unit]:
        runs = store.table("runs", sweep=sweep)
        return group_units(runs, self.options["group_by"])

    def compute(self, store, sweep: str, unit: Unit) -> dict[str, pa.Table]:
        from raydyn.analysis.koopman import spectrum

        o = self.options
        trajs = load_trajectories(store, sweep, unit.run_ids, o["layers"])
        if not trajs:
            raise ValueError(f"group {unit.key}: no weight snapshots")
        runs = store.table("runs", sweep=sweep, columns=["run_id", "record_every"])
        dt = float(runs.column("record_every")[0].as_py()) if runs.num_rows else 1.0
        arrays = [x for _, x, _ in trajs.values()]
        for rid, (_, x, _) in trajs.items():
            if not np.isfinite(x).all():
                raise ValueError(f"run {rid} has NaN/inf weights (diverged?); exclude it or record fewer steps")
        delays = o["delays"]
        if o.get("embed_dim"):  # delays per group so that (delays + 1) x state dimension ~ embed_dim
            state = o["pca"] or arrays[0].shape[1]
            delays = max(0, int(round(o["embed_dim"] / state)) - 1)
            shortest = min(len(x) for x in arrays)
            if delays + 2 > shortest:
                raise ValueError(f"group {unit.key}: --embed-dim {o['embed_dim']} needs {delays} delays for state "
                                 f"dimension {state}, more than its shortest trajectory ({shortest} steps) allows")
        eigs = spectrum(arrays, delays, o["rank"], dt=dt, continuous=o["continuous"], pca=o["pca"])
        n = len(eigs)
        spectra = pa.table({
            "group": [unit.key] * n,
            "index": np.arange(n, dtype=np.int64),
            "real": eigs.real.astype(np.float64),
            "imag": eigs.imag.astype(np.float64),
            "abs": np.abs(eigs).astype(np.float64),
            "run_ids": [json.dumps(list(trajs))] * n,
            "delays": np.full(n, delays, dtype=np.int64),
        })
        return {"koopman_spectra": spectra}

    def finish(self, store, sweep: str, tables: dict[str, pa.Table], results) -> dict[str, pa.Table]:
        from raydyn import fanout
        from raydyn.analysis.koopman import conjugacy_classes

        sp = tables.get("koopman_spectra")
        if sp is None or sp.num_rows == 0:
            return {}
        d = sp.to_pydict()
        groups: dict[str, dict[str, Any]] = {}
        for g, re_, im, rids in zip(d["group"], d["real"], d["imag"], d["run_ids"]):
            e = groups.setdefault(g, {"eigs": [], "runs": json.loads(rids)})
            e["eigs"].append(complex(re_, im))
        names = sorted(groups)
        spectra = [np.array(groups[g]["eigs"]) for g in names]
        dist = fanout.pairwise_distance_matrix(spectra, p=self.options["p"]) if len(names) > 1 else np.zeros((1, 1))
        if len(names) > 1:
            labels = conjugacy_classes(dist, threshold=self.options["threshold"], n_classes=self.options["n_classes"])
        else:
            labels = np.zeros(1, dtype=int)
        ia, ib = np.triu_indices(len(names), 1)
        distances = pa.table({"group_a": [names[i] for i in ia], "group_b": [names[j] for j in ib],
                              "distance": dist[ia, ib].astype(np.float64)})
        rows = {"run_id": [], "koopman_group": [], "koopman_class": [], "koopman_max_abs_eig": [], "koopman_n_eigs": []}
        for k, g in enumerate(names):
            e = spectra[k]
            for r in groups[g]["runs"]:
                rows["run_id"].append(r)
                rows["koopman_group"].append(g)
                rows["koopman_class"].append(int(labels[k]))
                rows["koopman_max_abs_eig"].append(float(np.abs(e).max()) if len(e) else float("nan"))
                rows["koopman_n_eigs"].append(len(e))
        summary = pa.table(rows).cast(pa.schema([("run_id", pa.string()), ("koopman_group", pa.string()),
                                                 ("koopman_class", pa.int64()), ("koopman_max_abs_eig", pa.float64()),
                                                 ("koopman_n_eigs", pa.int64())]))
        return {"koopman_distances": distances, "koopman_summary": summary}


def _parse_rank(rank: Optional[str]) -> Any:
    if rank is None or rank == "full":
        return None
    if rank == "optimal":
        return "optimal"
    try:
        v = float(rank)
    except ValueError:
        from raydyn.errors import RaydynError

        raise RaydynError(f"--rank {rank!r}: give an integer, an energy fraction in (0, 1), 'optimal' or 'full'") from None
    return int(v) if v >= 1 else v


def register_cli(analyze_app) -> None:
    import typer

    @analyze_app.command("koopman")
    def koopman(
        sweep: str = typer.Argument(..., help="Sweep name in the store, or its sweep file."),
        group_by: Optional[str] = typer.Option(None, "--group-by", help="Comma-separated runs columns; the runs of a "
                                               "group are nearby initialisations of one system (default: each run)."),
        layers: Optional[str] = typer.Option(None, "--layers", help="Comma-separated parameter-name prefixes to use."),
        delays: int = typer.Option(4, "--delays", help="Time delays in the Hankel embedding."),
        embed_dim: Optional[int] = typer.Option(None, "--embed-dim", help="Instead of --delays: per group, the delays d "
                                                "with (d + 1) x state dimension closest to this (Redman et al. scale "
                                                "delays so across widths, e.g. 2000 gives d = 39, 19, 4 for 50, 100, "
                                                "400 weights)."),
        rank: Optional[str] = typer.Option(None, "--rank", help="DMD rank: integer, energy fraction, 'optimal' or full."),
        pca: Optional[int] = typer.Option(None, "--pca", help="Project weights on their top-k principal components first."),
        continuous: bool = typer.Option(False, "--continuous", help="Compare log(lambda)/dt (independent of record_every)."),
        threshold: Optional[float] = typer.Option(None, "--threshold", help="Distance below which groups are one class."),
        n_classes: Optional[int] = typer.Option(None, "--classes", help="Number of conjugacy classes (instead of threshold)."),
        store: Optional[str] = typer.Option(None, "--store", help="Store URI (default: $RAYDYN_STORE or ./raydyn-results)."),
        address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: local)."),
    ) -> None:
        """Koopman spectra per run/group, pairwise Wasserstein distances, conjugacy classes (Redman et al. 2024)."""
        from raydyn.cli import run_analysis
        from raydyn.errors import RaydynError

        if embed_dim is not None and embed_dim < 1:
            raise RaydynError(f"--embed-dim must be a positive integer, got {embed_dim}")
        job = KoopmanJob(group_by=group_by.split(",") if group_by else None, layers=layers.split(",") if layers else None,
                         delays=delays, rank=_parse_rank(rank), pca=pca, continuous=continuous, threshold=threshold,
                         n_classes=n_classes, embed_dim=embed_dim)
        run_analysis(job, sweep, store, address)


def report_section(store, sweep: str) -> list[tuple[str, bytes]]:
    """Spectra in the complex plane (up to 12 groups) and the clustered distance matrix."""
    from raydyn.plots.koopman import plot_distance_matrix, plot_spectra
    from raydyn.report.html import fig_png

    def png(fig) -> bytes:
        return fig_png(fig, tight=False)

    sp = store.table("koopman_spectra", sweep=sweep).to_pandas()
    groups = sorted(sp.group.unique())
    spectra = {g: (sp[sp.group == g].real + 1j * sp[sp.group == g].imag).to_numpy() for g in groups[:12]}
    out = [("Koopman eigenvalues per group (unit circle dashed)", png(plot_spectra(spectra, title=sweep)))]
    dist = store.table("koopman_distances", sweep=sweep).to_pandas()
    if len(dist):
        idx = {g: i for i, g in enumerate(groups)}
        m = np.zeros((len(groups), len(groups)))
        for r in dist.itertuples():
            m[idx[r.group_a], idx[r.group_b]] = m[idx[r.group_b], idx[r.group_a]] = r.distance
        out.append(("Wasserstein distances between spectra, clustered",
                    png(plot_distance_matrix(m, labels=groups, title=sweep))))
    return out


from raydyn.report.html import SECTIONS  # noqa: E402

SECTIONS["koopman_"] = report_section
