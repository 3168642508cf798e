"""End to end on the shared Ray instance: sweep file -> Tune trials -> store -> query -> phase map."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from raydyn.aggregate.maps import default_facets, phase_map_info
from raydyn.errors import RaydynError
from raydyn.plots.maps import render_phase_map
from raydyn.spec import parse_sweep
from raydyn.store import open_store
from raydyn.sweep import run_sweep, sweep_status

pytestmark = pytest.mark.ray

SWEEP = """
name: e2e
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 128, n_test: 64, d_in: 8}}
train: {steps: 60, batch_size: 32, optimizer: sgd, lr: 0.05, record_every: 10}
method: grid
parameters:
  lr: {values: [0.01, 0.1, 200.0]}
  width: {values: [8, 32]}
  depth: {values: [1, 2]}
  seed: {values: [0, 1]}
resources: {cpu: 1, population_size: 8}
"""


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("store"))
    spec = parse_sweep(SWEEP)
    seen = []
    outcome = run_sweep(spec, SWEEP, store, progress=seen.append)
    return spec, store, outcome, seen


def test_sweep_trains_every_run_in_populations(swept):
    spec, store, outcome, seen = swept
    runs = store.runs(sweep="e2e").to_pandas()
    assert outcome.total == 24 and outcome.trained == 24 and not outcome.failed_populations
    assert len(runs) == 24 and runs.run_id.is_unique
    assert runs.population.nunique() == 4  # one per (width, depth): lr and seed vary within a population
    # every config value is a typed column
    assert runs.lr.dtype == np.float64 and runs.width.dtype == np.int64
    # progress was reported as runs done / total
    assert seen[-1]["done"] == 24 and seen[-1]["total"] == 24
    # metrics: one row per record step per run (0, 10, ..., 60) for runs that did not diverge
    m = store.metrics(sweep="e2e").to_pandas()
    ok = runs[runs.status == "completed"].run_id
    assert (m[m.run_id.isin(ok)].groupby("run_id").step.apply(list).map(lambda s: s == list(range(0, 61, 10)))).all()
    w = store.weights(sweep="e2e", columns=["run_id", "step", "weights"]).to_pandas()
    layout = json.loads(runs.weights_layout.iloc[0])
    assert len(w) == len(m) and layout["kind"] == "full"


def test_divergence_is_recorded_as_a_status(swept):
    _, store, outcome, _ = swept
    runs = store.runs(sweep="e2e").to_pandas()
    div = runs[runs.lr == 200.0]
    assert (div.status == "diverged").all() and (div.diverged_step > 0).all()
    assert (runs[runs.lr < 1].status == "completed").all()
    assert outcome.diverged == len(div)


def test_rerun_trains_nothing_and_changed_file_is_refused(swept):
    spec, store, _, _ = swept
    before = sorted(p.stat().st_mtime_ns for p in Path(store.local_path()).rglob("part-*.parquet"))
    again = run_sweep(spec, SWEEP, store)
    assert again.trained == 0 and again.skipped == 24
    after = sorted(p.stat().st_mtime_ns for p in Path(store.local_path()).rglob("part-*.parquet"))
    assert before == after
    changed = SWEEP.replace("steps: 60", "steps: 70")
    with pytest.raises(RaydynError, match=r"sweep 'e2e' already exists .* different sweep file.*new `name:`"):
        run_sweep(parse_sweep(changed), changed, store)
    # comments and spacing are not a change
    run_sweep(spec, "# a comment\n" + SWEEP, store)


def test_store_is_readable_without_raydyn(swept):
    _, store, _, _ = swept
    import duckdb
    import pandas as pd
    import polars as pl

    root = store.local_path()
    assert ds.dataset(f"{root}/runs", format="parquet", partitioning="hive").to_table().num_rows == 24
    assert len(pd.read_parquet(f"{root}/runs")) == 24
    assert pl.scan_parquet(f"{root}/metrics/**/*.parquet", hive_partitioning=True).select(pl.len()).collect().item() > 0
    n = duckdb.sql(f"select count(*) from read_parquet('{root}/runs/*/*.parquet', hive_partitioning=true)").fetchall()[0][0]
    assert n == 24


def test_query_cli(swept):
    _, store, _, _ = swept
    sql = "SELECT lr, count(*) AS n FROM runs GROUP BY lr ORDER BY lr"
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "query", sql, "--store", store.local_path(), "--format", "json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"lr": 0.01, "n": 8}, {"lr": 0.1, "n": 8}, {"lr": 200.0, "n": 8}]
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "query", "DELETE FROM runs", "--store", store.local_path()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr
    # CSV has no lists: a list column (weight_norms, or a SQL list()) is written as JSON text per cell
    sql = "SELECT lr, list(seed ORDER BY seed) AS seeds FROM runs WHERE width = 8 AND depth = 1 GROUP BY lr ORDER BY lr"
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "query", sql, "--store", store.local_path(), "--format", "csv"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(float(x["lr"]), json.loads(x["seeds"])) for x in rows] == [(0.01, [0, 1]), (0.1, [0, 1]), (200.0, [0, 1])]


def test_phase_map_has_one_panel_per_facet(swept, tmp_path):
    spec, store, _, _ = swept
    facets = default_facets(spec.axes(), "lr", "width")
    assert facets == ["depth"]
    info = phase_map_info(store.runs(sweep="e2e"), "final_test_loss", "lr", "width", facets)
    assert info.facet_values == [(1,), (2,)]
    assert info.x_log and not info.y_log  # 0.01..200 spans decades; two widths 8, 32 do not
    assert (info.n_runs == 2).all()  # two seeds per cell
    assert (info.diverged_frac[:, :, 2] == 1).all() and np.isnan(info.median[:, :, 2]).all()
    fig = render_phase_map(info)
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["depth=1", "depth=2"]
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "phase-map", "e2e", "--metric", "final_test_loss", "--x", "lr",
                        "--y", "width", "--store", store.local_path(), "--out", str(tmp_path / "map.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    png = (tmp_path / "map.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_status(swept):
    spec, store, _, _ = swept
    st = sweep_status(spec, store)
    assert st["total"] == 24 and st["in_store"] == 24 and st["missing"] == 0
    assert st["by_status"] == {"completed": 16, "diverged": 8}


RESUME = """
name: resume
task: {dataset: teacher, model: mlp, depth: 1, width: 16, data: {n_train: 256, n_test: 64}}
train: {steps: 1500, batch_size: 64, optimizer: sgd, lr: 0.05, record_every: 100}
method: grid
parameters:
  lr: {values: [0.01, 0.02, 0.03, 0.04]}
  width: {values: [8, 16, 24, 32, 40, 48]}
resources: {cpu: 1, max_concurrent: 1, population_size: 4}
"""


def _sigint_default() -> None:  # a background pytest ignores SIGINT, and children would inherit that
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [
    signal.SIGINT,
    pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
    pytest.param(signal.SIGKILL, marks=pytest.mark.slow),
], ids=lambda s: s.name)
def test_interrupt_then_resume(ray_session, tmp_path, sig):
    """Stop the driver mid-sweep (Ctrl-C, SIGTERM, SIGKILL); a second `sweep run` finishes with no duplicate
    and no missing run. SIGINT and SIGTERM end with one message and exit code 128 + signal number."""
    sweep_file = tmp_path / "resume.yaml"
    sweep_file.write_text(RESUME)
    store_dir = tmp_path / "store"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raydyn.cli", "sweep", "run", str(sweep_file), "--store", str(store_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_default)
    runs_dir = store_dir / "runs" / "sweep=resume"
    deadline = time.time() + 240
    while time.time() < deadline and not list(runs_dir.glob("part-*.parquet")) and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the driver did not stop on {sig.name}:\n{out[-3000:]}")
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, out[-3000:]
        assert "interrupted. Completed runs are in the store; run the same command again to resume." in out
        assert "Traceback" not in out
    store = open_store(store_dir)
    first = store.runs(sweep="resume").to_pandas()
    assert 0 < len(first) < 24, "interrupt should leave a partial sweep"
    assert len(first) % 4 == 0  # only whole populations were written
    kept = set(first.run_id)
    spec = parse_sweep(RESUME)
    outcome = run_sweep(spec, RESUME, store)
    assert outcome.skipped == len(first) and outcome.trained == 24 - len(first)
    final = store.runs(sweep="resume").to_pandas()
    assert len(final) == 24 and final.run_id.is_unique and kept <= set(final.run_id)
    m = store.metrics(sweep="resume", columns=["run_id", "step"]).to_pandas()
    assert not m.duplicated().any() and set(m.run_id) == set(final.run_id)
    assert store.check().ok


OPTUNA = """
name: opt
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 30, batch_size: 16, optimizer: sgd, lr: 0.05, record_every: 10}
method: optuna
num_samples: 4
metric: final_train_loss
goal: minimize
parameters:
  lr: {distribution: log_uniform, min: 0.001, max: 0.5}
  width: {values: [4, 16]}
  seed: {values: [0, 1]}
resources: {cpu: 1}
"""


def test_optuna_sweep_trains_seeds_as_populations_and_resumes(ray_session, tmp_path):
    store = open_store(tmp_path)
    spec = parse_sweep(OPTUNA)
    outcome = run_sweep(spec, OPTUNA, store)
    runs = store.runs(sweep="opt").to_pandas()
    assert outcome.trained == 8 and len(runs) == 8 and not outcome.failed_populations
    # each Optuna trial is one point crossed with every seed, trained as one population
    assert runs.population.nunique() == 4
    assert (runs.groupby("population").seed.apply(sorted).map(lambda s: s == [0, 1])).all()
    assert (runs.groupby("population").lr.nunique() == 1).all()
    assert runs.lr.between(0.001, 0.5).all() and set(runs.width) <= {4, 16}
    again = run_sweep(spec, OPTUNA, store)  # all trials already in the store
    assert again.trained == 0 and len(store.runs(sweep="opt")) == 8
    assert sweep_status(spec, store)["missing"] == 0


RANDOM = OPTUNA.replace("name: opt", "name: rnd").replace("method: optuna", "method: random").replace(
    "metric: final_train_loss\ngoal: minimize\n", "")


def test_random_sweep_is_reproducible_in_the_store(ray_session, tmp_path):
    store = open_store(tmp_path)
    spec = parse_sweep(RANDOM)
    run_sweep(spec, RANDOM, store)
    runs = store.runs(sweep="rnd").to_pandas()
    assert len(runs) == 8 and set(runs.run_id) == {r.run_id for r in spec.expand()}


def test_trial_workers_do_not_print_their_own_stop(monkeypatch):
    """A worker that Ray stops may raise SystemExit inside a weakref callback; Python would print it as
    "Exception ignored ..." with a traceback, which Ray forwards to the driver. Trials swallow exactly
    those (the stop itself) and print every other unraisable exception as Python does."""
    import contextlib as cl
    import gc
    import io

    from raydyn.sweep import _quiet_exit_unraisable

    class Raises:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", _quiet_exit_unraisable)
    buf = io.StringIO()
    with cl.redirect_stderr(buf):
        Raises(SystemExit(1))
        Raises(KeyboardInterrupt())
        gc.collect()
    assert buf.getvalue() == ""
    with cl.redirect_stderr(buf):
        Raises(ValueError("a real one"))
        gc.collect()
    assert "Exception ignored" in buf.getvalue() and "ValueError: a real one" in buf.getvalue()
