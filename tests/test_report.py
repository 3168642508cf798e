"""The HTML report: self-contained, loads in headless Chromium with no script errors, shows the phase map."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from raydyn.report import build_report
from raydyn.spec import parse_sweep, populations
from raydyn.store import open_store
from raydyn.train.population import train_population
from raydyn.train.recorder import runs_table

SWEEP = """
name: rep
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 20, batch_size: 16, lr: 0.05, record_every: 5}
parameters:
  lr: {values: [0.01, 0.1, 100.0]}
  width: {values: [4, 8]}
  seed: {values: [0, 1]}
"""

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("rep")
    store = open_store(root / "store")
    spec = parse_sweep(SWEEP)
    store.put_sweep("rep", SWEEP, {"hash": "x"})
    for pop in populations(spec.expand(), 64):
        res = train_population(pop)
        store.write_runs("rep", pop.pop_id, runs=runs_table(res, pop.pop_id), metrics=res.recorder.metrics_table(),
                         weights=res.recorder.weights_table())
    path = build_report(store, "rep", root / "rep.html", axes=spec.axes())
    return root, path


def test_report_is_self_contained(report):
    _, path = report
    text = path.read_text()
    assert "data:image/png;base64," in text
    # no external resource of any kind
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)
    assert text.count('<img class="plot"') == 1  # final_test_acc is NaN for regression: one map


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_opens_in_headless_chromium(report, tmp_path):
    root, path = report
    dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u1'}", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-ready="1"' in body, body  # the page's script ran to the end
    assert "data-errors" not in body, body  # no script error
    assert 'data-rows="12"' in body and 'data-images="1/1"' in body, body
    assert "<svg" in dom.stdout  # the first run's curves were drawn
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'u2'}", "--window-size=1200,900",
                    f"--screenshot={shot}", path.as_uri()], capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    # the phase map (viridis cells, red diverged hatching) is on screen: many saturated pixels
    import numpy as np

    px = np.asarray(img).reshape(-1, 3).astype(int)
    colourful = int(((px.max(1) - px.min(1)) > 60).sum())
    assert colourful > 5000, colourful
