"""Every shipped sweep file parses, expands to valid runs, and its model builds on its data."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raydyn.spec import load_sweep, populations

REPO = Path(__file__).resolve().parents[1]
FILES = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """The sweep files on an image folder name examples/data/digits_png, which a user writes with
    examples/make_digits_images.py (it is not committed): write it here, into a temporary folder."""
    spec = importlib.util.spec_from_file_location("make_digits_images", REPO / "examples" / "make_digits_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    made: dict[int, Path] = {}

    def get(size: int) -> Path:
        if size not in made:
            made[size] = tmp_path_factory.mktemp(f"digits{size}") / "digits_png"
            mod.write_digits(made[size], size=size)
        return made[size]

    return get


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_shipped_sweep_file_is_valid(path, digits_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDYN_CACHE_DIR", str(tmp_path / "cache"))
    spec, _ = load_sweep(path)
    if spec.method == "optuna":
        return
    runs = spec.expand()
    assert runs and populations(runs, spec.resources.population_size)
    cfg = runs[0].config
    if cfg["model"] != "none":
        from raydyn.tasks.build import init_model, load_data

        if cfg["dataset"] == "image_folder":
            assert cfg["data"]["root"] == "examples/data/digits_png"  # what make_digits_images writes
            cfg = {**cfg, "data": {**cfg["data"], "root": str(digits_folder(cfg["data"]["size"]))}}
        model = init_model(cfg, load_data(cfg, base_dir=str(REPO)))
        names = [n for n, _ in model.named_parameters()]
        for prefix in cfg["weights"].get("layers") or []:
            assert any(n.startswith(prefix) for n in names), (prefix, names)
