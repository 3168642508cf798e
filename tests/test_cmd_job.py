"""CMD end to end: a digits-MLP sweep through Tune (weights + online CMD), the store, `analyze cmd` on Ray,
phase maps and the report; sketched snapshots refused by name.

Acceptance (issue 5): with at most 10 modes the reconstructed weights keep the final test accuracy within
1 point of the real weights; online CMD equals post-hoc CMD with the same modes (1e-6).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from raydyn.analysis.cmd import fit_fixed_modes
from raydyn.errors import RaydynError
from raydyn.jobs import run_job
from raydyn.jobs.base import Unit, load_trajectories
from raydyn.jobs.cmd import CMDJob
from raydyn.aggregate.maps import runs_with_metrics
from raydyn.spec import parse_sweep, populations
from raydyn.store import open_store
from raydyn.sweep import run_sweep
from raydyn.tasks.build import default_dtype
from raydyn.train.cmd_online import layer_slices
from raydyn.train.population import train_population

SWEEP = """
name: cmdt
task: {dataset: digits, model: mlp, depth: 2, width: 32}
train: {steps: 400, batch_size: 64, optimizer: sgd, lr: 0.1, record_every: 10,
        record: [weights, cmd_online], cmd: {warmup: 10, modes: 10}}
method: grid
parameters:
  lr: {values: [0.1, 0.3]}
  width: {values: [16, 64]}
resources: {cpu: 1, population_size: 8}
"""

SKETCH = """
name: cmdsketch
task: {dataset: digits, model: mlp, depth: 1, width: 8}
train: {steps: 30, batch_size: 64, lr: 0.1, record_every: 10, weights: {max_size: 100, projection_dim: 64}}
parameters: {lr: {values: [0.1, 0.2]}}
"""


@pytest.fixture(scope="module")
def cmd_store(ray_session, tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("cmdstore"))
    outcome = run_sweep(parse_sweep(SWEEP), SWEEP, store)
    assert outcome.trained == 4 and not outcome.failed_populations
    job = run_job(CMDJob(modes=10), store, "cmdt")
    assert not job.failed and job.units == 4
    return store


@pytest.mark.ray
@pytest.mark.slow  # the module's sweep + analysis: ~30-40 s on 2 busy cores
def test_reconstruction_with_10_modes_keeps_test_accuracy(cmd_store):
    runs = runs_with_metrics(cmd_store, "cmdt").to_pandas().sort_values(["width", "lr"])
    print("\nwidth lr    acc real  acc recon (10 modes)  recon error")
    for r in runs.itertuples():
        print(f"{r.width:5d} {r.lr:.1f}  {100 * r.cmd_test_acc_real:6.2f}%  {100 * r.cmd_test_acc_recon:6.2f}%  "
              f"{r.cmd_recon_error:.4f}")
    assert (runs.cmd_modes_needed == 10).all()
    # the snapshots evaluated through the rebuilt model reproduce the trainer's own final evaluation:
    # the recorder's parameter order is the model's
    np.testing.assert_allclose(runs.cmd_test_acc_real, runs.final_test_acc, atol=1e-9)
    np.testing.assert_allclose(runs.cmd_test_loss_real, runs.final_test_loss, rtol=1e-4)
    assert (runs.cmd_test_acc_drop <= 0.01).all(), runs[["lr", "width", "cmd_test_acc_drop"]]
    assert (runs.cmd_recon_error < 0.15).all()
    # per recorded step curves, one row per snapshot
    curves = cmd_store.table("cmd_curves", sweep="cmdt").to_pandas()
    assert curves.groupby("run_id").size().eq(41).all()
    assert curves[["test_acc_real", "test_acc_recon"]].notna().all().all()
    # modes: 10 per run, members cover every parameter, per layer
    modes = cmd_store.table("cmd_modes", sweep="cmdt").to_pandas()
    layers = cmd_store.table("cmd_layers", sweep="cmdt").to_pandas()
    for rid, g in modes.groupby("run_id"):
        assert len(g) == 10 and len(g.reference.iloc[0]) == 41
        per_layer = np.sum(np.stack(g.layer_members.to_numpy()), axis=0)
        lay = layers[layers.run_id == rid].set_index("layer").loc[list(g.layer_names.iloc[0])]
        assert per_layer.tolist() == lay.n_params.tolist() and g.members.sum() == lay.n_params.sum()
        assert lay.recon_error.between(0, 1).all()


@pytest.mark.ray
@pytest.mark.slow  # the module's sweep + analysis: ~30-40 s on 2 busy cores
def test_online_cmd_equals_posthoc_with_the_same_modes(cmd_store):
    coef = cmd_store.table("cmd_online_coefficients", sweep="cmdt").to_pylist()
    online_modes = cmd_store.table("cmd_online_modes", sweep="cmdt").to_pandas()
    summary = cmd_store.table("cmd_online_summary", sweep="cmdt").to_pandas().set_index("run_id")
    runs = cmd_store.table("runs", sweep="cmdt").to_pandas().set_index("run_id")
    assert len(coef) == 4
    for c in coef:
        rid = c["run_id"]
        steps, x, layout = load_trajectories(cmd_store, "cmdt", [rid])[rid]
        layers = layer_slices(layout["names"], np.diff(layout["offsets"]).tolist())
        post = fit_fixed_modes(x.T, np.array(c["reference_index"]), np.array(c["assignment"]), layers=layers)
        a, b = np.array(c["a"]), np.array(c["b"])
        scale = np.abs(x).max()
        np.testing.assert_allclose(a, post.a, atol=1e-6)
        np.testing.assert_allclose(b, post.b, atol=1e-6 * scale)
        assert summary.loc[rid, "cmd_online_recon_error"] == pytest.approx(post.error, abs=1e-6)
        refs = online_modes[online_modes.run_id == rid].sort_values("mode")
        np.testing.assert_allclose(np.stack(refs.reference.to_numpy()), post.references, atol=1e-12)
        assert refs.steps.iloc[0].tolist() == steps.tolist()
        # the online tracker evaluated the same final weights as the trainer
        assert summary.loc[rid, "cmd_online_test_acc_real"] == pytest.approx(runs.loc[rid, "final_test_acc"], abs=1e-9)
        assert summary.loc[rid, "cmd_online_modes_needed"] == 10 and len(steps) == 41
    print("\nonline CMD final test acc real -> recon:",
          ", ".join(f"{100 * r.cmd_online_test_acc_real:.1f}->{100 * r.cmd_online_test_acc_recon:.1f}"
                    for r in summary.itertuples()))


@pytest.mark.ray
@pytest.mark.slow  # the module's sweep + analysis: ~30-40 s on 2 busy cores
def test_cli_analyze_phase_map_and_report(cmd_store, tmp_path):
    from raydyn.cli import app
    from raydyn.report import build_report

    root = tmp_path / "copy"
    shutil.copytree(cmd_store.local_path(), root)
    cli = CliRunner()
    r = cli.invoke(app, ["analyze", "cmd", "cmdt", "--tolerance", "0.1", "--samples", "500", "--store", str(root)])
    assert r.exit_code == 0, r.output
    assert "wrote cmd_summary: 4 rows" in r.output
    summary = open_store(root).table("cmd_summary", sweep="cmdt").to_pandas()
    assert summary.cmd_modes_needed.between(1, 50).all() and (summary.cmd_recon_error < 0.1).all()
    r = cli.invoke(app, ["phase-map", "cmdt", "--metric", "cmd_modes_needed", "--x", "lr", "--y", "width",
                         "--store", str(root), "--out", str(tmp_path / "m.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.png").stat().st_size > 1000
    page = build_report(open_store(root), "cmdt", tmp_path / "r.html", metrics=["cmd_modes_needed"]).read_text()
    assert "could not draw" not in page
    assert page.count("reference trajectories and modes per layer") >= 2  # post-hoc and online runs
    assert "CMD: test accuracy of reconstructed vs real weights" in page


def test_sketched_snapshots_are_refused_naming_the_run(tmp_path):
    # the real trainer and recorder, written as a trial would (no Tune needed: the job refuses before fanning out)
    from raydyn.sweep import register_sweep
    from raydyn.train.recorder import runs_table

    spec, store = parse_sweep(SKETCH), open_store(tmp_path)
    register_sweep(spec, SKETCH, store)
    pop = populations(spec.expand(), 8)[0]
    with default_dtype(torch.float32):  # another test module may leave float64 as the default
        result = train_population(pop)
    assert "countsketch" in result.recorder.layout["kind"]
    store.write_runs("cmdsketch", pop.pop_id, runs=runs_table(result, pop.pop_id),
                     metrics=result.recorder.metrics_table(), weights=result.recorder.weights_table())
    rid = sorted(m.run_id for m in pop.members)[0]
    with pytest.raises(RaydynError, match=rf"run {rid} \(and 1 more of sweep 'cmdsketch'\): CMD needs the weights "
                                          r"themselves, but this run stored a CountSketch of them \(610 parameters "
                                          r"projected to 64 dimensions\).*train.record: \[cmd_online\]"):
        run_job(CMDJob(), store, "cmdsketch")
    # in a sweep where only some runs are sketched, their units fail with the same message
    with pytest.raises(RaydynError, match=f"run {rid}: .*CountSketch"):
        CMDJob().compute(store, "cmdsketch", Unit(rid, (rid,)))


def test_cli_modes_and_tolerance_are_exclusive(tmp_path):
    from raydyn.cli import app

    r = CliRunner().invoke(app, ["analyze", "cmd", "x", "--modes", "3", "--tolerance", "0.1", "--store", str(tmp_path)])
    assert isinstance(r.exception, RaydynError) and "give --modes or --tolerance, not both" in str(r.exception)


def test_cmd_settings_only_count_when_online_cmd_is_recorded():
    base = "name: s\ntask: {dataset: digits}\ntrain: {steps: 100, record_every: 10%s}\n"
    plain = parse_sweep(base % "").expand()[0]
    with_cmd = parse_sweep(base % ", cmd: {warmup: 5}").expand()[0]
    assert plain.run_id == with_cmd.run_id and "cmd" not in plain.config
    online = parse_sweep(base % ", record: [cmd_online], cmd: {warmup: 5}").expand()[0]
    assert online.run_id != plain.run_id and online.config["cmd"]["warmup"] == 5
    with pytest.raises(Exception, match=r"cmd.warmup: 20 recorded steps, but steps=100 with record_every=10 "
                                        r"records only 11"):
        parse_sweep(base % ", record: [cmd_online], cmd: {warmup: 20}")
    assert json.loads(json.dumps(online.config))["record"] == ["cmd_online"]
