"""The driver of `raydyn sweep run` imports no torch for a sweep of built-in models and data sets (torch is
most of its memory: benchmarks/load_2000.py), and the check before Ray starts (raydyn.preflight), which
does need torch, then runs in a child process with the same errors, warnings, plug-in resolution and
Ctrl-C as when it runs in the driver."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from raydyn.errors import DataError, RaydynError

ROOT = Path(__file__).resolve().parents[1]

BUILTIN = """
name: {name}
task: {{dataset: teacher, model: mlp, depth: 1, width: 4, data: {{n_train: 32, n_test: 16, d_in: 4}}}}
train: {{steps: 4, batch_size: 8, optimizer: sgd, lr: 0.05, record_every: 2}}
method: grid
parameters:
  lr: {{values: [0.01, 0.02]}}
resources: {{cpu: 1, population_size: 8}}
"""

# `raydyn ARGS...` in this interpreter; at exit writes the heavy modules it has imported to OUT as JSON.
# With PREFLIGHT=child the check runs in its child process even when the driver has imported torch.
PROBE = textwrap.dedent("""\
    import atexit, json, os, runpy, sys
    out = sys.argv[1]
    atexit.register(lambda: open(out, "w").write(json.dumps(sorted(
        m for m in ("torch", "tensorboardX", "raydyn.tasks.models", "raydyn.tasks.data") if m in sys.modules))))
    if os.environ.get("PREFLIGHT"):
        import raydyn.sweep
        raydyn.sweep.PREFLIGHT_IN = os.environ["PREFLIGHT"]
    sys.argv = ["raydyn", *sys.argv[2:]]
    runpy.run_module("raydyn.cli", run_name="__main__")
""")


@pytest.fixture()
def env():
    """The environment of a `raydyn` subprocess: this checkout, a private Ray temp dir (short: socket paths)."""
    ray_tmp = tempfile.mkdtemp(prefix="rdi", dir="/tmp")
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    yield lambda **extra: {**base, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": ray_tmp, **extra}
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_sweep_run_of_builtin_models_imports_no_torch_in_the_driver(tmp_path, env):
    f = tmp_path / "tiny.yaml"
    f.write_text(BUILTIN.format(name="tiny"))
    probe, seen = tmp_path / "probe.py", tmp_path / "modules.json"
    probe.write_text(PROBE)
    r = subprocess.run([sys.executable, str(probe), str(seen), "sweep", "run", str(f), "--store",
                        str(tmp_path / "store"), "--num-cpus", "2"], capture_output=True, text=True,
                       env=env(), cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trained 2 runs" in " ".join(r.stderr.split()), r.stderr
    # the preflight ran (in its child), Tune ran (without its TensorBoardX logger), and neither loaded torch here
    assert json.loads(seen.read_text()) == []
    from raydyn.store import open_store

    assert open_store(str(tmp_path / "store")).runs(sweep="tiny").num_rows == 2


def test_reading_a_sweep_file_imports_no_torch_and_gives_the_same_run_ids(tmp_path):
    from raydyn.spec import load_sweep

    f = tmp_path / "tiny.yaml"
    f.write_text(BUILTIN.format(name="tiny"))
    code = ("import json, sys; from raydyn.spec import load_sweep; spec, _ = load_sweep(sys.argv[1]); "
            "print(json.dumps([[r.run_id, r.population_key()] for r in spec.expand()] + ['torch' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, cwd=str(ROOT),
                       timeout=120)
    assert r.returncode == 0, r.stderr
    *ids, torch_loaded = json.loads(r.stdout)
    assert torch_loaded is False
    spec, _ = load_sweep(f)
    assert ids == [[run.run_id, run.population_key()] for run in spec.expand()]


def test_the_registry_knows_the_activations_of_the_built_in_models():
    from raydyn.tasks import models, registry

    assert registry.ACTIVATIONS == tuple(models.ACTIVATIONS)


# ---------------------------------------------------------------------------- the check, in its child process
LOADER = textwrap.dedent("""\
    import os, time
    import numpy as np

    def good(n=16, **kw):
        x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
        return x, x[:, :1].copy(), x, x[:, :1].copy()

    def broken(**kw):
        raise ValueError("the loader's own mistake")

    def short(**kw):
        x = np.zeros((8, 3), np.float32)
        return x, np.zeros((7, 1), np.float32), x, np.zeros((8, 1), np.float32)

    def slow(pid_file="", **kw):
        open(pid_file, "w").write(str(os.getpid()))
        time.sleep(120)
""")


def loader_sweep(tmp_path: Path, name: str, loader: str, module: str = "loaders", data: str = "") -> Path:
    f = tmp_path / f"{name}.yaml"
    f.write_text(f"name: {name}\ntask: {{dataset: '{module}:{loader}', model: mlp, depth: 1, width: 4"
                 f"{', data: {' + data + '}' if data else ''}}}\n"
                 "train: {steps: 4, batch_size: 8, lr: 0.05, record_every: 2}\n"
                 "parameters:\n  lr: {values: [0.01, 0.02]}\n")
    return f


@pytest.fixture()
def loaders(tmp_path, monkeypatch):
    """A numpy-only data-set module `loaders_<test>` in the working directory (found there by the driver, and by
    the child, which starts in the same directory)."""
    module = f"loaders_{abs(hash(str(tmp_path))) % 10**8}"  # one module name per test (sys.modules caches them)
    (tmp_path / f"{module}.py").write_text(LOADER)
    monkeypatch.chdir(tmp_path)
    yield module
    sys.modules.pop(module, None)


class _Launched(Exception):
    pass


def _until_ray(monkeypatch):
    """ensure_ray raises _Launched: the sweep got past every check before Ray."""
    import raydyn.sweep

    def launched(*a, **k):
        raise _Launched

    monkeypatch.setattr(raydyn.sweep, "ensure_ray", launched)


@pytest.mark.parametrize("loader, fragments", [
    ("broken", ["the loader raised ValueError: the loader's own mistake"]),
    ("short", [":short: x_train has 8 samples but y_train has 7"]),
])
def test_a_failing_check_says_the_same_in_the_child_and_in_the_driver(loaders, tmp_path, monkeypatch, run_main,
                                                                     loader, fragments):
    import raydyn.sweep

    texts = {}
    for where in ("child", "here"):
        monkeypatch.setattr(raydyn.sweep, "PREFLIGHT_IN", where)
        f = loader_sweep(tmp_path, f"{loader}-{where}", loader, loaders)
        code, out, err = run_main("sweep", "run", str(f), "--store", str(tmp_path / "store"))
        assert code == 2, out + err
        assert "Traceback" not in out + err and err.count("error:") == 1, err
        texts[where] = " ".join(err.split()).replace(f"{loader}-{where}", "NAME")
    assert texts["child"] == texts["here"]
    for frag in fragments:
        assert frag in texts["child"]
    # nothing written: no sweep, no table (a Ray log file may appear when Ray already runs in this process,
    # as in the test session: <store>/logs holds what Ray itself printed)
    assert not (tmp_path / "store").exists() or {p.name for p in (tmp_path / "store").iterdir()} <= {"logs"}


def test_the_child_resolves_plug_ins_from_the_working_directory_and_sys_path(loaders, tmp_path, monkeypatch):
    import raydyn
    import raydyn.sweep

    monkeypatch.setattr(raydyn.sweep, "PREFLIGHT_IN", "child")
    _until_ray(monkeypatch)
    with pytest.raises(_Launched):  # the check passed in the child: from the working directory
        raydyn.run_sweep(loader_sweep(tmp_path, "cwd", "good", loaders), store=str(tmp_path / "s1"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far_loaders.py").write_text(LOADER)
    monkeypatch.syspath_prepend(str(elsewhere))
    monkeypatch.chdir(elsewhere.parent.parent)  # not where the module is: only sys.path finds it
    try:
        with pytest.raises(_Launched):
            raydyn.run_sweep(loader_sweep(tmp_path, "path", "good", "far_loaders"), store=str(tmp_path / "s2"))
    finally:
        sys.modules.pop("far_loaders", None)


def test_the_child_sends_back_the_exception_and_the_warnings(tmp_path):
    from raydyn import preflight

    with pytest.raises(DataError, match="the loader raised"):  # the class itself, not just a RaydynError
        raise preflight._error(preflight._pack(DataError("x: the loader raised ValueError: no")))
    err = preflight._error(preflight._pack(KeyError("missing")))
    assert isinstance(err, KeyError) and "preflight child process" in "\n".join(err.__notes__)

    class Local(Exception):  # does not pickle: comes back by type name and message
        pass

    err = preflight._error(preflight._pack(Local("boom")))
    assert type(err) is RuntimeError and str(err) == "Local: boom"
    err = preflight._error(preflight._pack(type("Mistake", (RaydynError,), {})("bad input")))
    assert type(err) is RaydynError and str(err) == "bad input"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        preflight._reissue([("odd", [("torch.jit", "TracerWarning"), ("builtins", "UserWarning"),
                                     ("builtins", "Warning")], "/lab/m.py", 3)] * 2)
    assert [(str(w.message), w.category, w.filename, w.lineno) for w in caught] == [
        ("odd", UserWarning if "torch.jit" not in sys.modules else sys.modules["torch.jit"].TracerWarning,
         "/lab/m.py", 3)]


def test_ctrl_c_during_the_check_stops_the_child_and_writes_nothing(loaders, tmp_path, env):
    pid_file = tmp_path / "child.pid"
    f = loader_sweep(tmp_path, "slow", "slow", loaders, data=f"pid_file: '{pid_file}'")
    probe, seen = tmp_path / "probe.py", tmp_path / "modules.json"
    probe.write_text(PROBE)
    proc = subprocess.Popen([sys.executable, str(probe), str(seen), "sweep", "run", str(f), "--store",
                             str(tmp_path / "store")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(PREFLIGHT="child"), cwd=str(tmp_path),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.exists() and pid_file.read_text()) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists(), proc.communicate(timeout=30)[0]
        child = int(pid_file.read_text())
        assert child != proc.pid  # the loader runs in the preflight's child process
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "interrupted" in out and "Traceback" not in out, out
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped with the driver
    assert not (tmp_path / "store" / "sweeps").exists()
