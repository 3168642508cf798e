"""Population training: a vmapped member's trajectory equals the same run trained alone with torch.optim."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydyn.spec import parse_sweep, populations
from raydyn.tasks.build import init_model, load_data
from raydyn.train.population import train_population
from raydyn.train.recorder import runs_table
from raydyn.train.reference import train_single

BASE = """
name: t
task: {{dataset: {dataset}, model: {model}, depth: {depth}, width: {width}, batch_norm: {bn}{extra_task}}}
train:
  steps: {steps}
  batch_size: {batch}
  optimizer: {opt}
  {opt_extra}
  record_every: 5
  eval_every: 10
  dtype: float64
parameters:
  lr: {{values: {lrs}}}
  seed: {{values: [0, 3]}}
"""

CASES = {
    "sgd-momentum-wd-bn": dict(dataset="digits", model="mlp", depth=2, width=16, bn="true", extra_task="",
                               steps=30, batch=32, opt="sgd", opt_extra="momentum: 0.9\n  weight_decay: 0.01",
                               lrs="[0.01, 0.05]"),
    "sgd-nesterov-dampening": dict(dataset="teacher", model="mlp", depth=1, width=8, bn="false", extra_task="",
                                   steps=25, batch=16, opt="sgd", opt_extra="momentum: 0.5\n  nesterov: true",
                                   lrs="[0.01, 0.1]"),
    "adam-l2": dict(dataset="parity", model="mlp", depth=1, width=12, bn="false", extra_task=", data: {n_bits: 10, k: 2, n_train: 200, n_test: 50}",
                    steps=20, batch=20, opt="adam", opt_extra="weight_decay: 0.01", lrs="[0.001, 0.01]"),
    "adamw-transformer": dict(dataset="modular", model="transformer", depth=1, width=16, bn="false",
                              extra_task=", heads: 2, data: {p: 11, train_fraction: 0.5}", steps=15, batch=16,
                              opt="adamw", opt_extra="weight_decay: 1.0", lrs="[0.001, 0.003]"),
    "uv-lr-in-ntk-units": dict(dataset="single", model="uv", depth=1, width=50, bn="false", extra_task="", steps=20,
                               batch=1, opt="sgd", opt_extra="lr_units: ntk", lrs="[1.5, 2.5]"),
    "sgd-mlp-lr-in-ntk-units": dict(dataset="teacher", model="mlp", depth=1, width=16, bn="false",
                                    extra_task=", data: {n_train: 40, n_test: 20, d_in: 4}", steps=15, batch=40,
                                    opt="sgd", opt_extra="lr_units: ntk\n  curvature_batch: 40", lrs="[0.5, 1.5]"),
    "adamw-toy-grok-embedding-group": dict(dataset="addition", model="toy_grok", depth=2, width=16, bn="false",
                                           extra_task="", steps=15, batch=45, opt="adamw",
                                           opt_extra="weight_decay: 1.0\n  embed_lr: 0.01\n  embed_weight_decay: 0.1",
                                           lrs="[0.001, 0.003]"),
    "adamw-transformer-fixed-norm": dict(dataset="modular", model="transformer", depth=1, width=16, bn="false",
                                         extra_task=", heads: 2, data: {p: 11, train_fraction: 0.5}", steps=15,
                                         batch=16, opt="adamw", opt_extra="fixed_norm: 0.8", lrs="[0.001, 0.003]"),
    "sgd-cnn": dict(dataset="digits", model="cnn", depth=2, width=4, bn="true", extra_task="", steps=12, batch=16,
                    opt="sgd", opt_extra="momentum: 0.9", lrs="[0.05, 0.1]"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_population_equals_runs_trained_one_by_one(case):
    spec = parse_sweep(BASE.format(**CASES[case]))
    pops = populations(spec.expand(), 64)
    assert len(pops) == 1 and len(pops[0].members) == 4
    res = train_population(pops[0])
    metrics = res.recorder.metrics_table().to_pydict()
    weights = res.recorder.weights_table().to_pydict()
    for m in pops[0].members:
        ref = train_single(m.config)
        rows = [i for i, r in enumerate(metrics["run_id"]) if r == m.run_id]
        assert [metrics["step"][i] for i in rows] == ref["step"]
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            got = np.array([metrics[key][i] for i in rows])
            np.testing.assert_allclose(got, ref[key], rtol=1e-9, atol=1e-12, equal_nan=True, err_msg=f"{case} {key}")
            if key.endswith("loss"):  # evaluated every 10th step only (accuracy is NaN for regression)
                assert np.isfinite(got[::2]).all() and np.isnan(got[1:-1:2]).all()
        w = np.array([weights["weights"][i] for i, r in enumerate(weights["run_id"]) if r == m.run_id])
        # snapshots are stored as float32: equal to float32 rounding of the reference
        np.testing.assert_allclose(w, ref["weights"].astype(np.float32), rtol=1e-6, atol=1e-7)


def test_fixed_norm_holds_the_scaled_initial_norm_and_mixes_with_free_runs():
    """Constrained training: alpha x the unscaled initial norm at every record, free members untouched."""
    text = BASE.format(**{**CASES["adamw-transformer"], "opt_extra": "weight_decay: 1.0", "lrs": "[0.003]"})
    text += "  fixed_norm: {values: [null, 0.8]}\n"
    spec = parse_sweep(text)
    (pop,) = populations(spec.expand(), 64)  # fixed_norm is per member: one population
    assert sorted(str(m.config["fixed_norm"]) for m in pop.members) == ["0.8", "0.8", "None", "None"]
    res = train_population(pop)
    w = res.recorder.weights_table().to_pydict()
    data = load_data(pop.members[0].config)
    for m in pop.members:
        snaps = np.array([x for x, r in zip(w["weights"], w["run_id"]) if r == m.run_id], dtype=np.float64)
        norms = np.linalg.norm(snaps, axis=1)
        free = init_model({**m.config, "fixed_norm": None}, data)
        norm0 = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in free.parameters())))
        if m.config["fixed_norm"] is None:
            assert norms[-1] < 0.99 * norms[0]  # weight decay 1 shrinks the free runs
            np.testing.assert_allclose(norms[0], norm0, rtol=1e-6)
        else:
            np.testing.assert_allclose(norms, 0.8 * norm0, rtol=1e-6)  # float32 snapshots


def test_lr_in_ntk_units_records_lambda0_and_actual_lr():
    """lr_units: ntk -- each member trains at lr / lambda0, lambda0 its NTK top eigenvalue at init."""
    spec = parse_sweep(BASE.format(**CASES["uv-lr-in-ntk-units"]))
    (pop,) = populations(spec.expand(), 64)
    res = train_population(pop)
    runs = runs_table(res, pop.pop_id).to_pydict()
    for m, lam, lr_actual, lr in zip(pop.members, runs["lambda0"], runs["lr_actual"], runs["lr"]):
        model = init_model(m.config, load_data(m.config))
        exact = float((model.u.detach().pow(2).sum() + model.v.detach().pow(2).sum()) / 50)  # uv: (|u|^2+|v|^2)/m
        assert lam == pytest.approx(exact, rel=1e-10)
        assert lr_actual == pytest.approx(lr / exact, rel=1e-10)
    mt = res.recorder.metrics_table().to_pydict()
    assert set(np.round(mt["lr"], 12)) == set(np.round(runs["lr_actual"], 12))  # the metrics' lr is the actual one
    # with absolute units lambda0 is not measured and lr_actual = lr
    (pop,) = populations(parse_sweep(BASE.format(**{**CASES["uv-lr-in-ntk-units"], "opt_extra": ""})).expand(), 64)
    runs = runs_table(train_population(pop), pop.pop_id).to_pydict()
    assert np.isnan(runs["lambda0"]).all() and runs["lr_actual"] == runs["lr"]


def test_population_of_one():
    spec = parse_sweep(BASE.format(**{**CASES["sgd-nesterov-dampening"], "lrs": "[0.05]"}).replace("[0, 3]", "[7]"))
    (pop,) = populations(spec.expand(), 64)
    assert len(pop.members) == 1
    res = train_population(pop)
    ref = train_single(pop.members[0].config)
    np.testing.assert_allclose(res.recorder.metrics_table().column("train_loss").to_numpy(), ref["train_loss"], rtol=1e-10,
                               equal_nan=True)


def test_members_have_their_own_data_order():
    """Same lr, different seeds: different trajectories; a member does not depend on its neighbours."""
    spec = parse_sweep(BASE.format(**CASES["sgd-nesterov-dampening"]).replace("[0, 3]", "[0, 1, 2]"))
    pops = populations(spec.expand(), 64)
    res = train_population(pops[0])
    t = res.recorder.metrics_table().to_pandas()
    finals = t[t.step == t.step.max()].train_loss.round(12)
    assert finals.nunique() == len(finals)


def test_divergence_is_a_status_not_a_crash():
    text = BASE.format(**{**CASES["sgd-nesterov-dampening"], "lrs": "[0.01, 50.0]", "opt_extra": "momentum: 0.0"})
    (pop,) = populations(parse_sweep(text).expand(), 64)
    res = train_population(pop)
    by_lr = {m.config["lr"]: m for m in res.members}
    assert all(m.status == "completed" for m in res.members if m.config["lr"] == 0.01)
    diverged = [m for m in res.members if m.config["lr"] == 50.0]
    assert diverged and all(m.status == "diverged" and m.diverged_step is not None for m in diverged)
    runs = runs_table(res, pop.pop_id).to_pydict()
    for rid, status, step, done in zip(runs["run_id"], runs["status"], runs["diverged_step"], runs["steps_done"]):
        if status == "diverged":
            assert 0 < step < 25 and done == step
    # the diverged runs' last metric row is at the divergence step, and nothing is recorded after it
    mt = res.recorder.metrics_table().to_pandas()
    for m in diverged:
        assert mt[mt.run_id == m.run_id].step.max() == m.diverged_step
    # the healthy members still trained to the end
    ok = [m for m in res.members if m.status == "completed"]
    assert all(mt[mt.run_id == m.run_id].step.max() == 25 for m in ok)
    assert by_lr[0.01].steps_done == 25


def test_large_models_store_a_countsketch():
    text = BASE.format(**{**CASES["sgd-nesterov-dampening"], "lrs": "[0.01]", "steps": 5}).replace(
        "  dtype: float64", "  dtype: float64\n  weights: {max_size: 50, projection_dim: 16}")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    res = train_population(pop)
    assert res.recorder.layout["kind"] == "full+countsketch" and res.recorder.layout["dim"] == 16
    wt = res.recorder.weights_table().to_pydict()
    m0 = pop.members[0]
    w = np.array([v for r, v in zip(wt["run_id"], wt["weights"]) if r == m0.run_id])
    assert w.shape[1] == 16
    # the stored vector is the documented seeded CountSketch of the full parameter vector
    full = train_single(m0.config)["weights"]
    g = torch.Generator().manual_seed(res.recorder.layout["sketch_seed"])
    bucket = torch.randint(0, 16, (full.shape[1],), generator=g).numpy()
    sign = torch.randint(0, 2, (full.shape[1],), generator=g).numpy() * 2.0 - 1
    expect = np.zeros((len(full), 16))
    for t in range(len(full)):
        np.add.at(expect[t], bucket, full[t] * sign)
    np.testing.assert_allclose(w, expect, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- checkpoint / resume
RESUME_CASES = {
    # minibatches cross epoch boundaries (n_train 128 / batch 16 = 8 batches an epoch), momentum buffers,
    # one member diverges before the checkpoint and stays frozen after it
    "sgd-momentum-divergence": (CASES["sgd-nesterov-dampening"], {"steps": 40, "lrs": "[0.01, 60.0]",
                                                                   "opt_extra": "momentum: 0.5"}, "float64"),
    "adam-bn-float32": (CASES["sgd-momentum-wd-bn"], {"steps": 30, "opt": "adam", "opt_extra": "weight_decay: 0.01",
                                                      "lrs": "[0.001, 0.01]"}, "float32"),
}


def _tables(res):
    return res.recorder.metrics_table(), res.recorder.weights_table()


def _bits(col) -> np.ndarray:
    """A column as raw bits (lists flattened): equal bits means bit-for-bit equal, NaNs included."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy()
        return np.concatenate([lengths.view(np.uint8), _bits(pc.list_flatten(col)).view(np.uint8)])
    a = col.to_numpy(zero_copy_only=False)
    return a.view(np.uint8) if a.dtype.kind in "fiub" else np.array([str(v) for v in a])


def assert_identical(a, b, what: str) -> None:
    assert a.schema.equals(b.schema) and a.num_rows == b.num_rows, what
    for name in a.column_names:
        assert np.array_equal(_bits(a.column(name)), _bits(b.column(name))), f"{what}: column {name} differs"


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_from_a_checkpoint_is_bit_for_bit(case, tmp_path):
    """Train N steps straight vs k steps, checkpoint to disk, restore in a fresh call, finish: identical tables."""
    base, over, dtype = RESUME_CASES[case]
    text = BASE.format(**{**base, **over}).replace("dtype: float64", f"dtype: {dtype}")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    straight = train_population(pop)

    saved = []

    def keep(ckpt):
        d = tmp_path / f"step{ckpt.step}"
        ckpt.save(d)
        saved.append(d)

    with_ckpt = train_population(pop, checkpoint_every=7, on_checkpoint=keep)
    steps = pop.shared["steps"]
    assert [int(d.name[4:]) for d in saved] == list(range(7, steps, 7))
    m0, w0 = _tables(straight)
    assert_identical(_tables(with_ckpt)[0], m0, "checkpointing changed the run")
    from raydyn.train.checkpoint import PopulationCheckpoint

    for d in (saved[0], saved[-1]):  # the first (momentum buffers fresh) and the last checkpoint
        ckpt = PopulationCheckpoint.load(d)
        assert ckpt.step == int(d.name[4:])
        resumed = train_population(pop, resume=ckpt)
        m, w = _tables(resumed)
        assert_identical(m, m0, f"{case}: metrics after resuming at step {ckpt.step}")
        assert_identical(w, w0, f"{case}: weights after resuming at step {ckpt.step}")
        assert [(r.status, r.diverged_step, r.steps_done) for r in resumed.members] == \
            [(r.status, r.diverged_step, r.steps_done) for r in straight.members]
    if case == "sgd-momentum-divergence":
        assert {r.status for r in straight.members} == {"completed", "diverged"}
        assert min(r.diverged_step for r in straight.members if r.status == "diverged") < 7


def test_checkpoint_is_not_pickle_and_refuses_another_population(tmp_path):
    from raydyn.train.checkpoint import PopulationCheckpoint

    text = BASE.format(**{**CASES["sgd-nesterov-dampening"], "steps": 12})
    pops = populations(parse_sweep(text.replace("[0, 3]", "[0]")).expand(), 1)
    got = []
    train_population(pops[0], checkpoint_every=5, on_checkpoint=got.append)
    got[0].save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "state.npz"]
    with pytest.raises(ValueError, match="cannot resume population"):
        train_population(pops[1], resume=PopulationCheckpoint.load(tmp_path / "c"))
    # an array file that would need pickle to load is refused, not unpickled
    np.savez(tmp_path / "c" / "state.npz", evil=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        PopulationCheckpoint.load(tmp_path / "c")


def test_time_based_checkpoints_are_taken_and_resume_bit_for_bit(tmp_path):
    """checkpoint_every: null -> a checkpoint after every checkpoint_minutes of training (here ~0: every step)."""
    from raydyn.train.checkpoint import PopulationCheckpoint

    text = BASE.format(**{**CASES["sgd-nesterov-dampening"], "steps": 12})
    (pop,) = populations(parse_sweep(text).expand(), 64)
    straight = train_population(pop)
    got = []
    train_population(pop, checkpoint_seconds=1e-9, on_checkpoint=got.append)
    assert [c.step for c in got] == list(range(1, 12))
    got[5].save(tmp_path / "c")
    resumed = train_population(pop, resume=PopulationCheckpoint.load(tmp_path / "c"))
    assert_identical(resumed.recorder.metrics_table(), straight.recorder.metrics_table(), "time-based resume")


@pytest.mark.parametrize("weights", ["{}", "{dtype: float64, layers: ['3.']}"])
def test_snapshots_written_in_place_equal_the_copied_path(monkeypatch, weights):
    """On the CPU a record whose members all record writes the parameters straight into the snapshot rows
    (Recorder._direct_slot); after a member diverges the records take the copying path. Both give the same
    table, bit for bit, as the copying path alone (with batch-norm running statistics: tests/test_byo.py)."""
    from raydyn.train.recorder import Recorder

    text = BASE.format(**{**CASES["sgd-momentum-wd-bn"], "bn": "false", "lrs": "[0.05, 40.0]"})
    text = text.replace("  dtype: float64", f"  dtype: float64\n  weights: {weights}")
    (pop,) = populations(parse_sweep(text).expand(), 64)
    direct = train_population(pop)
    assert any(m.status == "diverged" for m in direct.members)  # so both paths were taken
    assert any(m.status == "completed" for m in direct.members)
    monkeypatch.setattr(Recorder, "_direct_slot", lambda self, mask, params: None)
    copied = train_population(pop)
    a, b = direct.recorder.weights_table(), copied.recorder.weights_table()
    assert a.num_rows > 0
    assert_identical(a, b, "weights")
    assert_identical(direct.recorder.metrics_table(), copied.recorder.metrics_table(), "metrics")
