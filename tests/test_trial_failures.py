"""Deterministic set-up errors stop before Ray (one message, exit 2, nothing written); a trial that fails the
same way on every retry is reported once, with its root cause; Ray's own log goes to the store's log folder."""
from __future__ import annotations

import logging
import textwrap

import pytest

from raydyn.spec import load_sweep
from raydyn.store import open_store
from raydyn.sweep import failure_report, log_path, root_cause, route_ray_logs, run_sweep, unroute_ray_logs

PLUGIN = textwrap.dedent("""\
    import torch

    class Wrong(torch.nn.Module):          # 3 outputs for a 1-dimensional regression target
        def __init__(self, d):
            super().__init__(); self.l = torch.nn.Linear(d, 3)
        def forward(self, x):
            return self.l(x)

    class Late(torch.nn.Module):           # works for the driver's check, then fails in training
        def __init__(self, d):
            super().__init__(); self.l = torch.nn.Linear(d, 1); self.calls = 0
        def forward(self, x):
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("late failure in forward")
            return self.l(x)

    class NoVmap(torch.nn.Module):         # data-dependent control flow: trained member by member, with a warning
        def __init__(self, d):
            super().__init__(); self.l = torch.nn.Linear(d, 1)
        def forward(self, x):
            if x.sum().item() > 1e9:
                return 2 * self.l(x)
            return self.l(x)

    def wrong(input_shape, out_dim, **kw):
        return Wrong(input_shape[0])

    def late(input_shape, out_dim, **kw):
        return Late(input_shape[0])

    def novmap(input_shape, out_dim, **kw):
        return NoVmap(input_shape[0])
""")


def sweep_file(tmp_path, name, model):
    # one module name per test: a module imported from another test's folder would be found first
    (tmp_path / f"plug_{name}.py").write_text(PLUGIN)
    f = tmp_path / f"{name}.yaml"
    f.write_text(textwrap.dedent(f"""
        name: {name}
        task: {{dataset: teacher, model: "plug_{name}:{model}", data: {{n_train: 32, n_test: 16, d_in: 4}}}}
        train: {{steps: 6, batch_size: 8, lr: 0.1, record_every: 2}}
        parameters:
          lr: {{values: [0.1, 0.2]}}
    """))
    return f


def test_a_model_that_does_not_fit_its_labels_is_one_message_before_ray(run_main, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f = sweep_file(tmp_path, "wrong", "wrong")
    code, out, err = run_main("sweep", "run", str(f), "--store", str(tmp_path / "store"))
    text = " ".join((out + err).split())
    assert code == 2, text
    assert "model 'plug_wrong:wrong' fails on a batch of 8 samples of dataset 'teacher'" in text
    assert "input (8, 4), labels (8, 1), loss mse" in text and "Nothing was trained" in text
    assert "Traceback" not in text and text.count("error:") == 1
    store = open_store(str(tmp_path / "store"))
    assert "wrong" not in store.sweeps()  # nothing registered, nothing written


def test_root_cause_names_the_user_frame_of_an_exception_and_of_ray_traceback_text(tmp_path):
    def users_forward():
        raise ValueError("width must be even")

    try:
        users_forward()
    except ValueError as e:
        cause = root_cause(e)
    assert cause.startswith("ValueError: width must be even (at ") and cause.endswith(", in users_forward)")
    ray_text = textwrap.dedent("""\
        Traceback (most recent call last):
          File "/venv/lib/python3.11/site-packages/ray/air/execution/_internal/event_manager.py", line 110, in resolve_future
            result = ray.get(future)
        ray.exceptions.RayTaskError(RuntimeError): ray::ImplicitFunc.train() (pid=501, ip=127.0.0.1)
          File "/repo/raydyn/sweep.py", line 252, in population_trial
            result = train_population(pop)
          File "/home/me/lab/models.py", line 7, in forward
            raise RuntimeError("my forward fails")
          File "/venv/lib/python3.11/site-packages/torch/nn/modules/module.py", line 1789, in _call_impl
            return forward_call(*args, **kwargs)
        RuntimeError: my forward fails
        """)
    assert root_cause(ray_text) == "RuntimeError: my forward fails (at /home/me/lab/models.py:7, in forward)"


def test_failure_report_groups_trials_by_cause():
    same = "RuntimeError: boom (at /lab/m.py:3, in forward)"
    report = failure_report(["p1", "p2", "p3"], {"p1": [same] * 3, "p2": [same] * 3,
                                                  "p3": ["OSError: node died", "KeyError: 'x'"]})
    assert len(report) == 2
    assert report[0].startswith("2 trial(s) failed (p1, p2), with the same error on each of 3 attempt(s): " + same)
    assert "not in the cluster" in report[0]
    assert report[1] == "1 trial(s) failed (p3), after 2 attempt(s): KeyError: 'x'"


@pytest.mark.ray
def test_a_trial_failing_the_same_way_on_every_retry_is_reported_once(ray_session, tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    spec, text = load_sweep(sweep_file(tmp_path, "late", "late"))
    store = open_store(str(tmp_path / "store"))
    log = route_ray_logs(log_path(store, "late"))
    try:
        out = run_sweep(spec, text, store, max_failures=1)
    finally:
        unroute_ray_logs()
    assert out.trained == 0 and len(out.failed_populations) == 1
    (causes,) = out.failures.values()
    line = next(i for i, ln in enumerate(PLUGIN.splitlines(), 1) if "late failure" in ln)
    assert causes == [f"RuntimeError: late failure in forward (at {tmp_path / 'plug_late.py'}:{line}, in forward)"] * 2
    (para,) = failure_report(out.failed_populations, out.failures)
    assert "with the same error on each of 2 attempt(s)" in para
    # Ray's tracebacks went to the store's log folder, not to the terminal
    assert log.parent == tmp_path / "store" / "logs"
    assert "Trial task failed" in log.read_text() and "late failure in forward" in log.read_text()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    # unrouted: Ray's logger prints to the terminal again
    assert not any(getattr(h, "baseFilename", None) == str(log) for h in logging.getLogger("ray").handlers)


@pytest.mark.ray
def test_a_worker_warning_reaches_the_driver_once_and_a_clean_run_prints_no_ray_lines(ray_session, tmp_path,
                                                                                     monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    spec, text = load_sweep(sweep_file(tmp_path, "novmap", "novmap"))
    store = open_store(str(tmp_path / "store"))
    shown: list[str] = []
    capfd.readouterr()
    route_ray_logs(log_path(store, "novmap"), warn=shown.append)
    try:
        out = run_sweep(spec, text, store)
        import time

        time.sleep(1.5)  # worker output reaches the driver asynchronously
    finally:
        unroute_ray_logs()
    assert out.trained == 2 and not out.failed_populations
    assert len(shown) == 1 and "cannot be vectorised with vmap" in shown[0], shown
    captured = capfd.readouterr()
    assert "NotVectorisedWarning" not in captured.err and "pid=" not in captured.err, captured.err


@pytest.mark.slow
def test_a_clean_sweep_prints_only_raydyns_lines(tmp_path):
    """The CLI on its own embedded Ray: no token notice, no worker tracebacks, nothing but raydyn's lines; Ray's
    notices are in the store's log folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    f = tmp_path / "clean.yaml"
    f.write_text("name: clean\ntask: {dataset: teacher, model: mlp, depth: 1, width: 4, "
                 "data: {n_train: 32, n_test: 16, d_in: 4}}\ntrain: {steps: 4, batch_size: 8, lr: 0.1}\n"
                 "parameters:\n  lr: {values: [0.1, 0.2]}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}  # as in a fresh shell
    raydyn = Path(sys.executable).with_name("raydyn")
    p = subprocess.run([str(raydyn), "sweep", "run", str(f), "--store", str(tmp_path / "store"), "--num-cpus", "1"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
    assert p.returncode == 0, p.stdout + p.stderr
    assert all(ln.startswith(("clean ", "sweep clean:", "store:")) for ln in lines), lines
    logs = list((tmp_path / "store" / "logs").glob("clean-*.log"))
    assert len(logs) == 1 and "Token authentication" in logs[0].read_text()
