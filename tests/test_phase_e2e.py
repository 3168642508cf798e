"""Phases end to end on the shared Ray instance: the shipped uv catapult sweep -> store -> phase job ->
adaptive refinement -> boundaries at eta*lambda0 = 2 and 4 (Lewkowycz et al. 2020), CLI and report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from raydyn.aggregate.maps import runs_with_metrics
from raydyn.refine import refine_sweep
from raydyn.report import build_report
from raydyn.spec import parse_sweep
from raydyn.store import open_store
from raydyn.sweep import run_sweep

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# the shipped sweep with one seed (the boundaries of the uv model barely move between seeds)
TEXT = (ROOT / "sweeps" / "catapult_uv.yaml").read_text().replace("name: catapult_uv", "name: cat-e2e").replace(
    "seed: {values: [0, 1]}", "seed: {values: [0]}")


@pytest.fixture(scope="module")
def refined(ray_session, tmp_path_factory):
    store = open_store(tmp_path_factory.mktemp("phase-store"))
    spec = parse_sweep(TEXT)
    grid = run_sweep(spec, TEXT, store)
    rounds = []
    outcome = refine_sweep(spec, TEXT, store, axis="lr", budget=16, tol=0.1, batch=4,
                           on_round=lambda i, pts: rounds.append([p["lr"] for p in pts]))
    return spec, store, grid, outcome, rounds


def test_catapult_boundaries_at_two_and_four(refined):
    _, _, grid, outcome, rounds = refined
    assert grid.trained == 6
    (row,) = outcome.boundaries  # one row: no other swept axis
    onset, top = row.boundaries
    assert (onset.left_phase, onset.right_phase) == ("lazy", "catapult")
    assert (top.left_phase, top.right_phase) == ("catapult", "diverged")
    print(f"boundaries: {onset.location:.3f} [{onset.lower:.3f}, {onset.upper:.3f}], "
          f"{top.location:.3f} [{top.lower:.3f}, {top.upper:.3f}] with {outcome.refine_runs} refined runs in "
          f"{len(rounds)} rounds: {rounds}")
    assert abs(onset.location - 2.0) <= 0.1 and abs(top.location - 4.0) <= 0.1
    assert onset.upper - onset.lower <= 0.1 + 1e-9 and top.upper - top.lower <= 0.1 + 1e-9
    assert outcome.resolved
    # fewer runs than a uniform grid of the same resolution on [1, 5] (41 points)
    assert outcome.grid_runs == 6 and outcome.refine_runs <= 16 and outcome.dense_runs == 41
    assert outcome.grid_runs + outcome.refine_runs < outcome.dense_runs / 2


def test_runs_carry_origin_lambda0_and_labels(refined):
    spec, store, _, outcome, _ = refined
    runs = runs_with_metrics(store, spec.name).to_pandas()
    assert set(runs.origin) == {"grid", "refine"} and (runs.origin == "refine").sum() == outcome.refine_runs
    # lr is eta*lambda0: every run trained at lr / lambda0, lambda0 = (|u|^2+|v|^2)/m ~ 2 for N(0,1) init
    assert np.allclose(runs.lr_actual * runs.lambda0, runs.lr) and runs.lambda0.between(1.8, 2.2).all()
    assert runs.phase.notna().all() and set(runs.phase) == {"lazy", "catapult", "diverged"}
    assert (runs[runs.lr < 2].phase == "lazy").all() and (runs[runs.lr > 4.05].phase == "diverged").all()
    # the NTK fell in the catapult phase (the mechanism), and barely moved in the lazy one
    cat = runs[runs.phase == "catapult"]
    assert (cat.phase_ntk_final < cat.phase_ntk0).all()
    assert (runs[runs.phase == "lazy"].phase_ntk_change < 0.1).all()
    # the sweep file still expands to its 6 grid runs; refined runs are extra, not "missing"
    from raydyn.sweep import sweep_status

    assert sweep_status(spec, store)["missing"] == 0


def test_phase_cli_boundary_and_map(refined, tmp_path):
    spec, store, _, outcome, _ = refined
    root = store.local_path()
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "phase-boundary", spec.name, "--axis", "lr",
                        "--format", "json", "--store", root], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (group,) = json.loads(r.stdout)
    got = [(b["left_phase"], b["right_phase"], b["location"]) for b in group["boundaries"]]
    want = [(b.left_phase, b.right_phase, b.location) for b in outcome.boundaries[0].boundaries]
    assert got == want
    r = subprocess.run([sys.executable, "-m", "raydyn.cli", "phase-map", spec.name, "--metric", "phase", "--x", "lr",
                        "--y", "seed", "--store", root, "--out", str(tmp_path / "m.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "boundary segment" in r.stderr and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_report_shows_the_phase_map(refined, tmp_path):
    spec, store, _, _, _ = refined
    path = build_report(store, spec.name, tmp_path / "r.html", metrics=["phase", "final_train_loss"], x="lr",
                        y="seed", axes=spec.axes())
    text = path.read_text()
    assert '<img class="plot" alt="phase"' in text and "phase_ntk_change" in text
