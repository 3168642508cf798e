"""Multi-node sweeps on a real Ray cluster on this machine: nodes, node loss, driver kills, load.

The cluster (head with no CPUs + 2 worker nodes, each its own raylet and ports) lives in a
helper process (tests/cluster_helper.py) with a private RAY_TMPDIR, so it never touches the
session's Ray instance or the machine's "current cluster"; `raydyn sweep run --address` runs
as a subprocess driver. Everything is bounded by timeouts and torn down in finally blocks.
"""
from __future__ import annotations

import glob
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from raydyn.store import open_store

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "cluster_helper.py"


class LocalCluster:
    """The helper process and its command channel (one JSON line per reply)."""

    def __init__(self, workers: int = 2, lifetime_s: float = 1500):
        self.tmp = tempfile.mkdtemp(prefix="rdc", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_TMPDIR=self.tmp, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, str(HELPER), "--workers", str(workers), "--max-lifetime",
                                      str(lifetime_s)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=self.env, start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        info = self._reply(timeout=180)
        self.address, self.head, self.workers = info["address"], info["head"], list(info["workers"])

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _reply(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"cluster helper did not answer in {timeout} s (exit code {self.proc.poll()})") from None
        return json.loads(line)

    def command(self, cmd: str, timeout: float = 120) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        assert "error" not in reply, reply
        return reply

    def kill_node(self, node_id: str) -> None:
        self.command(f"kill {node_id}")
        self.workers.remove(node_id)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=90)
        except (OSError, subprocess.TimeoutExpired):
            pass
        finally:
            if self.proc.poll() is None:  # the helper's own session: only processes it started
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ drivers
    def sweep(self, sweep_file: Path, store: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "raydyn.cli", "sweep", "run", str(sweep_file), "--store",
                                 str(store), "--address", self.address, *extra], env=self.env, cwd=str(ROOT),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=sigint_default)


def sigint_default() -> None:
    """In the child: SIGINT back to its default, so that Python raises KeyboardInterrupt on it even when
    this test process runs in the background (where the shell ignores SIGINT, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(workers=2)
    try:
        yield c
    finally:
        c.close()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"sweep did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def write_sweep(tmp_path: Path, name: str, steps: int, widths: list[int], checkpoint_every: int = 0,
                record_every: int = 100) -> Path:
    text = f"""
name: {name}
task: {{dataset: teacher, model: mlp, depth: 1, width: 8, data: {{n_train: 128, n_test: 64, d_in: 8}}}}
train: {{steps: {steps}, batch_size: 32, optimizer: sgd, lr: 0.05, record_every: {record_every},
         checkpoint_every: {checkpoint_every}}}
method: grid
parameters:
  lr: {{values: [0.01, 0.02]}}
  width: {{values: {widths}}}
resources: {{cpu: 1, population_size: 2}}
"""
    f = tmp_path / f"{name}.yaml"
    f.write_text(text)
    return f


def assert_whole(store_dir: Path, sweep: str, n_runs: int, steps: int, record_every: int):
    """Every run exactly once, every metric row exactly once, and a healthy store."""
    store = open_store(store_dir)
    runs = store.runs(sweep=sweep).to_pandas()
    assert len(runs) == n_runs and runs.run_id.is_unique
    m = store.metrics(sweep=sweep, columns=["run_id", "step"]).to_pandas()
    assert not m.duplicated().any() and set(m.run_id) == set(runs.run_id)
    assert (m.groupby("run_id").step.apply(list).map(lambda s: s == list(range(0, steps + 1, record_every)))).all()
    report = store.check()
    assert report.ok, report.summary()
    return runs


# ---------------------------------------------------------------------------- (a) runs land on several nodes
def test_runs_land_on_more_than_one_node(cluster, tmp_path):
    f = write_sweep(tmp_path, "nodes", steps=300, widths=[8, 16, 24, 32])
    rc, out = finish(cluster.sweep(f, tmp_path / "store"), timeout=300)
    assert rc == 0, out[-3000:]
    runs = assert_whole(tmp_path / "store", "nodes", 8, 300, 100)
    assert set(runs.node) <= set(cluster.workers)  # the head has no CPUs: nothing trains there
    assert runs.node.nunique() == 2, runs.groupby("node").size()
    print(f"runs per node: {runs.groupby('node').size().to_dict()}")


# ---------------------------------------------------------------------------- (b) a worker node dies mid-sweep
def _checkpoints(store_dir: Path) -> list[dict]:
    out = []
    for meta in glob.glob(str(store_dir / "_tune" / "*" / "*" / "checkpoint_*" / "meta.json")):
        try:
            d = json.loads(Path(meta).read_text())
        except (OSError, ValueError):  # replaced under us (Tune keeps only the latest)
            continue
        out.append({"pop": Path(meta).parents[1].name, "step": d["step"], "node": d.get("node")})
    return out


def test_worker_node_lost_mid_sweep_resumes_from_checkpoint(cluster, tmp_path):
    steps, every = 16000, 1600  # long enough that a trial caught at a checkpoint is still training when its node dies
    f = write_sweep(tmp_path, "faults", steps=steps, widths=[8, 16, 24, 32], checkpoint_every=every,
                    record_every=200)
    store_dir = tmp_path / "store"
    proc = cluster.sweep(f, store_dir)
    victim = None
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and victim is None:
            done = {p.stem[5:] for p in (store_dir / "runs" / "sweep=faults").glob("part-*.parquet")}
            for c in _checkpoints(store_dir):
                # a checkpoint of the first half: the trial still has steps to go when its node is killed (one
                # caught late could finish before the kill, and then nothing is lost or retried)
                if every <= c["step"] <= steps // 2 and c["node"] in cluster.workers and c["pop"] not in done:
                    victim = c
                    break
            time.sleep(0.2)
        assert victim is not None, "no trial wrote a checkpoint in time"
        cluster.kill_node(victim["node"])
        rc, out = finish(proc, timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if victim is not None and len(cluster.workers) < 2:
            cluster.workers.append(cluster.command("add")["node"])  # the next scenarios have two workers again
    assert rc == 0, out[-3000:]
    assert "1 retried · 0 failed trials" in out  # Tune saw the lost trial fail and retried it
    runs = assert_whole(store_dir, "faults", 8, steps, 200)
    lost = runs[runs.population == victim["pop"]]
    assert len(lost) == 2 and victim["node"] not in set(lost.node)  # retried on the surviving node
    # the retry resumed from a checkpoint, not from step 0
    results = [json.loads(line) for line in
               Path(glob.glob(str(store_dir / "_tune" / "*" / victim["pop"] / "result.json"))[0]).read_text().splitlines()]
    final = [r for r in results if r.get("pop_done") == 1]
    assert len(final) == 1 and final[0]["resumed_from"] >= victim["step"] > 0, final
    assert _checkpoints(store_dir) == []  # a population in the store keeps no checkpoint behind
    print(f"killed node {victim['node'][:8]} after checkpoint at step {victim['step']}; "
          f"retry resumed from step {final[0]['resumed_from']} of {steps}")


# ---------------------------------------------------------------------------- (c) the driver is killed
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_driver_killed_then_rerun_finishes(cluster, tmp_path, sig):
    steps = 1500
    f = write_sweep(tmp_path, "driver", steps=steps, widths=[8, 16, 24, 32, 40, 48])
    store_dir = tmp_path / "store"
    proc = cluster.sweep(f, store_dir)
    runs_dir = store_dir / "runs" / "sweep=driver"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(runs_dir.glob("part-*.parquet")):
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    proc.send_signal(sig)
    rc, out = finish(proc, timeout=120)
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
    else:  # SIGTERM is handled like Ctrl-C: one message, exit 128 + signal, no traceback
        assert rc == 128 + sig, out[-3000:]
        assert "interrupted. Completed runs are in the store" in out and "Traceback" not in out
    # a driver killed by SIGKILL cannot stop its trials: until Ray notices that its job is gone, a trial on the
    # cluster may still finish and commit its population. Read the store once it has stopped changing (5 s).
    first, since = open_store(store_dir).runs(sweep="driver").to_pandas(), time.time()
    while sig == signal.SIGKILL and time.time() - since < 5 and time.time() < deadline:
        time.sleep(0.5)
        now = open_store(store_dir).runs(sweep="driver").to_pandas()
        if len(now) != len(first):
            first, since = now, time.time()
    assert 0 < len(first) < 12 and len(first) % 2 == 0  # whole populations only
    rc, out = finish(cluster.sweep(f, store_dir), timeout=400)
    assert rc == 0, out[-3000:]
    assert f"kept {len(first)} already in the store" in out
    final = assert_whole(store_dir, "driver", 12, steps, 100)
    assert set(first.run_id) <= set(final.run_id)
    # the runs kept from the first driver were not rewritten
    kept = final[final.run_id.isin(first.run_id)]
    assert sorted(kept.wall_time_s) == sorted(first.wall_time_s)


# ---------------------------------------------------------------------------- load, scaled down
LOAD = """
name: load
task: {{dataset: teacher, model: mlp, depth: 1, width: 4, data: {{n_train: 64, n_test: 32, d_in: 4}}}}
train: {{steps: 20, batch_size: 16, optimizer: sgd, lr: 0.05, record_every: 10, record: []}}
method: grid
parameters:
  lr: {{values: {lrs}}}
  seed: {{values: {seeds}}}
resources: {{cpu: 1, population_size: {pop}}}
"""

AGGREGATE = ("SELECT r.lr, avg(m.train_loss) AS loss, count(*) AS n FROM metrics m JOIN runs r USING (run_id) "
             "WHERE m.step = 20 AND r.lr < 0.05 GROUP BY r.lr ORDER BY r.lr")


@pytest.mark.ray
def test_200_runs_and_a_filtered_aggregate(ray_session, tmp_path):
    """200 runs in 4 populations; the aggregate's rows, in-process and from a `raydyn query` process. (Its
    speed is measured in benchmarks/load_2000.py, not asserted here.)"""
    from raydyn.spec import parse_sweep
    from raydyn.sweep import run_sweep

    text = LOAD.format(lrs=[round(0.01 * (i + 1), 3) for i in range(10)], seeds=list(range(20)), pop=50)
    store = open_store(tmp_path / "store")
    outcome = run_sweep(parse_sweep(text), text, store)
    assert outcome.trained == 200 and not outcome.failed_populations
    # Tune's bookkeeping holds a population id per trial, not its 50 run configs
    params = glob.glob(str(tmp_path / "store" / "_tune" / "*" / "*" / "params.json"))
    assert len(params) == 4 and max(os.path.getsize(p) for p in params) < 200
    res = store.sql(AGGREGATE)
    assert res.num_rows == 4 and res.column("n").to_pylist() == [20] * 4
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "query", AGGREGATE, "--store", str(tmp_path / "store"),
                        "--format", "json"], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    assert [row["n"] for row in json.loads(r.stdout)] == [20] * 4
