"""Koopman end to end: the OMD/OGD/bisection validation sweep through Tune, the store and the fan-out.

Redman et al. (NeurIPS 2024) report W(OMD, OGD) ~ 0.0081 and W(OGD, bisection) ~ 0.75 with 4 delays
and full-rank DMD; the conjugate pair must come out at least 30x closer than either other pair.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from raydyn.jobs import run_job
from raydyn.jobs.koopman import KoopmanJob
from raydyn.aggregate.maps import runs_with_metrics
from raydyn.spec import load_sweep
from raydyn.store import open_store
from raydyn.sweep import run_sweep

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_omd_ogd_bisection_separation_through_the_pipeline(ray_session, tmp_path):
    spec, text = load_sweep(ROOT / "sweeps" / "omd_ogd.yaml")
    store = open_store(tmp_path)
    assert run_sweep(spec, text, store).trained == 75
    outcome = run_job(KoopmanJob(group_by=["optimizer"], delays=4), store, "omd_ogd")
    assert not outcome.failed and outcome.units == 3
    d = {(r["group_a"], r["group_b"]): r["distance"]
         for r in store.table("koopman_distances", sweep="omd_ogd").to_pylist()}
    w = lambda a, b: d.get((f"optimizer={a}", f"optimizer={b}"), d.get((f"optimizer={b}", f"optimizer={a}")))  # noqa: E731
    print(f"W(OMD,OGD)={w('omd', 'ogd'):.5f} (published 0.0081)  W(OGD,bis)={w('ogd', 'bisection'):.4f} "
          f"W(OMD,bis)={w('omd', 'bisection'):.4f} (published 0.75)")
    assert w("omd", "ogd") == pytest.approx(0.0081, rel=0.05)
    assert w("ogd", "bisection") > 30 * w("omd", "ogd") and w("omd", "bisection") > 30 * w("omd", "ogd")
    # conjugacy classes need a scale: without seeds in --group-by, --threshold or --classes the
    # default is one class (the largest-gap cut used to split even one system)
    runs = runs_with_metrics(store, "omd_ogd").to_pandas()
    assert (runs.koopman_class == 0).all() and runs.koopman_class_rule.str.startswith("one class").all()
    outcome = run_job(KoopmanJob(group_by=["optimizer"], delays=4, n_classes=2), store, "omd_ogd")
    runs = runs_with_metrics(store, "omd_ogd").to_pandas()
    cls = runs.groupby("optimizer").koopman_class.agg(["nunique", "first"])
    assert (cls["nunique"] == 1).all() and (runs.koopman_class_rule == "--classes 2").all()
    assert cls.loc["omd", "first"] == cls.loc["ogd", "first"] != cls.loc["bisection", "first"]
    assert set(store.table("koopman_spectra", sweep="omd_ogd").column("precision").to_pylist()) == {"float64"}
    spectra = store.table("koopman_spectra", sweep="omd_ogd").to_pandas()
    assert set(spectra.group) == {"optimizer=omd", "optimizer=ogd", "optimizer=bisection"}
    from raydyn.report import build_report

    page = build_report(store, "omd_ogd", tmp_path / "r.html", axes=spec.axes()).read_text()
    assert "<h2>koopman</h2>" in page and "could not draw" not in page


EMBED = """
name: kembed
task: {dataset: digits, model: mlp, depth: 1, width: 3, bias: false, init_perturb: 0.001}
train: {steps: 40, batch_size: 60, lr: 0.1, record_every: 1, eval_every: 20, record: [weights],
        weights: {layers: ["3."]}}
parameters:
  width: {values: [3, 6]}
  perturb: {values: [0, 1, 2]}
resources: {cpu: 1}
"""


def test_embed_dim_scales_delays_with_the_state_dimension(ray_session, tmp_path):
    """--embed-dim: (delays + 1) x state dimension ~ embed_dim per group (Redman et al.'s width scaling);
    each group's spectrum equals the pure function's with those delays."""
    import numpy as np

    from raydyn.analysis.koopman import spectrum
    from raydyn.jobs.base import load_trajectories
    from raydyn.spec import parse_sweep

    store = open_store(tmp_path)
    assert run_sweep(parse_sweep(EMBED), EMBED, store).trained == 6
    outcome = run_job(KoopmanJob(group_by=["width"], layers=["3."], embed_dim=120, rank=5), store, "kembed")
    assert not outcome.failed
    sp = store.table("koopman_spectra", sweep="kembed").to_pandas()
    delays = sp.groupby("group").delays.first().to_dict()
    assert delays == {"width=3": 3, "width=6": 1}  # 30 and 60 output weights: 120/30 - 1, 120/60 - 1
    runs = store.table("runs", sweep="kembed", columns=["run_id", "width"]).to_pandas()
    for width, d in ((3, 3), (6, 1)):
        ids = runs[runs.width == width].run_id.tolist()
        trajs = load_trajectories(store, "kembed", ids, ["3."])
        ref = spectrum([trajs[r][1] for r in ids], d, 5)
        got = sp[sp.group == f"width={width}"].sort_values("index")
        np.testing.assert_allclose(np.sort_complex(got.real.to_numpy() + 1j * got.imag.to_numpy()),
                                   np.sort_complex(ref), atol=1e-8)


PRECISION = """
name: kprec
task: {dataset: digits, model: mlp, depth: 1, width: 3, bias: false, init_perturb: 0.001}
train: {steps: 40, batch_size: 60, lr: 0.1, record_every: 1, eval_every: 15, curvature_every: 30, record: [weights],
        weights: {layers: ["3."]}}
parameters:
  record_every: {values: [1, 2]}
  seed: {values: [0, 1, 2]}
  perturb: {values: [0, 1]}
resources: {cpu: 1}
"""


def test_stored_precision_per_group_dt_off_grid_records_and_seed_classes(ray_session, tmp_path):
    """float32 snapshots get float32's rank cutoff (cast to float64 first, rounding noise became
    eigenvalues); dt is each group's record_every (it was the sweep's first run's); evaluation
    steps off the record_every grid are dropped; with seeds in --group-by classes are cut at
    mean + 3 SD of the seed-to-seed distances."""
    import numpy as np

    from raydyn.analysis.koopman import pairwise_wasserstein, seed_threshold, spectrum
    from raydyn.jobs.base import load_trajectories
    from raydyn.spec import parse_sweep

    store = open_store(tmp_path)
    assert run_sweep(parse_sweep(PRECISION), PRECISION, store).trained == 12
    outcome = run_job(KoopmanJob(group_by=["record_every", "seed"], layers=["3."], delays=2, continuous=True),
                      store, "kprec")
    assert not outcome.failed, outcome.failed
    sp = store.table("koopman_spectra", sweep="kprec").to_pandas()
    assert set(sp.precision) == {"float32"}
    dts = sp.groupby("group").dt.first().to_dict()
    assert dts == {f"record_every={e},seed={s}": float(e) for e in (1, 2) for s in (0, 1, 2)}
    runs = store.table("runs", sweep="kprec", columns=["run_id", "record_every", "seed"]).to_pandas()
    spectra, periods, names = [], [], sorted(dts)
    for g in names:
        every, seed = (int(v.split("=")[1]) for v in g.split(","))
        ids = runs[(runs.record_every == every) & (runs.seed == seed)].run_id.tolist()
        trajs = load_trajectories(store, "kprec", ids, ["3."], keep_dtype=True)
        arrays = []
        for r in ids:
            st, x, _ = trajs[r]
            on = st % every == 0  # record_every=2, eval_every=15: step 15 is off the grid
            assert x.dtype == np.float32 and (every == 1 or (~on).sum() == 1)
            arrays.append(x[on])
        ref = spectrum(arrays, 2, dt=float(every), continuous=True)
        got = sp[sp.group == g].sort_values("index")
        np.testing.assert_allclose(np.sort_complex(got.real.to_numpy() + 1j * got.imag.to_numpy()),
                                   np.sort_complex(ref), atol=1e-8)
        cast = spectrum([a.astype(np.float64) for a in arrays], 2, dt=float(every), continuous=True)
        assert len(ref) < len(cast)  # the float64 cutoff keeps float32 rounding noise as eigenvalues
        spectra.append(ref)
        periods.append(2 * np.pi / every)
    d = {(r["group_a"], r["group_b"]): r["distance"] for r in store.table("koopman_distances", sweep="kprec").to_pylist()}
    ref_d = pairwise_wasserstein(spectra, imag_period=periods)
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            assert d[(a, names[j])] == pytest.approx(ref_d[i, j], rel=1e-9, abs=1e-12)
    summary = store.table("koopman_summary", sweep="kprec").to_pandas()
    within = [ref_d[i, j] for i in range(6) for j in range(i + 1, 6) if names[i][:14] == names[j][:14]]
    assert len(within) == 6
    rule = summary.koopman_class_rule.iloc[0]
    assert rule.startswith("seed-to-seed: mean + 3 SD of 6 distances") and f"{seed_threshold(within):.4g}" in rule
    # --windows: one spectrum per group and step window (both ends included), one row per run and window
    outcome = run_job(KoopmanJob(group_by=["record_every", "seed"], layers=["3."], delays=2, rank=3,
                                 windows=[(0, 20), (20, 40)]), store, "kprec")
    assert not outcome.failed, outcome.failed
    sp = store.table("koopman_spectra", sweep="kprec").to_pandas()
    assert len(set(sp.group)) == 12 and set(sp.window) == {"steps=0-20", "steps=20-40"}
    ids = runs[(runs.record_every == 2) & (runs.seed == 1)].run_id.tolist()
    trajs = load_trajectories(store, "kprec", ids, ["3."], keep_dtype=True)
    cut = [trajs[r][1][(trajs[r][0] % 2 == 0) & (trajs[r][0] >= 20) & (trajs[r][0] <= 40)] for r in ids]
    assert all(len(c) == 11 for c in cut)
    got = sp[sp.group == "record_every=2,seed=1|steps=20-40"].sort_values("index")
    np.testing.assert_allclose(np.sort_complex(got.real.to_numpy() + 1j * got.imag.to_numpy()),
                               np.sort_complex(spectrum(cut, 2, 3)), atol=1e-8)
    win = store.table("koopman_windows", sweep="kprec").to_pandas()
    assert len(win) == 24 and set(win.koopman_window) == {"steps=0-20", "steps=20-40"}


def test_windows_option_is_parsed_and_bad_values_named():
    from raydyn.errors import RaydynError
    from raydyn.jobs.koopman import _parse_windows

    assert _parse_windows("0-100,100-200") == [(0, 100), (100, 200)]
    assert _parse_windows(None) is None
    with pytest.raises(RaydynError, match="must have 0 <= START < END"):
        _parse_windows("5-2")
    with pytest.raises(RaydynError, match="START-END separated by commas"):
        _parse_windows("0:100")
