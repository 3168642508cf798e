"""The analyses that rebuild a run's model (post-hoc CMD's evaluation, neurons, symmetry) on tracked sweeps:
runs logged with ``raydyn.track`` from a user's own torch loop, whose configs are the user's.

A tracked run is rebuilt only when its config names a model factory and a data set (the plug-in contract,
``config["model"] = "module:callable"``). Otherwise CMD still decomposes the stored weights and skips the
evaluation with one note; neurons and symmetry refuse, naming the run and what its config needs.
"""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import raydyn
import raydyn.track
from raydyn.errors import RaydynError
from raydyn.jobs import run_job
from raydyn.jobs.base import Unit, rebuild_config
from raydyn.jobs.cmd import CMDJob, skipped_lines
from raydyn.jobs.neurons import NeuronsJob
from raydyn.jobs.symmetry import SymmetryJob, layer_params
from raydyn.store import open_store

PLUGIN = '''
"""What a user's own training script imports: a model factory and a data loader."""
import numpy as np
from torch import nn


def mlp(input_shape, out_dim, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), width), nn.ReLU(),
                         nn.Linear(width, out_dim))


def blobs(n=96, d=8, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * 1.5
    y = rng.integers(0, classes, size=2 * n)
    x = (centres[y] + rng.normal(size=(2 * n, d))).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]
'''
STEPS = 30
LR = (0.05, 0.1, 0.2)


def _train(root, sweep: str, config: dict, model: torch.nn.Module, data) -> dict:
    """The user's loop: full-batch SGD, a snapshot and the metrics every step. Returns the final metrics."""
    x_tr, y_tr, x_te, y_te = (torch.as_tensor(a) for a in data)
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"])
    with raydyn.track(root, sweep=sweep, config=config) as run:
        for step in range(STEPS):
            loss = torch.nn.functional.cross_entropy(model(x_tr), y_tr)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                out = model(x_te)
                last = {"train_loss": loss.item(), "test_loss": torch.nn.functional.cross_entropy(out, y_te).item(),
                        "test_acc": (out.argmax(1) == y_te).double().mean().item()}
            run.log(step, model=model, **last)
    return {"run_id": run.run_id, **last}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """Three sweeps in one store: ``mine`` (the user's config only), ``plug`` (its config names the factory and
    the loader), ``lowrank`` (snapshots with a known 3-mode structure)."""
    plugin_dir = tmp_path_factory.mktemp("userproject")
    (plugin_dir / "trackjobs_plugin.py").write_text(PLUGIN)
    sys.path.insert(0, str(plugin_dir))
    import trackjobs_plugin as user

    root = tmp_path_factory.mktemp("trackstore")
    data = user.blobs()
    finals = {}
    with torch.random.fork_rng():
        for seed, lr in enumerate(LR):
            torch.manual_seed(seed)
            _train(root, "mine", {"lr": lr, "width": 16, "seed": seed}, user.mlp((8,), 3, width=16), data)
            torch.manual_seed(seed)
            cfg = {"lr": lr, "width": 16, "seed": seed, "model": "trackjobs_plugin:mlp",
                   "dataset": "trackjobs_plugin:blobs", "data": {"n": 96}}
            f = _train(root, "plug", cfg, user.mlp((8,), 3, width=16), data)
            finals[f["run_id"]] = f
        # snapshots of a known low-rank structure: every parameter is a_i g_k(t) for one of 3 time courses g_k
        rng = np.random.default_rng(0)
        t = np.linspace(0, 1, STEPS)
        g = np.stack([t, np.sin(3 * np.pi * t), np.exp(-6 * t)])
        for seed in range(2):
            amp, mode = rng.normal(size=120), rng.integers(0, 3, size=120)
            w = amp[:, None] * g[mode]  # (120, T)
            with raydyn.track(root, sweep="lowrank", config={"seed": seed}) as run:
                for k in range(STEPS):
                    run.log(k, train_loss=float(k), model={"layer0.weight": torch.tensor(w[:80, k]).reshape(8, 10),
                                                           "layer1.weight": torch.tensor(w[80:, k])})
    yield open_store(root), finals
    sys.path.remove(str(plugin_dir))
    sys.modules.pop("trackjobs_plugin", None)


def _ids(store, sweep):
    return sorted(store.table("runs", sweep=sweep, columns=["run_id"]).column("run_id").to_pylist())


def test_rebuild_config_follows_the_plugin_contract(tracked):
    store, _ = tracked
    layout = {"kind": "full", "dtype": "float32"}
    cfg, why = rebuild_config(store, "mine", {"lr": 0.1, "width": 16, "seed": 0}, layout)
    assert cfg is None and why == "its config names no model factory"
    _, why = rebuild_config(store, "mine", {"model": "resnet18", "seed": 0}, layout)
    assert why == "its config['model'] = 'resnet18' is not a model factory 'module:callable'"
    _, why = rebuild_config(store, "mine", {"model": "trackjobs_plugin:mlp", "seed": 0}, layout)
    assert "no data set (config['dataset'])" in why
    _, why = rebuild_config(store, "mine", {"model": "trackjobs_plugin:nope", "dataset": "teacher", "seed": 0}, layout)
    assert why.startswith("its model or data set cannot be loaded") and "nope" in why
    # a factory and a data set: raydyn's own keys filled in; labels the factory does not take are not passed
    cfg, why = rebuild_config(store, "plug", {"model": "trackjobs_plugin:mlp", "dataset": "teacher", "seed": 3,
                                              "width": 16, "depth": 5, "loss": "my_focal_loss"}, layout)
    assert why is None and cfg["dtype"] == "float32" and cfg["data"]["n_train"] == 512 and cfg["seed"] == 3
    assert cfg["width"] == 16 and "depth" not in cfg and "loss" not in cfg and cfg["model_options"] == {}


@pytest.mark.ray
def test_cmd_on_a_tracked_sweep_decomposes_and_notes_the_skipped_evaluation(ray_session, tracked):
    from raydyn.cli import app

    store, _ = tracked
    r = CliRunner().invoke(app, ["analyze", "cmd", "mine", "--tolerance", "0.02", "--store", store.uri])
    assert r.exit_code == 0, r.output
    assert "wrote cmd_summary: 3 rows" in r.output and "wrote cmd_modes" in r.output
    ids = _ids(store, "mine")
    # one note for the three runs, naming one of them and what the config needs
    assert r.output.count("CMD evaluation skipped") == 1, r.output
    assert (f"CMD evaluation skipped for 3 of 3 run(s) (run {ids[0]} and 2 more): its config names no model "
            "factory. To evaluate, log the run with config['model'] = 'module:callable'") in r.output
    summary = store.table("cmd_summary", sweep="mine").to_pandas()
    assert sorted(summary.run_id) == ids
    assert (summary.cmd_recon_error < 0.02).all() and summary.cmd_modes_needed.between(1, 50).all()
    assert summary.cmd_test_acc_real.isna().all() and summary.cmd_eval_skipped.notna().all()
    layers = store.table("cmd_layers", sweep="mine").to_pandas()
    assert layers.groupby("run_id").n_params.sum().eq(8 * 16 + 16 + 16 * 3 + 3).all()
    curves = store.table("cmd_curves", sweep="mine").to_pandas()
    assert curves.groupby("run_id").size().eq(STEPS).all() and curves.test_acc_real.isna().all()
    # --no-eval: nothing skipped, nothing noted
    r = CliRunner().invoke(app, ["analyze", "cmd", "mine", "--no-eval", "--store", store.uri])
    assert r.exit_code == 0 and "skipped" not in r.output, r.output


@pytest.mark.ray
def test_cmd_finds_the_modes_of_a_known_low_rank_trajectory(ray_session, tracked):
    store, _ = tracked
    outcome = run_job(CMDJob(tolerance=1e-3), store, "lowrank")
    assert not outcome.failed and outcome.units == 2
    summary = store.table("cmd_summary", sweep="lowrank").to_pandas()
    assert (summary.cmd_modes_needed == 3).all(), summary
    assert (summary.cmd_recon_error < 1e-5).all()
    # each mode's members follow one time course: the members of a mode are the parameters of one g_k
    modes = store.table("cmd_modes", sweep="lowrank").to_pandas()
    assert modes.groupby("run_id").size().eq(3).all() and modes.groupby("run_id").members.sum().eq(120).all()
    assert skipped_lines(store, "lowrank") == [
        f"CMD evaluation skipped for 2 of 2 run(s) (run {_ids(store, 'lowrank')[0]} and 1 more): its config names "
        f"no model factory. To evaluate, log the run with {raydyn.jobs.base.REBUILD_NEEDS}. The decomposition "
        "tables are written; the cmd_test_* columns are NaN."]


@pytest.mark.ray
def test_cmd_evaluates_a_tracked_run_whose_config_names_its_factory(ray_session, tracked):
    from raydyn.cli import app

    store, finals = tracked
    r = CliRunner().invoke(app, ["analyze", "cmd", "plug", "--tolerance", "0.02", "--store", store.uri])
    assert r.exit_code == 0, r.output
    assert "wrote cmd_summary: 3 rows" in r.output and "skipped" not in r.output
    summary = store.table("cmd_summary", sweep="plug").to_pandas().set_index("run_id")
    assert summary.cmd_eval_skipped.isna().all()
    for rid, f in finals.items():
        # the model rebuilt from the factory, with the last snapshot, is the user's model: same test metrics
        assert summary.loc[rid, "cmd_test_acc_real"] == pytest.approx(f["test_acc"], abs=1e-6)  # float32 mean
        assert summary.loc[rid, "cmd_test_loss_real"] == pytest.approx(f["test_loss"], rel=1e-4)
        assert math.isfinite(summary.loc[rid, "cmd_test_acc_recon"])
        assert abs(summary.loc[rid, "cmd_test_acc_drop"]) <= 0.05


def test_cmd_notes_a_factory_that_does_not_build_the_logged_model(tracked, tmp_path):
    store, _ = tracked
    import trackjobs_plugin as user

    torch.manual_seed(0)
    cfg = {"lr": 0.1, "width": 8, "seed": 0, "model": "trackjobs_plugin:mlp", "dataset": "trackjobs_plugin:blobs"}
    f = _train(tmp_path, "wrong", cfg, user.mlp((8,), 3, width=16), user.blobs())  # logged width 8, trained 16
    st = open_store(tmp_path)
    job = CMDJob()
    (unit,) = job.plan(st, "wrong")
    summary = job.compute(st, "wrong", unit)["cmd_summary"].to_pylist()[0]
    assert math.isnan(summary["cmd_test_acc_real"]) and summary["cmd_recon_error"] < 0.01
    assert summary["cmd_eval_skipped"].startswith("rebuilding and evaluating its model from its config failed: "
                                                  f"RaydynError: run {f['run_id']}: snapshot layout")


@pytest.mark.ray
def test_neurons_refuses_tracked_runs_without_a_factory_naming_them(ray_session, tracked):
    from raydyn.cli import app

    store, _ = tracked
    ids = _ids(store, "mine")
    r = CliRunner().invoke(app, ["analyze", "neurons", "mine", "--store", store.uri])
    assert isinstance(r.exception, RaydynError), r.output
    msg = str(r.exception)
    assert msg.startswith(f"run {ids[0]} (and 2 more that cannot be rebuilt either): the neurons analysis loads the "
                          "snapshots back into the run's model")
    assert "tracked sweep 'mine'" in msg and "its config names no model factory" in msg
    assert "config['model'] = 'module:callable'" in msg and "config['dataset']" in msg
    # a unit of such a run (in a sweep where others can be rebuilt) fails with the same message, for its run
    with pytest.raises(RaydynError, match=rf"^run {ids[1]}: the neurons analysis .* cannot be rebuilt: its config "
                                          r"names no model factory\. Log it with config\['model'\]"):
        NeuronsJob().compute(store, "mine", Unit(ids[1], (ids[1],)))


def test_neurons_rebuilds_a_tracked_run_whose_config_names_its_factory(tracked):
    store, _ = tracked
    rid = _ids(store, "plug")[0]
    (unit,) = [u for u in NeuronsJob().plan(store, "plug") if u.key == rid]
    out = NeuronsJob(samples=16, directions=4, draws=2, eval_size=96).compute(store, "plug", unit)
    modes = out["neurons_modes"].to_pylist()
    assert [m["layer"] for m in modes] == ["2"] and modes[0]["step"] == STEPS - 1  # the ReLU of the user's MLP
    assert math.isclose(modes[0]["opt"] + modes[0]["npt"] + modes[0]["dead"], 1.0)
    assert math.isfinite(out["neurons_summary"].to_pylist()[0]["basin_weight"])


@pytest.mark.ray
def test_symmetry_refuses_a_tracked_sweep_naming_its_runs(ray_session, tracked):
    from raydyn.cli import app

    store, _ = tracked
    ids = _ids(store, "mine")
    r = CliRunner().invoke(app, ["analyze", "symmetry", "mine", "--store", store.uri])
    assert isinstance(r.exception, RaydynError), r.output
    msg = str(r.exception)
    assert msg.startswith(f"sweep 'mine' is a tracked sweep (runs logged with raydyn.track or imported), and its "
                          f"runs {', '.join(ids)} have no symmetry recordings")
    assert "train.record: [symmetry]" in msg
    with pytest.raises(RaydynError, match="tracked sweep"):
        SymmetryJob().plan(store, "plug")


def test_symmetry_refuses_embedding_groups_of_a_model_it_cannot_rebuild():
    series = [{"kind": "rescale", "layer": "0"}, {"kind": "scale", "layer": "1"}]
    got = layer_params({"embed_lr": 0.1}, series, no_model="its config names no model factory")
    assert set(got) == {("rescale", "0"), ("scale", "1")}
    assert all(v.endswith("cannot be rebuilt to find their param group: its config names no model factory")
               for v in got.values())
    assert layer_params({}, series, no_model="x") == {}  # no embedding group: nothing to rebuild


def test_store_model_rebuilds_a_tracked_run_only_through_its_factory(tracked):
    from raydyn.errors import StoreError

    store, finals = tracked
    rid = _ids(store, "mine")[0]
    with pytest.raises(StoreError, match=rf"run {rid} \(logged with raydyn.track.*no model factory"):
        store.model(rid)
    rid = next(iter(finals))
    model = store.model(rid)  # the user's factory, its last snapshot loaded
    w = store.weights("plug", filter=raydyn.jobs.base.run_filter([rid])).sort_by("step")
    last = np.asarray(w.column("weights").to_pylist()[-1])
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    assert np.array_equal(flat, last.astype(flat.dtype))
    data = store.data(rid)
    with torch.no_grad():
        acc = (model(data.x_test).argmax(1) == data.y_test).double().mean().item()
    assert acc == pytest.approx(finals[rid]["test_acc"], abs=1e-9)
