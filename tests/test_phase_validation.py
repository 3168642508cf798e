"""Validation sweeps shipped in sweeps/, run small through the population trainer and the phase rules.

* catapult on a wide two-layer ReLU network, lr in NTK units measured by raydyn: lazy below
  eta*lambda0 = 2, catapult above (Lewkowycz et al. 2020);
* edge of stability on a tanh MLP, full-batch GD: sharpness * lr / 2 in [0.95, 1.15] after
  progressive sharpening (Cohen et al. 2021).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from raydyn.jobs.phase import summarise_run, trajectory_of
from raydyn.spec import parse_sweep, populations
from raydyn.train.population import train_population
from raydyn.train.recorder import runs_table

pytestmark = pytest.mark.slow
SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def shipped(name: str, **overrides) -> str:
    """A shipped sweep file with some keys replaced (dotted paths), as YAML text."""
    d = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = d
        for p in parents:
            node = node[p]
        node[last] = value
    return yaml.safe_dump(d)


def classified(text: str):
    spec = parse_sweep(text)
    (pop,) = populations(spec.expand(), 64)
    res = train_population(pop)
    mt = res.recorder.metrics_table().to_pandas()
    runs = runs_table(res, pop.pop_id).to_pandas().set_index("run_id")
    out = {}
    for m in pop.members:
        rows = mt[mt.run_id == m.run_id]
        traj, _ = trajectory_of({c: rows[c].tolist() for c in rows.columns}, runs.loc[m.run_id, "status"])
        out[m.config["lr"]] = (summarise_run(traj, spec.thresholds(), runs.loc[m.run_id, "lr_actual"]),
                               runs.loc[m.run_id])
    return out


def test_relu_catapult_starts_at_two():
    text = shipped("catapult_relu", **{"task.width": 1024, "train.steps": 150, "parameters.lr": {"values": [1.6, 2.6]},
                                       "parameters.seed": {"values": [0]}})
    res = classified(text)
    lazy, _ = res[1.6]
    cat, run = res[2.6]
    assert lazy["phase"] == "lazy" and lazy["phase_ntk_change"] < 0.05
    assert cat["phase"] == "catapult" and cat["phase_peak_ratio"] > 10
    # the catapult ends in a flatter region: final NTK below 2 / lr (the mechanism)
    assert cat["phase_ntk_final"] * run["lr_actual"] < 2.0
    assert run["lambda0"] == pytest.approx(cat["phase_ntk0"], rel=1e-6)


def test_edge_of_stability_sharpness_hovers_at_two_over_lr():
    text = shipped("eos", **{"train.steps": 1000, "parameters.lr": {"values": [0.4, 0.6]}})
    res = classified(text)
    for lr, (s, run) in res.items():
        print(f"lr {lr}: sharpness*lr/2 = {s['phase_eos_ratio']:.3f}, final loss {s['phase_loss_final']:.2e}")
        assert run["status"] == "completed"
        assert 0.95 <= s["phase_eos_ratio"] <= 1.15, (lr, s["phase_eos_ratio"])
        assert s["phase_loss_final"] < 0.1 * s["phase_loss0"]  # it still trains, non-monotonically
    assert np.isfinite([s["phase_sharpness_final"] for s, _ in res.values()]).all()
