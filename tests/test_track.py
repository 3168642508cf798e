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
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import raydyn
import raydyn.track
from raydyn.cli import app
from raydyn.errors import RaydynError, RaydynWarning
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
    with pytest.raises(RaydynError, match=r"weights.max_size = '10': give an integer"):
        raydyn.track(tmp_path, sweep="t", run_id="w", weights={"max_size": "10"})
    with pytest.raises(RaydynError, match="weights: unknown option"):
        raydyn.track(tmp_path, sweep="t", run_id="w", weights={"every": 10})
    # a CountSketch above max_size, seeded as a sweep's (inner products kept in expectation)
    big = torch.nn.Linear(40, 30)
    with raydyn.track(tmp_path, sweep="t", run_id="sk", weights={"max_size": 100, "projection_dim": 64}) as run:
        run.log(0, model=big)
    lay = json.loads(open_store(tmp_path).runs("t", filter=_rid("sk")).column("weights_layout")[0].as_py())
    assert lay["kind"] == "full+countsketch" and lay["dim"] == 64 and lay["source_dim"] == 40 * 30 + 30
    from raydyn.train.recorder import weights_layout
    _, (bucket, sign) = weights_layout(["weight", "bias"], [(30, 40), (30,)], {"max_size": 100, "projection_dim": 64})
    flat = torch.cat([big.weight.detach().reshape(-1), big.bias.detach()]).double()
    expect = torch.zeros(64, dtype=torch.float64).index_add_(0, bucket, flat * sign).numpy()
    got = np.array(open_store(tmp_path).weights("t", filter=_rid("sk")).column("weights")[0].as_py())
    assert np.allclose(got, expect, rtol=1e-5, atol=1e-6)
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
    # a run id that extends another's ("x-1" / "x": parts track-x-1-000000 and track-x-000000) is another run
    with raydyn.track(tmp_path, sweep="t", run_id="x-1", flush_every=1) as run:
        run.log(0, train_loss=1.0)
        with raydyn.track(tmp_path, sweep="t", run_id="x", flush_every=1) as other:
            other.log(0, train_loss=2.0)
    assert open_store(tmp_path).metrics("t", filter=_rid("x")).column("train_loss").to_pylist() == [2.0]
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


# ------------------------------------------------------------------------------ import
def _checkpoint_folder(tmp_path, dtype=torch.float32, n=5):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 3)).to(dtype)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    folder = tmp_path / "ckpts"
    folder.mkdir()
    saved = {}
    for k in range(n):
        step = 100 * k
        if k % 2:  # both conventions: a bare state dict named by step, a dict carrying its step
            torch.save(m.state_dict(), folder / f"step_{step:06d}.pt")
        else:
            torch.save({"step": step, "model": m.state_dict(), "optimizer": opt.state_dict()}, folder / f"ckpt-{k}.pth")
        saved[step] = {n_: t.clone() for n_, t in m.state_dict().items()}
        loss = m(torch.randn(16, 5, dtype=dtype)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()  # noqa: E702
    (tmp_path / "log.csv").write_text("step,train_loss,note\n" + "".join(f"{50 * i},{1.0 / (i + 1)},x\n" for i in range(9)))
    (tmp_path / "cfg.yaml").write_text("lr: 0.1\nwidth: 4\nseed: 0\n")
    return folder, saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_checkpoint_folder_round_trips_into_weights_exactly(tmp_path, dtype):
    folder, saved = _checkpoint_folder(tmp_path, dtype)
    r = CliRunner().invoke(app, ["import", "checkpoints", str(folder), "--sweep", "imp", "--config",
                                 str(tmp_path / "cfg.yaml"), "--metrics", str(tmp_path / "log.csv"),
                                 "--store", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "5 snapshots" in r.output
    st = open_store(tmp_path / "s")
    run = st.runs("imp").to_pylist()[0]
    layout = json.loads(run["weights_layout"])
    w = st.weights("imp").sort_by("step")
    assert w.column("step").to_pylist() == sorted(saved)
    assert w.schema.field("weights").type.value_type == ("float" if dtype == torch.float32 else "double")
    floating = [n for n, t in saved[0].items() if t.is_floating_point()]
    assert layout["names"] == floating  # every floating tensor of the state dict, in its order
    for step, vec in zip(w.column("step").to_pylist(), w.column("weights").to_pylist()):
        expect = torch.cat([saved[step][n].reshape(-1) for n in floating]).numpy()
        assert np.array_equal(np.asarray(vec, dtype=expect.dtype), expect)  # bit for bit
    m = st.metrics("imp").sort_by("step").to_pandas()
    assert m.step.tolist() == list(range(0, 401, 50))
    assert np.allclose(m.train_loss, [1.0 / (i + 1) for i in range(9)]) and "note" not in m.columns
    assert run["lr"] == 0.1 and run["status"] == "completed" and run["record_every"] == 100


def test_malicious_pickle_checkpoint_is_refused(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"step": 0, "model": {"w": torch.zeros(2)}, "hook": Evil()}, folder / "step_000000.pt")
    with pytest.raises(pickle.UnpicklingError):  # the file is what it claims: torch.load(weights_only=True) balks
        torch.load(folder / "step_000000.pt", weights_only=True)
    r = CliRunner().invoke(app, ["import", "checkpoints", str(folder), "--sweep", "imp", "--store", str(tmp_path / "s")])
    assert isinstance(r.exception, RaydynError), r.output
    assert "step_000000.pt: refused" in str(r.exception) and "weights_only=True" in str(r.exception)
    assert not marker.exists()
    st = open_store(tmp_path / "s")
    assert st.metrics("imp").num_rows == 0 and st.runs("imp").num_rows == 0


def test_broken_checkpoint_and_bad_logs_are_named(tmp_path):
    from raydyn.importers import import_checkpoints

    folder, _ = _checkpoint_folder(tmp_path)
    (folder / "step_000900.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RaydynError, match="step_000900.pt: cannot be read"):
        import_checkpoints(tmp_path / "s", folder, sweep="imp")
    (folder / "step_000900.pt").unlink()
    (tmp_path / "bad.csv").write_text("epoch,loss\n1,2\n")
    with pytest.raises(RaydynError, match="bad.csv: the header has no 'step' column"):
        import_checkpoints(tmp_path / "s", folder, sweep="imp", metrics=tmp_path / "bad.csv")
    with pytest.raises(RaydynError, match="no such checkpoint folder"):
        import_checkpoints(tmp_path / "s", tmp_path / "nope", sweep="imp")


def test_tensorboard_scalars_import_into_metrics(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for lr in (0.1, 0.01):
        with SummaryWriter(tmp_path / "tb" / f"lr{lr}") as wr:
            for step in range(0, 30, 3):
                wr.add_scalar("Loss/train", lr * step, step)
                if step % 9 == 0:
                    wr.add_scalar("acc/test", 0.5 + step / 100, step)
    r = CliRunner().invoke(app, ["import", "tensorboard", str(tmp_path / "tb"), "--sweep", "tb",
                                 "--store", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    st = open_store(tmp_path / "s")
    assert sorted(st.runs("tb").column("run").to_pylist()) == ["lr0.01", "lr0.1"]
    m = st.metrics("tb").to_pandas()
    one = m[m.run_id == "tb-lr0.1"].sort_values("step")
    assert one.step.tolist() == list(range(0, 30, 3))
    assert np.allclose(one.loss_train, [0.1 * s for s in range(0, 30, 3)], rtol=1e-6)
    assert one.acc_test.notna().sum() == 4 and one.acc_test.iloc[3] == pytest.approx(0.59, rel=1e-6)


def test_lightning_callback_logs_a_run(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    cb = raydyn.track.LightningCallback(tmp_path / "s", sweep="pl", config={"lr": 0.1}, every=4)
    model = Tiny()
    L.Trainer(max_steps=24, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(model, data)
    st = open_store(tmp_path / "s")
    run = st.runs("pl").to_pylist()[0]
    assert run["status"] == "completed" and run["lr"] == 0.1
    w = st.weights("pl").sort_by("step")
    assert w.column("step").to_pylist() == list(range(4, 25, 4))
    final = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    assert np.allclose(w.column("weights").to_pylist()[-1], final, atol=0)
    assert st.metrics("pl").column("train_loss").null_count == 0


@pytest.mark.ray
def test_tune_callback_logs_every_trial(ray_session, tmp_path):
    from ray import tune

    def trainable(config):
        for i in range(5):
            tune.report({"train_loss": config["lr"] * (5 - i)})

    cb = raydyn.track.TuneCallback(str(tmp_path / "s"), sweep="tuned")
    tune.Tuner(trainable, param_space={"lr": tune.grid_search([0.1, 1.0])},
               run_config=tune.RunConfig(callbacks=[cb], storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    st = open_store(tmp_path / "s")
    runs = st.runs("tuned").to_pandas().sort_values("lr")
    assert runs.lr.tolist() == [0.1, 1.0] and (runs.status == "completed").all()
    assert runs.final_train_loss.tolist() == pytest.approx([0.1, 1.0])
    assert st.metrics("tuned").num_rows == 10


def test_readme_example_runs(tmp_path, monkeypatch):
    """The README's "Runs trained elsewhere" example, as printed (fewer steps), then its commands."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Runs trained elsewhere"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.splitlines()) <= 20 and "range(500)" in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("range(500)", "range(40)"), "README example", "exec"), {})
    st = open_store(tmp_path / "raydyn-results")
    runs = st.runs("my_mlps").to_pandas()
    assert len(runs) == 6 and (runs.status == "completed").all() and set(runs.lr) == {0.01, 0.1, 1.0}
    assert st.weights("my_mlps").num_rows == 6 * 4
    r = CliRunner().invoke(app, ["sweep", "status", "my_mlps"])
    assert "6 finished runs (6 completed); 0 in progress" in r.output, r.output
    r = CliRunner().invoke(app, ["phase-map", "my_mlps", "--metric", "final_train_loss", "--x", "lr", "--y", "seed"])
    assert r.exit_code == 0, r.output


@pytest.mark.ray
def test_hmm_on_tracked_snapshots_finds_the_planted_switch(ray_session, tmp_path):
    """Runs that never recorded weight statistics: the HMM job computes Hu et al.'s features from the
    snapshots. Every run sits in one weight regime for 20 steps, then jumps to another: 2 states, the
    switch at step 20 in every run."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 5)), 3 * rng.normal(size=(6, 5))
    for seed in range(6):
        with raydyn.track(tmp_path, sweep="planted", config={"seed": seed}) as run:
            for step in range(40):
                base = a if step < 20 else b
                w = base + 0.05 * rng.normal(size=base.shape)
                bias = (0.0 if step < 20 else 2.0) + 0.05 * rng.normal(size=6)
                run.log(step, test_acc=float(step >= 20),
                        model={"w": torch.tensor(w, dtype=torch.float32), "b": torch.tensor(bias, dtype=torch.float32)})
    r = CliRunner().invoke(app, ["analyze", "hmm", "planted", "--max-states", "4", "--restarts", "2",
                                 "--covariance", "diag", "--store", str(tmp_path)])
    assert r.exit_code == 0, r.output
    st = open_store(tmp_path)
    summary = st.table("hmm_summary", sweep="planted").to_pandas()
    assert (summary.hmm_n_states == 2).all(), summary
    states = st.table("hmm_states", sweep="planted").to_pandas()
    for rid, d in states.groupby("run_id"):
        s = d.sort_values("step").state.to_numpy()
        assert len(set(s[:20])) == 1 and len(set(s[20:])) == 1 and s[0] != s[-1], (rid, s)


@pytest.mark.skipif(not __import__("tests.s3_helper", fromlist=["available"]).available(),
                    reason="moto[server] is not installed (test extra)")
def test_two_machines_log_into_one_object_store_and_an_orphan_flush_is_dropped(tmp_path):
    """Two processes (as two machines would) log into one s3:// store; then a flush whose snapshots were
    written but whose metric rows (the commit) were not is dropped on resume, not duplicated."""
    import pyarrow as pa

    from tests import s3_helper

    uri = s3_helper.bucket_uri("results")
    procs = [_worker(tmp_path, uri, f"node{i}", 30, 0) for i in range(2)]
    assert [p.wait(timeout=180) for p in procs] == [0, 0]
    st = open_store(uri)
    m = st.metrics("conc").to_pandas()
    assert {rid: sorted(d.step) for rid, d in m.groupby("run_id")} == {"node0": list(range(30)), "node1": list(range(30))}
    assert st.check().ok
    # a crash between the two writes of a flush: an uncommitted snapshots part of run node0
    stray = pa.table({"run_id": ["node0"], "step": pa.array([99], pa.int64()),
                      "weights": pa.array([[0.0] * 36], pa.list_(pa.float32()))})
    st.write_part("weights", "conc", "track-node0-000099", stray)
    with pytest.warns(RaydynWarning, match="1 record.* at or before step 29 were already stored"):
        with raydyn.track(uri, sweep="conc", run_id="node0", config={"who": "node0"}, resume=True) as run:
            run.log(29, train_loss=0.0)  # already stored: dropped
            run.log(30, train_loss=0.5)
    st = open_store(uri)
    assert "track-node0-000099" not in st.parts("weights", "conc")
    steps = st.metrics("conc", filter=_rid("node0")).column("step").to_pylist()
    assert sorted(steps) == list(range(31))
    assert st.runs("conc", filter=_rid("node0")).column("steps_done").to_pylist() == [30]
