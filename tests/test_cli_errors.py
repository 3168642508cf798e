"""Bad input to `raydyn sweep run`: each is one clear message, exit code 2, no traceback, before any training.

Run through the CLI: in-process through ``raydyn.cli.main`` (where a failure must be simulated
with monkeypatch) or as a ``python -m raydyn.cli`` subprocess.
"""
from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest


ROOT = Path(__file__).resolve().parents[1]

GOOD = """
name: bad-input
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 5, batch_size: 16, optimizer: sgd, lr: 0.05, record_every: 5}
method: grid
parameters:
  lr: {values: [0.01, 0.1]}
"""


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "raydyn.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


def one_clear_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    # raydyn's message comes last (Ray's C++ client may log connection attempts before it)
    message = err[err.rindex("error:"):] if "error:" in err else ""
    assert message and (err.startswith("error:") or "\nerror:" in err), err
    flat = " ".join(message.split())  # the console may wrap long messages
    for f in fragments:
        assert f in flat, f"{f!r} not in:\n{err}"


def sweep_file(tmp_path: Path, text: str = GOOD) -> str:
    f = tmp_path / "sweep.yaml"
    f.write_text(text)
    return str(f)


# ---------------------------------------------------------------------------- the store
def test_unwritable_store_path(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    target = blocker / "store"
    # a hang guard, not a speed target: starting Ray and failing later would take longer
    r = run_cli("sweep", "run", sweep_file(tmp_path), "--store", str(target), timeout=60)
    one_clear_error(r.returncode, r.stderr, str(target), "Not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "sweep.yaml"]


class FullDisk(pafs.LocalFileSystem):
    """A local filesystem whose disk is full: every new file fails with ENOSPC."""

    def open_output_stream(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_full_store_disk(tmp_path, monkeypatch, run_main):
    import raydyn.sweep

    monkeypatch.setattr(pafs, "LocalFileSystem", FullDisk)
    started = []
    monkeypatch.setattr(raydyn.sweep, "ensure_ray", lambda *a, **k: started.append(1))
    code, _, err = run_main("sweep", "run", sweep_file(tmp_path), "--store", str(tmp_path / "store"))
    one_clear_error(code, err, str(tmp_path / "store"), "not writable", "No space left on device")
    assert not started
    assert list((tmp_path / "store").iterdir()) == []  # nothing written, the probe included


# ---------------------------------------------------------------------------- the cluster
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}", "198.51.100.7:6379", "nohost"])
def test_unreachable_address_fails_fast(tmp_path, address):
    address = address.format(port=_closed_port())
    # the subprocess timeout is a hang guard: Ray alone retries an unreachable GCS for minutes
    r = run_cli("sweep", "run", sweep_file(tmp_path), "--store", str(tmp_path / "store"), "--address", address,
                env={"RAYDYN_CONNECT_TIMEOUT_S": "3"}, timeout=45)
    one_clear_error(r.returncode, r.stderr, f"--address {address!r}")
    assert not (tmp_path / "store" / "sweeps").exists()  # the sweep was not registered


def test_ray_client_without_grpcio_names_the_package(tmp_path):
    import importlib.util

    if importlib.util.find_spec("grpc") is not None:
        pytest.skip("grpcio is installed here (ray[client]); the message is for installs without it")
    r = run_cli("sweep", "run", sweep_file(tmp_path), "--store", str(tmp_path / "store"), "--address",
                "ray://127.0.0.1:10001")
    one_clear_error(r.returncode, r.stderr, "--address 'ray://127.0.0.1:10001'", "grpcio",
                    "pip install 'ray[client]==2.60.0'")
    assert not (tmp_path / "store" / "sweeps").exists()


@pytest.mark.ray
def test_gpu_requested_where_none_exists(ray_session, tmp_path):
    text = GOOD.replace("method: grid", "method: grid\nresources: {gpu: 1}")
    r = run_cli("sweep", "run", sweep_file(tmp_path, text), "--store", str(tmp_path / "store"),
                env={"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address})
    one_clear_error(r.returncode, r.stderr, "resources.gpu", "1 GPU", "has 0", "resources.gpu: 0")
    assert not (tmp_path / "store" / "sweeps").exists()


# ---------------------------------------------------------------------------- the sweep file
SPEC_CASES = {
    "unknown model": (GOOD.replace("model: mlp", "model: resnet"), ["task.model", "resnet", "'mlp'"]),
    "unknown dataset": (GOOD.replace("dataset: teacher", "dataset: cifar"), ["task.dataset", "cifar", "'digits'"]),
    "unknown optimizer": (GOOD.replace("optimizer: sgd", "optimizer: lion"), ["train.optimizer", "lion", "'adam'"]),
    "empty search space": (GOOD.replace("[0.01, 0.1]", "[]"), ["parameters.lr", "empty"]),
    "empty distribution": (GOOD.replace("method: grid", "method: random\nnum_samples: 2").replace(
        "lr: {values: [0.01, 0.1]}", "width: {distribution: int_uniform, min: 4.2, max: 4.8}"),
        ["parameters.width", "no integer", "empty"]),
    "no valid point": ("""
name: tr
task: {dataset: modular, model: transformer, depth: 1, width: 16, heads: 4}
train: {steps: 10}
parameters:
  width: {values: [12, 20]}
  heads: {values: [8, 16]}
""", ["no point of the search space is valid", "'width': 12, 'heads': 8", "divisible by heads"]),
    "checkpoint_every swept": (GOOD + "  checkpoint_every: {values: [10, 20]}\n",
                               ["parameters.checkpoint_every", "cannot be swept"]),
}


@pytest.mark.parametrize("case", list(SPEC_CASES))
def test_bad_sweep_file(tmp_path, run_main, case):
    text, fragments = SPEC_CASES[case]
    code, _, err = run_main("sweep", "run", sweep_file(tmp_path, text), "--store", str(tmp_path / "store"))
    one_clear_error(code, err, *fragments)
    assert not (tmp_path / "store").exists()


def test_missing_sweep_file(tmp_path, run_main):
    code, _, err = run_main("sweep", "run", str(tmp_path / "nope.yaml"), "--store", str(tmp_path / "store"))
    one_clear_error(code, err, "nope.yaml", "no such sweep file")
