"""Every shipped sweep file parses, expands to valid runs, and its model builds."""
from __future__ import annotations

from pathlib import Path

import pytest

from raydyn.spec import load_sweep, populations

FILES = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_shipped_sweep_file_is_valid(path):
    spec, _ = load_sweep(path)
    if spec.method == "optuna":
        return
    runs = spec.expand()
    assert runs and populations(runs, spec.resources.population_size)
    cfg = runs[0].config
    if cfg["model"] != "none":
        from raydyn.train.population import init_model, load_data

        model = init_model(cfg, load_data(cfg))
        names = [n for n, _ in model.named_parameters()]
        for prefix in cfg["weights"].get("layers") or []:
            assert any(n.startswith(prefix) for n in names), (prefix, names)
