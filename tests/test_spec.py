"""Sweep-file validation: every bad input gets a message naming the key path, the value and what is allowed."""
from __future__ import annotations

import textwrap

import pytest

from raydyn.errors import SpecError
from raydyn.spec import parse_sweep, populations

GOOD = """
name: s
task: {dataset: digits, model: mlp, depth: 2, width: 16}
train: {steps: 10, batch_size: 32, optimizer: sgd, lr: 0.1, record_every: 5}
method: grid
parameters:
  lr: {values: [0.01, 0.1]}
  width: {values: [8, 16]}
  seed: {values: [0, 1]}
"""


def err(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse_sweep(textwrap.dedent(text), "bad.yaml")
    return str(e.value)


def test_good_file_expands_to_grid_and_populations():
    spec = parse_sweep(GOOD)
    runs = spec.expand()
    assert len(runs) == 8
    assert len({r.run_id for r in runs}) == 8
    # lr and seed vary within a population; width does not
    pops = populations(runs, 64)
    assert sorted(len(p.members) for p in pops) == [4, 4]
    assert all(len({m["width"] for m in p.members}) == 1 for p in pops)
    # population_size splits evenly
    assert sorted(len(p.members) for p in populations(runs, 3)) == [2, 2, 2, 2]
    # deterministic ids: expanding again gives the same runs
    assert {r.run_id for r in parse_sweep(GOOD).expand()} == {r.run_id for r in runs}


def test_values_are_coerced_to_field_types():
    spec = parse_sweep(GOOD.replace("[0.01, 0.1]", "[1, 0.1]"))
    lrs = sorted(r["lr"] for r in spec.expand())
    assert all(isinstance(v, float) for v in lrs)


CASES = [
    # (what is wrong, sweep text, fragments the message must contain)
    ("unknown top-level key", GOOD + "colour: red\n", ["colour", "unknown key", "allowed keys", "parameters"]),
    ("unknown key in train", GOOD.replace("record_every: 5", "record_every: 5, lrr: 3"), ["train.lrr", "unknown key", "lr"]),
    ("bad method", GOOD.replace("method: grid", "method: bayes"), ["method", "'grid'", "'optuna'", "bayes"]),
    ("unknown dataset", GOOD.replace("dataset: digits", "dataset: cifar"), ["task.dataset", "cifar", "'digits'"]),
    ("unknown model", GOOD.replace("model: mlp", "model: resnet"), ["task.model", "resnet", "'cnn'"]),
    ("unknown optimizer", GOOD.replace("optimizer: sgd", "optimizer: lion"), ["train.optimizer", "lion", "'adamw'"]),
    ("negative lr", GOOD.replace("lr: 0.1,", "lr: -1,"), ["train.lr", "greater than 0", "-1"]),
    ("missing steps", GOOD.replace("steps: 10, ", ""), ["train.steps", "required"]),
    ("wrong type", GOOD.replace("steps: 10", "steps: many"), ["train.steps", "integer", "many"]),
    ("bad swept value", GOOD.replace("[8, 16]", "[8, -4]"), ["parameters.width.values[1]", "-4", "greater than or equal to 1"]),
    ("unknown parameter", GOOD + "  lrate: {values: [1]}\n", ["parameters.lrate", "unknown parameter", "sweepable", "lr"]),
    ("empty values", GOOD.replace("[0, 1]", "[]"), ["parameters.seed", "empty"]),
    ("distribution under grid", GOOD.replace("{values: [0.01, 0.1]}", "{distribution: log_uniform, min: 0.001, max: 1}"),
     ["parameters.lr", "grid", "values"]),
    ("log_uniform min <= 0", GOOD.replace("method: grid", "method: random\nnum_samples: 3").replace(
        "{values: [0.01, 0.1]}", "{distribution: log_uniform, min: 0, max: 1}"), ["parameters.lr", "log_uniform", "min > 0"]),
    ("int_uniform with no integer", GOOD.replace("method: grid", "method: random\nnum_samples: 3").replace(
        "{values: [8, 16]}", "{distribution: int_uniform, min: 8.2, max: 8.7}"), ["parameters.width", "no integer", "empty"]),
    ("random without num_samples", GOOD.replace("method: grid", "method: random"), ["num_samples", "random"]),
    ("optuna without metric", GOOD.replace("method: grid", "method: optuna\nnum_samples: 3"), ["metric", "optuna"]),
    ("unknown data option", GOOD.replace("width: 16}", "width: 16, data: {pixels: 3}}"), ["pixels", "digits", "test_fraction"]),
    ("cnn on a non-image dataset", GOOD.replace("dataset: digits, model: mlp", "dataset: parity, model: cnn"),
     ["cnn", "digits", "parity"]),
    ("bad sweep name", GOOD.replace("name: s", "name: 'my sweep/1'"), ["name", "my sweep/1", "letters"]),
    ("yaml syntax", "name: [unclosed\n", ["not valid YAML", "line"]),
    ("not a mapping", "- a\n- b\n", ["mapping", "list"]),
    ("unknown phases key", GOOD + "phases: {div_fator: 3}\n", ["phases.div_fator", "unknown", "div_factor"]),
    ("phases value out of range", GOOD + "phases: {converge_factor: 2}\n", ["phases.converge_factor", "in (0, 1)", "2"]),
    ("phases value not a number", GOOD + "phases: {lazy_tol: small}\n", ["phases.lazy_tol", "finite number", "small"]),
    ("phases thresholds inconsistent", GOOD + "phases: {catapult_factor: 20, div_factor: 5}\n",
     ["phases.catapult_factor", "phases.div_factor"]),
    ("curvature off the record steps", GOOD.replace("record_every: 5", "record_every: 5, curvature_every: 7"),
     ["curvature_every", "multiple of record_every"]),
    ("bad lr_units", GOOD.replace("record_every: 5", "record_every: 5, lr_units: relative"),
     ["train.lr_units", "'ntk'", "relative"]),
    ("uv model on other data", GOOD.replace("model: mlp", "model: uv"), ["uv", "single", "digits"]),
    ("toy_grok model on other data", GOOD.replace("model: mlp", "model: toy_grok"), ["toy_grok", "addition"]),
    ("unknown probe", GOOD.replace("record_every: 5", "record_every: 5, record: [ntk, hessian]"),
     ["train.record[1]", "'sharpness'", "hessian"]),
    ("both values and distribution", GOOD.replace("{values: [0.01, 0.1]}", "{values: [0.1], distribution: uniform, min: 0, max: 1}"),
     ["parameters.lr", "exactly one"]),
]


@pytest.mark.parametrize("what,text,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_names_the_problem(what, text, fragments):
    msg = err(text)
    assert msg.startswith("bad.yaml")
    for f in fragments:
        assert f in msg, f"{what}: {f!r} not in message:\n{msg}"


def test_phases_section_gives_the_thresholds():
    spec = parse_sweep(GOOD + "phases: {lazy_tol: 0.05, grok_min_gap: 2000}\n")
    th = spec.thresholds()
    assert th.lazy_tol == 0.05 and th.grok_min_gap == 2000 and th.div_factor == 10.0  # others keep defaults


def test_yaml_is_loaded_safely():
    msg = err("name: !!python/object/apply:os.system ['echo hacked']\n")
    assert "not valid YAML" in msg


def test_random_is_deterministic_and_crosses_seeds():
    text = GOOD.replace("method: grid", "method: random\nnum_samples: 5").replace(
        "{values: [0.01, 0.1]}", "{distribution: log_uniform, min: 0.001, max: 1.0}")
    a = parse_sweep(text).expand()
    b = parse_sweep(text).expand()
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert len(a) == 10  # 5 points x 2 seeds
    assert all(0.001 <= r["lr"] <= 1.0 for r in a)


def test_combinations_that_are_invalid_together_are_named():
    text = """
name: tr
task: {dataset: modular, model: transformer, depth: 1, width: 16, heads: 4}
train: {steps: 10}
parameters:
  width: {values: [12, 20]}
  heads: {values: [8, 16]}
"""
    spec = parse_sweep(text)  # each value is valid next to the file's other settings, no pair is
    with pytest.raises(SpecError, match=r"no point of the search space is valid:\n  \{'width': 12, 'heads': 8\}: .*divisible by heads"):
        spec.expand()
