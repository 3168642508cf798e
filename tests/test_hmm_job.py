"""The HMM job end to end: a small sweep trained on Ray, every (group, k, restart) fit fanned out, tables in the store."""
from __future__ import annotations

import numpy as np
import pytest

from raydyn.jobs import run_job
from raydyn.jobs.hmm import HMMJob
from raydyn.aggregate.maps import phase_map_info, runs_with_metrics
from raydyn.spec import parse_sweep
from raydyn.store import open_store
from raydyn.sweep import run_sweep


SWEEP = """
name: hmmjob
task: {dataset: digits, model: mlp, depth: 1, width: 16}
train: {steps: 120, batch_size: 32, lr: 0.1, record_every: 10, eval_every: 10, record: [weight_stats]}
parameters:
  lr: {values: [0.05, 0.5]}
  seed: {values: [0, 1, 2, 3, 4]}
resources: {cpu: 1}
"""


@pytest.mark.ray
def test_hmm_job_writes_states_models_and_phase_metrics(ray_session, tmp_path):
    store = open_store(tmp_path)
    spec = parse_sweep(SWEEP)
    run_sweep(spec, SWEEP, store)
    seen = []
    outcome = run_job(HMMJob(max_states=3, restarts=2, convergence_threshold=0.8), store, "hmmjob",
                      progress=lambda d, t, f: seen.append((d, t, f)))
    assert not outcome.failed
    assert outcome.units == 2 * 3 * 2  # two groups (lr values) x k=1..3 x 2 restarts, one Ray task each
    assert seen[-1] == (12, 12, 0)
    models = store.table("hmm_models", sweep="hmmjob").to_pandas()
    assert set(models.group) == {"lr=0.05", "lr=0.5"} and (models.groupby("group").chosen.sum() == 1).all()
    # the chosen k has the lowest BIC of its group; Hu et al.'s held-out BIC is reported next to it
    for _, g in models.groupby("group"):
        assert g.loc[g.chosen, "bic"].item() == g.bic.min()
        assert g.heldout_bic.notna().all()
    # detour p-values are reported raw and Holm-adjusted over each group's tested states
    from raydyn.analysis.hmm import adjust_pvalues

    det = store.table("hmm_detours", sweep="hmmjob").to_pandas()
    assert (det.correction == "holm").all()
    for _, g in det.groupby("group"):
        np.testing.assert_allclose(g.p_adj.to_numpy(), adjust_pvalues(g.p.to_numpy(), "holm"), equal_nan=True)
        assert not (g.detour & ~(g.p_adj < 0.05)).any()
    states = store.table("hmm_states", sweep="hmmjob").to_pandas()
    assert states.groupby("run_id").step.apply(list).map(lambda s: s == list(range(0, 121, 10))).all()
    summary = runs_with_metrics(store, "hmmjob").to_pandas()
    assert summary.hmm_n_states.between(1, 3).all() and summary.convergence_step.notna().all()
    # the fast learning rate converges (test accuracy > 0.8) no later than the slow one, by median
    med = summary.groupby("lr").convergence_step.median()
    assert med[0.5] <= med[0.05]
    info = phase_map_info(runs_with_metrics(store, "hmmjob"), "hmm_n_states", "lr", "seed")
    assert np.isfinite(info.median).all()
    from raydyn.report import build_report

    page = build_report(store, "hmmjob", tmp_path / "r.html", axes=spec.axes()).read_text()
    assert "<h2>hmm</h2>" in page and page.count("<figcaption>training map lr=") == 2 and "could not draw" not in page


def test_hmm_cli_passes_standardize_selection_and_correction(monkeypatch):
    """`raydyn analyze hmm` hands --standardize/--selection/--correction to the job; bad values are named."""
    from typer.testing import CliRunner

    import raydyn.cli as cli

    seen = {}
    monkeypatch.setattr(cli, "run_analysis", lambda job, *a, **k: seen.update(job.options))
    r = CliRunner().invoke(cli.app, ["analyze", "hmm", "x", "--standardize", "run", "--selection", "heldout",
                                     "--correction", "bh"])
    assert r.exit_code == 0, r.output
    assert (seen["standardize"], seen["selection"], seen["correction"]) == ("run", "heldout", "bh")
    r = CliRunner().invoke(cli.app, ["analyze", "hmm", "x"])
    assert (seen["standardize"], seen["selection"], seen["correction"]) == ("global", "bic", "holm")
    r = CliRunner().invoke(cli.app, ["analyze", "hmm", "x", "--standardize", "zscore"])
    assert "--standardize 'zscore': allowed values are global, run, none" in str(r.exception)  # main() prints it, exit 2


@pytest.mark.ray
def test_default_features_come_from_snapshots_when_metrics_hold_list_columns(ray_session, tmp_path):
    """A sweep that recorded weights but not weight_stats: the HMM's default features are computed from the
    snapshots and joined onto the metrics rows, whose list columns (weight_norms) Arrow cannot join on."""
    sweep = """
name: hmmsnap
task: {dataset: digits, model: mlp, depth: 1, width: 8}
train: {steps: 40, batch_size: 32, lr: 0.1, record_every: 5, eval_every: 20, record: [weights]}
parameters:
  seed: {values: [0, 1, 2]}
resources: {cpu: 1}
"""
    store = open_store(tmp_path)
    run_sweep(parse_sweep(sweep), sweep, store)
    assert "weight_norms" in store.table("metrics", sweep="hmmsnap").column_names
    outcome = run_job(HMMJob(max_states=2, restarts=1, held_out=0.0, selection="bic"), store, "hmmsnap")
    assert not outcome.failed and outcome.tables["hmm_summary"] == 3
    import json

    from raydyn.jobs.hmm import DEFAULT_FEATURES

    feats = set(json.loads(store.table("hmm_models", sweep="hmmsnap").column("features")[0].as_py()))
    assert feats and feats <= set(DEFAULT_FEATURES) and "w_l2" in feats
