"""Early stopping (``train.early_stop``): successive halving inside a population, Optuna pruning, and
stopped runs in the store, ``sweep status`` and phase maps."""
from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest

from raydyn.errors import SpecError
from raydyn.spec import parse_sweep, populations
from raydyn.train.checkpoint import PopulationCheckpoint
from raydyn.train.population import PopulationFunctions, successive_halving, train_population
from raydyn.train.recorder import runs_table

from tests.test_population import _bits, assert_identical

POP = """
name: es
task: {dataset: digits, model: mlp, depth: 2, width: 16}
train:
  steps: 40
  batch_size: 32
  optimizer: sgd
  momentum: 0.9
  record_every: 5
  eval_every: 10
  dtype: float64
  divergence_factor: 1.5
  record: [weights, symmetry]
  %s
parameters:
  lr: {values: [0.003, 0.01, 0.03, 0.1, 0.3, 20.0]}
  seed: {values: [0, 3]}
"""
ES = "early_stop: {metric: test_loss, min_step: 10, eta: 2}"  # rungs 10 and 20 of 40 steps


def _pop(extra: str = ""):
    (pop,) = populations(parse_sweep(POP % extra).expand(), 64)
    return pop


def _key(m) -> tuple[float, int]:
    return float(m.config["lr"]), int(m.config["seed"])


@pytest.fixture(scope="module")
def pair():
    """The population trained without and with early stopping."""
    return train_population(_pop()), train_population(_pop(ES))


# ---------------------------------------------------------------------------- the sweep-file key
SPEC = """
name: s
task: {dataset: digits, model: mlp, depth: 1, width: 8}
train: {steps: 100, record_every: 5, eval_every: 10%s}
parameters:
  lr: {values: [0.01, 0.1]}
  seed: {values: [0, 1]}
"""


def _err(extra: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_sweep(textwrap.dedent(SPEC % extra), "bad.yaml")
    return str(e.value)


@pytest.mark.parametrize("extra, fragments", [
    (", early_stop: {metric: test_loss, min_step: 25}", ["train.early_stop.min_step", "25", "eval_every: 10",
                                                       "set train.eval_every: 25"]),
    (", early_stop: {metric: test_loss, rungs: [20, 100]}", ["train.early_stop.rungs[1]", "steps: 100"]),
    (", early_stop: {metric: test_loss, rungs: [40, 20]}", ["train.early_stop.rungs[1]", "increasing"]),
    (", early_stop: {metric: test_loss, min_step: 200}", ["train.early_stop.min_step", "200", "steps: 100"]),
    (", early_stop: {metric: loss, min_step: 20}", ["train.early_stop.metric", "'test_loss'", "loss"]),
    (", early_stop: {metric: test_loss}", ["train.early_stop", "exactly one of min_step", "rungs"]),
    (", early_stop: {metric: test_loss, min_step: 20, rungs: [20]}", ["train.early_stop", "exactly one"]),
    (", early_stop: {metric: test_loss, min_step: 20, eta: 1}", ["train.early_stop.eta", "greater than or equal to 2"]),
    (", early_stop: {metric: test_loss, min_step: 20, mode: up}", ["train.early_stop.mode", "'min'", "'max'"]),
    (", early_stop: {metric: test_loss, min_step: 20, patience: 3}", ["train.early_stop.patience", "unknown key",
                                                                       "min_step", "rungs"]),
    (", early_stop: {min_step: 20}", ["train.early_stop.metric", "required"]),
])
def test_bad_early_stop_settings_are_refused_naming_the_key(extra, fragments):
    msg = _err(extra)
    assert len(msg.splitlines()) == 2, msg  # one problem, one line
    for f in fragments:
        assert f in msg, (f, msg)


def test_early_stop_resolves_rungs_and_mode_and_cannot_be_swept():
    from raydyn.spec import early_stop_rungs

    spec = parse_sweep(SPEC % ", early_stop: {metric: test_acc, min_step: 10, eta: 3}")
    es = spec.expand()[0].config["early_stop"]
    assert es["mode"] == "max" and early_stop_rungs(es, 100) == [10, 30, 90]
    es = parse_sweep(SPEC % ", early_stop: {metric: train_loss, rungs: [20, 50]}").expand()[0].config["early_stop"]
    assert es["mode"] == "min" and early_stop_rungs(es, 100) == [20, 50]
    assert early_stop_rungs(None, 100) == []
    with pytest.raises(SpecError, match=r"parameters.early_stop: unknown parameter"):
        parse_sweep(SPEC.replace("seed: {values: [0, 1]}", "seed: {values: [0, 1]}\n  early_stop: {values: [null]}") % "")


def test_run_ids_without_early_stop_are_unchanged_and_with_it_differ():
    from raydyn.spec import _id_view, run_id_of

    plain = parse_sweep(SPEC % "").expand()
    for r in plain:  # the default leaves the id as it was before the key existed
        cfg = {k: v for k, v in r.config.items() if k != "early_stop"}
        assert r.config["early_stop"] is None and r.run_id == run_id_of(cfg) and "early_stop" not in _id_view(r.config)
    stopped = parse_sweep(SPEC % ", early_stop: {metric: test_loss, min_step: 10}").expand()
    assert not {r.run_id for r in plain} & {r.run_id for r in stopped}
    assert {p.pop_id for p in populations(plain, 64)} != {p.pop_id for p in populations(stopped, 64)}
    assert "early_stop" not in plain[0].flat()  # nested: in config_json, no runs-table column


def test_wandb_early_terminate_points_at_train_early_stop():
    text = SPEC % "" + "early_terminate: {type: hyperband, min_iter: 3, eta: 2}\n"
    with pytest.raises(SpecError) as e:
        parse_sweep(text, "w.yaml")
    assert "early_terminate" in str(e.value) and "train.early_stop" in str(e.value)


# ---------------------------------------------------------------------------- the halving rule
def test_successive_halving_ranks_configurations_by_their_mean_over_seeds():
    groups = np.array([0, 0, 1, 1, 2, 2, 3])
    values = np.array([1.0, 5.0, 2.0, 2.5, 0.1, 9.0, 3.0])  # means: 3.0, 2.25, 4.55, 3.0
    alive = np.ones(7, bool)
    # keep ceil(4 / 2) = 2 configurations: group 1 (2.25), then the tie 0 vs 3 (3.0) goes to the first seen
    assert successive_halving(values, groups, alive, 2, "min").tolist() == [4, 5, 6]
    assert successive_halving(values, groups, alive, 2, "max").tolist() == [2, 3, 6]  # keep 2 (4.55), 0 (3.0)
    assert successive_halving(values, groups, alive, 3, "min").tolist() == [4, 5, 6]  # ceil(4 / 3) = 2 as well
    assert successive_halving(values, groups, alive, 4, "min").tolist() == [0, 1, 4, 5, 6]  # only group 1 left
    # members not alive are ignored (their group's score is the others' mean) and never "stopped"
    alive[5] = False  # group 2 is now 0.1: the best
    assert successive_halving(values, groups, alive, 2, "min").tolist() == [0, 1, 6]
    # a non-finite value makes its configuration the worst, in either mode
    values2 = values.copy()
    values2[2] = np.nan
    assert successive_halving(values2, groups, np.ones(7, bool), 4, "max").tolist() == [0, 1, 2, 3, 6]
    assert successive_halving(values2, groups, np.ones(7, bool), 2, "min").tolist() == [2, 3, 4, 5]


# ---------------------------------------------------------------------------- training
def test_survivors_are_bit_for_bit_the_runs_without_early_stopping(pair):
    """(a) a run that survives every rung has exactly the metrics, snapshots and symmetry rows of the same run
    trained without early stopping (float64; bitwise); a stopped run's rows are the same run's rows up to its
    rung, and its runs-table final_* metrics are those of the rung's evaluation."""
    full, es = pair
    by_key = {_key(m): m for m in full.members}
    mf, me = full.recorder.metrics_table(), es.recorder.metrics_table()
    wf, we = full.recorder.weights_table(), es.recorder.weights_table()
    sf, se = (t.recorder.extra_tables()["symmetry_steps"] for t in pair)
    runs = runs_table(es, "p").to_pylist()
    statuses = {m.status for m in es.members}
    assert statuses == {"completed", "stopped", "diverged"}
    for m in es.members:
        ref = by_key[_key(m)]
        upto = m.steps_done

        def rows(table, rid, last=upto):
            import pyarrow.compute as pc

            t = table.filter(pc.equal(table["run_id"], rid))
            return t.filter(pc.less_equal(t["step"], last)).drop(["run_id"])

        assert_identical(rows(me, m.run_id), rows(mf, ref.run_id), f"metrics of {_key(m)} ({m.status})")
        assert_identical(rows(we, m.run_id), rows(wf, ref.run_id), f"weights of {_key(m)}")
        a, b = rows(se, m.run_id), rows(sf, ref.run_id)
        assert np.array_equal(_bits(a["q"]), _bits(b["q"])), f"symmetry q of {_key(m)}"
        if m.status == "completed":
            assert ref.status == "completed" and upto == 40
            assert_identical(a, b, f"symmetry rows of {_key(m)}")
            assert rows(me, m.run_id).num_rows == rows(mf, ref.run_id, 40).num_rows
        elif m.status == "stopped":
            assert upto in (10, 20) and ref.status == "completed"
            last = rows(me, m.run_id).to_pylist()[-1]
            assert last["step"] == upto and math.isfinite(last["test_loss"])  # the rung's evaluation is its last record
            row = next(r for r in runs if r["run_id"] == m.run_id)
            assert row["status"] == "stopped" and row["steps_done"] == upto
            assert row["final_test_loss"] == last["test_loss"] and row["final_train_acc"] == last["train_acc"]
        else:  # diverged before the first rung: diverged, not stopped
            assert (ref.status, ref.diverged_step) == ("diverged", m.diverged_step) and upto < 10


def test_the_stopped_set_is_the_one_successive_halving_predicts(pair):
    """(b) a hand computation of successive halving on the recorded rung metrics of the run without early
    stopping (configurations = lr, score = mean test loss over seeds still training) predicts every status."""
    full, es = pair
    m = full.recorder.metrics_table().to_pylist()
    status = {_key(r): ("diverged", r.diverged_step) if r.status == "diverged" else None for r in full.members}
    training = {k for k, v in status.items() if v is None}
    for rung in (10, 20):
        loss = {k: next(r["test_loss"] for r in m if r["step"] == rung and r["run_id"] == rid)
                for k, rid in ((_key(x), x.run_id) for x in full.members) if k in training}
        lrs = sorted({k[0] for k in training})
        mean = {lr: np.mean([v for k, v in loss.items() if k[0] == lr]) for lr in lrs}
        keep = sorted(lrs, key=lambda lr: mean[lr])[:math.ceil(len(lrs) / 2)]
        for k in sorted(training):
            if k[0] not in keep:
                status[k] = ("stopped", rung)
        training = {k for k in training if k[0] in keep}
    got = {_key(r): (r.status, r.diverged_step if r.status == "diverged" else r.steps_done) for r in es.members}
    predicted = {k: v or ("completed", 40) for k, v in status.items()}
    assert got == predicted
    # 5 configurations (lr 20 diverged) -> 3 -> 2, each with both seeds: seeds of one setting stop together
    assert sum(v[0] == "completed" for v in got.values()) == 4
    assert all(got[(lr, 0)] == got[(lr, 3)] for lr in {k[0] for k in got if k[0] != 20.0})


def test_stopped_members_cost_no_more_gradients(monkeypatch):
    """Compute is saved: after a rung the gradient step runs on the members still training only."""
    sizes = []
    grad = PopulationFunctions.grad

    def spy(self, params, buffers, xb, yb):
        sizes.append(xb.shape[0])
        return grad(self, params, buffers, xb, yb)

    monkeypatch.setattr(PopulationFunctions, "grad", spy)
    res = train_population(_pop(ES))
    assert len(sizes) == 41
    n_div = sum(r.status == "diverged" for r in res.members)
    assert n_div == 2 and sizes[0] == 12
    s10 = sum(r.status == "stopped" and r.steps_done == 10 for r in res.members)
    # once a member diverged it is dropped too; after rung 10 only 6 train, after rung 20 only 4
    assert sizes[10] == 12 - n_div and sizes[11] == 12 - n_div - s10 == 6 and sizes[21] == 4 and sizes[-1] == 4


def test_resume_across_a_rung_is_bit_for_bit(pair, tmp_path):
    """(c) checkpoints before a rung, right after one and after both resume to identical tables and statuses."""
    _, straight = pair
    pop = _pop(ES)
    saved = []

    def keep(ckpt):
        d = tmp_path / f"step{ckpt.step}"
        ckpt.save(d)
        saved.append(d)

    train_population(pop, checkpoint_every=7, on_checkpoint=keep)
    for d in (saved[0], saved[1], saved[3]):  # steps 7 (before rung 10), 14 (after it), 28 (after rung 20)
        ckpt = PopulationCheckpoint.load(d)
        # rows of the members still training: the 2 diverged (steps 1-2) are dropped, then the stopped ones
        assert len(ckpt.arrays["live"]) == {7: 10, 14: 6, 28: 4}[ckpt.step]
        resumed = train_population(pop, resume=ckpt)
        assert_identical(resumed.recorder.metrics_table(), straight.recorder.metrics_table(), f"metrics from {d.name}")
        assert_identical(resumed.recorder.weights_table(), straight.recorder.weights_table(), f"weights from {d.name}")
        assert [(r.status, r.diverged_step, r.steps_done) for r in resumed.members] == \
            [(r.status, r.diverged_step, r.steps_done) for r in straight.members]


def test_without_early_stop_nothing_is_compacted_or_stopped(pair):
    full, _ = pair
    assert {r.status for r in full.members} == {"completed", "diverged"}


# ---------------------------------------------------------------------------- phase labels and maps
def test_stopped_runs_are_their_own_phase_after_diverged():
    from raydyn.analysis.phase import PHASES, RunTrajectory, classify

    steps = np.array([0, 10, 20])
    assert classify(RunTrajectory(steps, np.array([2.0, 1.0, 0.1]), status="stopped")) == "stopped"
    assert classify(RunTrajectory(steps, np.array([2.0, 1.0, 0.1]), status="completed")) == "converged"
    assert classify(RunTrajectory(steps, np.array([2.0, np.inf, np.nan]), status="stopped")) == "diverged"
    assert classify(RunTrajectory(steps, np.array([2.0, 1.0, 0.9]), train_acc=np.array([0.1, 0.2, 0.3]),
                                  status="stopped")) == "stopped"  # not "confusion": it was cut short
    assert PHASES.index("stopped") == PHASES.index("diverged") - 1


def test_phase_map_draws_cells_whose_runs_all_stopped_as_stopped():
    import pyarrow as pa
    from matplotlib.patches import Rectangle

    from raydyn.aggregate.maps import phase_map_info
    from raydyn.plots.maps import render_phase_map

    runs = pa.table({
        "lr": [0.1, 0.1, 1.0, 1.0, 10.0, 10.0, 0.1, 1.0],
        "width": [8, 8, 8, 8, 8, 8, 16, 16],
        "seed": [0, 1, 0, 1, 0, 1, 0, 0],
        "status": ["completed", "completed", "stopped", "stopped", "diverged", "stopped", "completed", "stopped"],
        "final_test_loss": [0.5, 0.7, 1.5, 1.7, float("nan"), 2.0, 0.4, 9.0],
    })
    info = phase_map_info(runs, "final_test_loss", "lr", "width")
    np.testing.assert_array_equal(info.stopped_frac[0], [[0.0, 1.0, 0.5], [0.0, 1.0, np.nan]])
    # stopped runs' metrics (taken at their rung) stay out of the median, like diverged ones
    assert info.median[0, 0, 0] == 0.6 and np.isnan(info.median[0, 0, 1]) and np.isnan(info.median[0, 1, 1])
    fig = render_phase_map(info, diverged_at=0.6)  # (lr 10, width 8): half diverged, half stopped -> stopped
    ax = fig.axes[0]
    grey = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == "//"]
    assert len(grey) == 3
    assert sum(t.get_text() == "stopped" for t in ax.texts) == 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(lbl.startswith("stopped early") for lbl in labels)
    red = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch() == "xx"]
    assert not red  # diverged first only where at least diverged_at of the runs diverged
    fig = render_phase_map(info, diverged_at=0.5)
    assert len([p for p in fig.axes[0].patches if p.get_hatch() == "xx"]) == 1
    assert len([p for p in fig.axes[0].patches if p.get_hatch() == "//"]) == 2
    plain = phase_map_info(runs.set_column(3, "status", pa.array(["completed"] * 8)), "final_test_loss", "lr", "width")
    fig = render_phase_map(plain)
    assert not any(t.get_text().startswith("stopped") for t in fig.legends[0].get_texts())


# ---------------------------------------------------------------------------- Optuna pruning rule
def test_rung_board_is_ashas_rule():
    from raydyn.sweep import RungBoard

    b = RungBoard(eta=2, mode="min")
    assert b.report(10, 1.0) is False  # the first trial at a rung always continues
    assert b.report(10, 2.0) is True  # worse than the median of [1.0]
    assert b.report(10, 0.5) is False  # better than the median of [1.0, 2.0]
    assert b.report(10, float("nan")) is True  # non-finite: the worst
    assert b.report(20, 5.0) is False  # another rung: its own record
    m = RungBoard(eta=3, mode="max")
    assert [m.report(5, v) for v in (0.5, 0.9, 0.2, 0.6)] == [False, False, True, True]


# ---------------------------------------------------------------------------- through Ray
GRID = """
name: es-grid
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 30, batch_size: 32, lr: 0.05, record_every: 10, eval_every: 10,
        early_stop: {metric: train_loss, min_step: 10, eta: 2}}
method: grid
parameters:
  lr: {values: [0.001, 0.01, 0.1, 0.3]}
  seed: {values: [0, 1]}
resources: {cpu: 1}
"""


@pytest.mark.ray
def test_grid_sweep_writes_stopped_runs_counts_them_and_does_not_retrain_them(ray_session, tmp_path):
    """(d) a sweep through Ray writes status-stopped rows, `sweep status` counts them, and a second
    `sweep run` trains nothing: a stopped run is finished."""
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep, sweep_status

    store = open_store(tmp_path)
    spec = parse_sweep(GRID)
    out = run_sweep(spec, GRID, store)
    runs = store.runs(sweep="es-grid").to_pandas()
    assert out.trained == 8 and len(runs) == 8 and not out.failed_populations
    # 4 configurations -> 2 at step 10 -> 1 at step 20; seeds stop together
    assert sorted(runs.status) == ["completed"] * 2 + ["stopped"] * 6
    assert out.stopped == 6 and out.diverged == 0  # what `sweep run` prints: "trained 8 runs (0 diverged, 6 stopped early)"
    assert sorted(runs[runs.status == "stopped"].steps_done) == [10] * 4 + [20] * 2
    assert (runs.groupby("lr").status.nunique() == 1).all()
    m = store.metrics(sweep="es-grid").to_pandas()
    last = m.groupby("run_id").step.max()
    assert (last[runs.set_index("run_id").index] == runs.set_index("run_id").steps_done).all()
    st = sweep_status(spec, store)
    assert st["by_status"] == {"completed": 2, "stopped": 6} and st["missing"] == 0 and st["in_store"] == 8
    assert len(store.completed_run_ids("es-grid")) == 8
    again = run_sweep(spec, GRID, store)
    assert again.trained == 0 and again.skipped == 8 and len(store.runs(sweep="es-grid")) == 8


OPTUNA = """
name: es-opt
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 30, batch_size: 32, record_every: 10, eval_every: 10,
        early_stop: {metric: train_loss, min_step: 10, eta: 2}}
method: optuna
num_samples: 6
metric: final_train_loss
goal: minimize
parameters:
  lr: {distribution: log_uniform, min: 0.0001, max: 0.5}
  seed: {values: [0, 1]}
resources: {cpu: 1, max_concurrent: 1}
"""


@pytest.mark.ray
def test_optuna_trials_are_pruned_at_rungs_and_still_written(ray_session, tmp_path):
    """An Optuna trial (one point x its seeds) is pruned at a rung when worse than ASHA's cutoff of the trials
    before it; its runs are in the store as stopped, and it counts as a finished point."""
    from raydyn.store import open_store
    from raydyn.sweep import run_sweep, sweep_status

    store = open_store(tmp_path)
    spec = parse_sweep(OPTUNA)
    out = run_sweep(spec, OPTUNA, store)
    runs = store.runs(sweep="es-opt").to_pandas()
    assert out.trained == 12 and len(runs) == 12 and not out.failed_populations
    by_pop = runs.groupby("population")
    assert by_pop.ngroups == 6
    assert (by_pop.status.nunique() == 1).all() and (by_pop.steps_done.nunique() == 1).all()  # a trial stops whole
    stopped = runs[runs.status == "stopped"]
    assert len(stopped) >= 2 and set(stopped.steps_done) <= {10, 20}  # pruned at a rung, with both seeds
    assert (runs[runs.status == "completed"].steps_done == 30).all()
    # the first trial always continues at every rung, so the best at each rung is never pruned:
    # a pruned trial's rung loss is worse than some earlier trial's at that rung
    m = store.metrics(sweep="es-opt").to_pandas().merge(runs[["run_id", "population"]], on="run_id")
    for pop, g in stopped.groupby("population"):
        rung = int(g.steps_done.iloc[0])
        at = m[m.step == rung].groupby("population").train_loss.mean()
        assert at[pop] > at.min()
    st = sweep_status(spec, store)
    assert st["missing"] == 0 and st["by_status"].get("stopped", 0) == len(stopped)
    again = run_sweep(spec, OPTUNA, store)
    assert again.trained == 0
