"""raydyn.track: runs trained by a hand-written PyTorch loop, logged into a store, analysed unchanged.

The reference is the same four runs trained by `raydyn sweep run` (full batch, SGD, float64): the loop
here shares nothing with raydyn's trainer (its own nn.Sequential, torch.optim.SGD, F.cross_entropy), and
the Koopman spectra of the two sets of trajectories must agree to 1e-8.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import raydyn
import raydyn.track
from raydyn.cli import app
from raydyn.errors import RaydynError
from raydyn.spec import parse_sweep
from raydyn.store import open_store

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 40, 2
SWEEP = f"""
name: ref
task: {{dataset: digits, model: mlp, depth: 1, width: 6, activation: tanh}}
train: {{steps: {STEPS}, batch_size: 100000, optimizer: sgd, lr: 0.1, dtype: float64, record_every: {EVERY},
        eval_every: {STEPS}, record: [weights], weights: {{dtype: float64}}}}
parameters:
  lr: {{values: [0.05, 0.5]}}
  seed: {{values: [0, 1]}}
resources: {{cpu: 1}}
"""


def plain_loop(store, x, y, lr: float, seed: int, sweep: str = "mine", **track_kwargs) -> str:
    """A bare PyTorch training loop (nothing of raydyn's trainer), logging every EVERY steps."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6), torch.nn.Tanh(), torch.nn.Linear(6, 10))
    finally:
        torch.set_default_dtype(prev)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with raydyn.track(store, sweep=sweep, config={"lr": lr, "width": 6, "seed": seed},
                      weights={"dtype": "float64"}, **track_kwargs) as run:
        for step in range(STEPS + 1):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step % EVERY == 0:
                run.log(step, train_loss=loss.item(), model=model)
            if step == STEPS:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run.run_id


@pytest.mark.ray
def test_plain_loop_runs_analyse_like_sweep_runs(ray_session, tmp_path):
    from raydyn.sweep import run_sweep

    store = open_store(tmp_path / "s")
    spec = parse_sweep(SWEEP)
    assert run_sweep(spec, SWEEP, store).trained == 4
    ref = {(r["lr"], r["seed"]): r["run_id"] for r in store.runs("ref").to_pylist()}
    data = store.data(next(iter(ref.values())))
    x, y = data.x_train.to(torch.float64), data.y_train
    ids = {(lr, seed): plain_loop(store, x, y, lr, seed) for lr in (0.05, 0.5) for seed in (0, 1)}

    # same initialisation and trajectory, to float64 rounding
    for key, rid in ids.items():
        a = store.weights("ref", filter=_rid(ref[key])).sort_by("step")
        b = store.weights("mine", filter=_rid(rid)).sort_by("step")
        assert a.column("step").to_pylist() == b.column("step").to_pylist() == list(range(0, STEPS + 1, EVERY))
        wa, wb = (np.array(t.column("weights").to_pylist()) for t in (a, b))
        assert np.abs(wa[0] - wb[0]).max() == 0
        assert np.abs(wa - wb).max() < 1e-12

    runs = {r["run_id"]: r for r in store.runs("mine").to_pylist()}
    assert {r["status"] for r in runs.values()} == {"completed"}
    assert {(r["lr"], r["width"], r["seed"], r["record_every"]) for r in runs.values()} == {
        (lr, 6, s, EVERY) for lr in (0.05, 0.5) for s in (0, 1)}
    assert all(isinstance(r["seed"], int) and r["steps_done"] == STEPS for r in runs.values())

    cli = CliRunner()
    r = cli.invoke(app, ["query", "SELECT lr, count(*) AS n FROM runs WHERE sweep = 'mine' GROUP BY lr ORDER BY lr",
                         "--store", str(tmp_path / "s"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert [(row["lr"], row["n"]) for row in json.loads(r.output)] == [(0.05, 2), (0.5, 2)]
    r = cli.invoke(app, ["phase-map", "mine", "--metric", "final_train_loss", "--x", "lr", "--y", "seed",
                         "--out", str(tmp_path / "map.png"), "--store", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "map.png").stat().st_size > 5000
    r = cli.invoke(app, ["sweep", "status", "mine", "--store", str(tmp_path / "s")])
    assert r.exit_code == 0 and "4 finished runs (4 completed); 0 in progress" in r.output, r.output
    # a truncated DMD (rank 8): the full-rank one keeps modes of rounding noise, whose eigenvalues move by
    # ~1e-6 between two trajectories that differ by 1e-16
    for sweep in ("ref", "mine"):
        r = cli.invoke(app, ["analyze", "koopman", sweep, "--group-by", "lr,seed", "--rank", "8", "--store", str(tmp_path / "s")])
        assert r.exit_code == 0, r.output
    spectra = {}
    for sweep in ("ref", "mine"):
        t = store.table("koopman_spectra", sweep=sweep).to_pandas()
        spectra[sweep] = {g: np.sort_complex((d.real + 1j * d.imag).to_numpy()) for g, d in t.groupby("group")}
    assert spectra["ref"].keys() == spectra["mine"].keys() and len(spectra["ref"]) == 4
    for g in spectra["ref"]:
        a, b = spectra["ref"][g], spectra["mine"][g]
        assert len(a) == len(b) > 3
        assert np.abs(a - b).max() < 1e-8, g

    # the report takes the tracked sweep too, and `sweep run` refuses to write into it
    r = cli.invoke(app, ["report", "mine", "--out", str(tmp_path / "r.html"), "--store", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    clash = tmp_path / "clash.yaml"
    clash.write_text(SWEEP.replace("name: ref", "name: mine"))
    r = cli.invoke(app, ["sweep", "run", str(clash), "--store", str(tmp_path / "s")])
    assert isinstance(r.exception, RaydynError) and "mine-grid" in str(r.exception), r.output


def _rid(rid):
    import pyarrow.compute as pc

    return pc.field("run_id") == rid


def test_config_columns_status_and_refusals(tmp_path):
    m = torch.nn.Linear(3, 2)
    cfg = {"lr": 0.1, "opt": {"name": "adam", "betas": [0.9, 0.99]}, "tag": None, "flag": True}
    with raydyn.track(tmp_path, sweep="t", config=cfg, seed=3) as run:
        for s in range(0, 50, 10):
            run.log(s, train_loss=float("nan") if s == 30 else 1.0, norms=[1.0, 2.0], model=m)
    row = open_store(tmp_path).runs("t").to_pylist()[0]
    assert row["status"] == "diverged" and row["diverged_step"] == 30 and row["seed"] == 3
    assert row["opt_name"] == "adam" and row["opt_betas"] == "[0.9, 0.99]" and row["flag"] is True
    assert json.loads(row["config_json"]) == {**cfg, "seed": 3}
    met = open_store(tmp_path).metrics("t").sort_by("step")
    assert met.column("norms").to_pylist()[0] == [1.0, 2.0]
    with pytest.raises(RaydynError, match="already in sweep 't'.*resume=True"):
        raydyn.track(tmp_path, sweep="t", config=cfg, seed=3)
    with pytest.raises(RaydynError, match="config key 'status'"):
        raydyn.track(tmp_path, sweep="t", config={"status": 1})
    with pytest.raises(RaydynError, match=r"config\.when: a object"):
        raydyn.track(tmp_path, sweep="t", config={"when": object()})
    with pytest.raises(RaydynError, match="steps must increase"):
        with raydyn.track(tmp_path, sweep="t", run_id="dec") as run:
            run.log(5, a=1.0)
            run.log(5, a=1.0)
    assert open_store(tmp_path).runs("t", filter=_rid("dec")).column("status").to_pylist() == ["failed"]
    # an exception inside the block: status failed, what was logged kept, exception re-raised
    with pytest.raises(ZeroDivisionError):
        with raydyn.track(tmp_path, sweep="t", run_id="boom") as run:
            run.log(0, train_loss=1.0)
            1 / 0
    assert open_store(tmp_path).metrics("t", filter=_rid("boom")).num_rows == 1
    # ranks other than 0 write nothing
    with raydyn.track(tmp_path, sweep="t", run_id="rank1", rank=1) as run:
        run.log(0, train_loss=1.0, model=m)
    assert open_store(tmp_path).metrics("t", filter=_rid("rank1")).num_rows == 0


WORKER = textwrap.dedent("""
    import sys, time, torch, raydyn
    store, rid, n, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    resume = len(sys.argv) > 5
    m = torch.nn.Linear(8, 4)
    torch.manual_seed(0)
    with raydyn.track(store, sweep="conc", run_id=rid, config={"who": rid}, flush_every=7, resume=resume) as run:
        for step in range(n):
            with torch.no_grad():
                m.weight.fill_(step)
            run.log(step, train_loss=1.0 / (step + 1), model=m)
            if pause:
                time.sleep(pause)
                print(step, flush=True)
""")


def _worker(tmp_path, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "RANK": "0"})


def test_sigkill_leaves_whole_parts_and_resume_completes_without_duplicates(tmp_path):
    store = tmp_path / "s"
    p = _worker(tmp_path, store, "victim", 60, 0.02)
    for line in p.stdout:
        if int(line) >= 30:  # 4 flushes of 7 records are committed by now
            break
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = open_store(store)
    assert st.runs("conc").num_rows == 0
    report = st.check()  # every file is whole, and an interrupted tracked run is not an orphan to repair
    assert report.ok and report.in_progress == [("conc", "victim")], report.summary()
    m = st.metrics("conc").column("step").to_pylist()
    assert len(m) >= 28 and m == list(range(len(m))) and len(m) % 7 == 0
    w = sorted(st.weights("conc").column("step").to_pylist())
    assert set(w) >= set(m)
    r = CliRunner().invoke(app, ["sweep", "status", "conc", "--store", str(store)])
    assert "1 in progress or interrupted (victim;" in r.output, r.output
    with pytest.raises(RaydynError, match="interrupted after step"):
        raydyn.track(store, sweep="conc", run_id="victim", config={"who": "victim"})
    q = _worker(tmp_path, store, "victim", 60, 0, "resume")
    assert q.wait(timeout=120) == 0
    st = open_store(store)
    steps = st.metrics("conc").column("step").to_pylist()
    assert sorted(steps) == list(range(60))
    wt = st.weights("conc").sort_by("step")
    assert wt.column("step").to_pylist() == list(range(60))
    first = np.array([v[0] for v in wt.column("weights").to_pylist()])
    assert (first == np.arange(60)).all()
    row = st.runs("conc").to_pylist()[0]
    assert row["status"] == "completed" and row["steps_done"] == 59


def test_two_processes_logging_concurrently_lose_nothing(tmp_path):
    store = tmp_path / "s"
    procs = [_worker(tmp_path, store, f"proc{i}", 400, 0) for i in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    st = open_store(store)
    runs = st.runs("conc")
    assert sorted(runs.column("run_id").to_pylist()) == ["proc0", "proc1"]
    m = st.metrics("conc").to_pandas()
    w = st.weights("conc").to_pandas()
    for rid in ("proc0", "proc1"):
        assert sorted(m[m.run_id == rid].step) == list(range(400))
        assert sorted(w[w.run_id == rid].step) == list(range(400))
    assert st.check().ok
