"""Neurons in the pipeline: the recorder probe, the Ray job, phase-map metrics, report; bad input named.

Issue 6B: OPT/NPT/dead fractions recorded per layer and step on request; linearity probe and attraction
basins at chosen steps; all as phase-map metrics.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils import vector_to_parameters

from raydyn.analysis.neurons import linearity_probe, neuron_modes, sample_basin, weight_basin
from raydyn.errors import RaydynError
from raydyn.spec import parse_sweep, populations
from raydyn.tasks.build import init_model, load_data
from raydyn.train.checkpoint import PopulationCheckpoint
from raydyn.train.neurons import REF_SIZE
from raydyn.train.population import train_population

POP = """
name: n
task: {{dataset: digits, model: mlp, depth: {depth}, width: 12}}
train: {{steps: 40, batch_size: 32, record_every: 20, dtype: float64, record: [weights, neurons],
        weights: {{dtype: float64}}}}
parameters:
  lr: {{values: [0.05, 0.5]}}
"""


def _load(cfg, data, vec):
    net = init_model(cfg, data).double()
    vector_to_parameters(torch.tensor(np.array(vec), dtype=torch.float64), list(net.parameters()))
    return net


@pytest.mark.parametrize("depth", [1, 3])
def test_probe_equals_neuron_modes_on_the_rebuilt_model(depth):
    (pop,) = populations(parse_sweep(POP.format(depth=depth)).expand(), 64)
    res = train_population(pop)
    m = res.recorder.metrics_table().to_pandas()
    w = res.recorder.weights_table().to_pandas()
    data = load_data(pop.members[0].config).to(torch.float64)
    for mem in pop.members:
        for step in (0, 20, 40):
            row = m[(m.run_id == mem.run_id) & (m.step == step)].iloc[0]
            assert len(row.neuron_opt) == depth  # one value per activation layer: a list column
            net = _load(mem.config, data, w[(w.run_id == mem.run_id) & (w.step == step)].weights.iloc[0])
            modes = neuron_modes(net, data.x_train[:REF_SIZE])
            got = np.array([row.neuron_opt, row.neuron_npt, row.neuron_dead]).T
            assert np.array_equal(got, np.array(list(modes.values()))), (step, got, modes)
            np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_probe_columns_survive_a_resume(tmp_path):
    (pop,) = populations(parse_sweep(POP.format(depth=2)).expand(), 64)
    straight = train_population(pop).recorder.metrics_table()
    saved = []
    train_population(pop, checkpoint_every=25, on_checkpoint=saved.append)
    saved[-1].save(tmp_path / "c")
    resumed = train_population(pop, resume=PopulationCheckpoint.load(tmp_path / "c")).recorder.metrics_table()
    for col in ("neuron_opt", "neuron_npt", "neuron_dead"):
        assert resumed.column(col).to_pylist() == straight.column(col).to_pylist()


# ---------------------------------------------------------------------------- the Ray job
SWEEP = """
name: neujob
task: {dataset: digits, model: mlp, depth: 1, width: 16}
train: {steps: 60, batch_size: 64, record_every: 20, record: [weights, neurons], weights: {dtype: float64}}
method: grid
parameters:
  lr: {values: [0.05, 0.3]}
  depth: {values: [1, 2]}
resources: {cpu: 1}
"""


@pytest.fixture(scope="module")
def neu_store(ray_session, tmp_path_factory):
    from raydyn.jobs import run_job
    from raydyn.jobs.neurons import NeuronsJob
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep

    store = open_store(tmp_path_factory.mktemp("neustore"))
    assert run_sweep(parse_sweep(SWEEP), SWEEP, store).trained == 4
    job = run_job(NeuronsJob(steps="0,60", samples=64, directions=8, draws=4), store, "neujob")
    assert not job.failed and job.units == 4
    return store


@pytest.mark.ray
def test_job_equals_direct_calls_and_gives_phase_metrics(neu_store):
    import json

    from raydyn.jobs.base import load_trajectories
    from raydyn.aggregate.maps import runs_with_metrics
    from raydyn.train.objectives import loss_fn

    modes = neu_store.table("neurons_modes", sweep="neujob").to_pandas()
    summary = neu_store.table("neurons_summary", sweep="neujob").to_pandas()
    runs = neu_store.table("runs", sweep="neujob").to_pandas()
    assert set(modes.step) == {0, 60} and len(summary) == 4
    rid = runs[(runs.depth == 2) & (runs.lr == 0.3)].run_id.iloc[0]
    cfg = json.loads(runs[runs.run_id == rid].config_json.iloc[0])
    data = load_data(cfg).to(torch.float64)
    steps, x, _ = load_trajectories(neu_store, "neujob", [rid])[rid]
    net = _load(cfg, data, x[-1])
    X, y = data.x_train[:2048], data.y_train[:2048]
    got = modes[(modes.run_id == rid) & (modes.step == 60)].sort_values("layer_index")
    ref = neuron_modes(net, data.x_train[:REF_SIZE])
    assert np.array_equal(got[["opt", "npt", "dead"]].to_numpy(), np.array(list(ref.values())))
    lin = linearity_probe(net, X, y, loss_fn=lambda o, t: loss_fn("cross_entropy", o, t))
    np.testing.assert_allclose(got.lin_dloss, [lin.delta_loss[n] for n in ref], rtol=1e-12)
    row = summary[summary.run_id == rid].iloc[0]
    assert row.basin_sample == pytest.approx(sample_basin(net, X[:64], n_directions=8, seed=0).median, rel=1e-12)
    assert row.basin_weight == pytest.approx(weight_basin(net, X, y, n_draws=4, seed=0).sigma, rel=1e-12)
    assert row.opt_fraction == pytest.approx(got.opt.mean())
    # the recorder's probe saw the same weights at step 60
    m = neu_store.table("metrics", sweep="neujob").to_pandas()
    rec = m[(m.run_id == rid) & (m.step == 60)].iloc[0]
    np.testing.assert_allclose(rec.neuron_opt, got.opt.to_numpy())
    # phase-map metrics, per layer too (depth-1 runs have no opt_fraction_l1)
    pm = runs_with_metrics(neu_store, "neujob").to_pandas()
    for col in ("opt_fraction", "opt_fraction_l0", "opt_fraction_l1", "basin_sample", "basin_weight"):
        assert col in pm.columns, col
    assert pm[pm.depth == 1].opt_fraction_l1.isna().all() and pm[pm.depth == 2].opt_fraction_l1.notna().all()


@pytest.mark.ray
def test_cli_phase_map_and_report(neu_store, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from raydyn.cli import app
    from raydyn.report import build_report
    from raydyn.store import open_store

    root = tmp_path / "copy"
    shutil.copytree(neu_store.local_path(), root)
    cli = CliRunner()
    r = cli.invoke(app, ["phase-map", "neujob", "--metric", "basin_weight", "--x", "lr", "--y", "depth",
                         "--store", str(root), "--out", str(tmp_path / "m.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.png").stat().st_size > 1000
    page = build_report(open_store(root), "neujob", tmp_path / "r.html", metrics=["opt_fraction"]).read_text()
    assert "could not draw" not in page
    assert "OPT (order-preserving) fraction per layer over training" in page and "Attraction basins" in page
    # recorded with the probe but never analysed: the time course alone
    shutil.rmtree(root / "neurons_modes")
    shutil.rmtree(root / "neurons_summary")
    page = build_report(open_store(root), "neujob", tmp_path / "r2.html", metrics=["final_test_acc"]).read_text()
    assert "OPT (order-preserving) fraction per layer over training" in page and "Attraction basins" not in page
    r = cli.invoke(app, ["analyze", "neurons", "neujob", "--steps", "a,b", "--store", str(root)])
    assert isinstance(r.exception, RaydynError) and "--steps 'a,b'" in str(r.exception)


@pytest.mark.ray
def test_sketched_or_missing_weights_are_a_clear_error(ray_session, tmp_path):
    from raydyn.jobs import run_job
    from raydyn.jobs.neurons import NeuronsJob
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep

    text = SWEEP.replace("name: neujob", "name: neusketch").replace("steps: 60", "steps: 5") \
        .replace("weights: {dtype: float64}", "weights: {max_size: 100, projection_dim: 32}")
    store = open_store(tmp_path / "s")
    run_sweep(parse_sweep(text), text, store)
    with pytest.raises(RaydynError, match=r"stored 'full\+countsketch' snapshots.*train.record: \[neurons\]"):
        run_job(NeuronsJob(), store, "neusketch")
