"""Issue 16, items 4 and 6: a sweep grows in place (a changed file that only adds grid values trains just the
new runs), `sweep delete` / `sweep list`, and W&B sweep configs' own keys in sweep files.

The W&B examples are those of W&B's documentation ("Define a sweep configuration" and "Sweep configuration
options", docs.wandb.ai/models/sweeps/), each completed with raydyn's task:/train: sections and, where the
test is about the mapping rather than the names, with W&B's example parameter names replaced by raydyn's
(learning_rate -> lr, fc_layer_size -> width, epochs -> steps).
"""
from __future__ import annotations

import json
import textwrap

import pyarrow._fs as pa_private_fs
import pytest
from typer.testing import CliRunner

import raydyn.store.store as store_module
from raydyn.errors import RaydynError, SpecError, StoreError
from raydyn.spec import parse_sweep, sweep_hash
from raydyn.store import open_store
from raydyn.sweep import check_sweep_unchanged, key_differences, list_sweeps, register_sweep, sweep_growth

from tests import s3_helper
from tests.store.helpers import make_metrics, make_runs, make_weights

BASE = """\
name: grow
task: {dataset: digits, model: mlp, depth: 1, width: 4}
train: {steps: 20, batch_size: 64, record_every: 10, record: [weights], checkpoint_every: 0}
method: grid
parameters:
  lr: {values: [0.05, 0.5]}
resources: {cpu: 1}
"""


def grown(old: str, new: str):
    return sweep_growth(parse_sweep(old), old, parse_sweep(new), new)


# ------------------------------------------------------------------------------ what counts as growth
GROWS = [
    # (what, new file, runs of the new file)
    ("a value added", BASE.replace("[0.05, 0.5]", "[0.05, 0.5, 0.2]"), 3),
    ("values reordered and added", BASE.replace("[0.05, 0.5]", "[0.2, 0.5, 0.05]"), 3),
    ("seeds added (the stored seed 0 among them)", BASE.replace("resources:", "  seed: {values: [0, 1]}\nresources:"), 4),
    ("a new parameter whose values include the stored setting (task.width 4)",
     BASE.replace("resources:", "  width: {values: [4, 8]}\nresources:"), 4),
    ("a new parameter at a default the file leaves unset (train.momentum 0.0)",
     BASE.replace("resources:", "  momentum: {values: [0.0, 0.9]}\nresources:"), 4),
    ("a new data option whose values include its default (digits seed 0)",
     BASE.replace("resources:", "  data.seed: {values: [0, 1]}\nresources:"), 4),
    ("comments and flow/block style are no change",
     "# grown\n" + BASE.replace("lr: {values: [0.05, 0.5]}", "lr:\n    values:\n      - 0.05\n      - 0.5\n      - 1.0"), 3),
]


@pytest.mark.parametrize("what,new,n", GROWS, ids=[g[0] for g in GROWS])
def test_a_superset_grid_grows(what, new, n):
    g = grown(BASE, new)
    assert g.refused == [], (what, g.refused)
    assert (g.old_runs, g.new_runs) == (2, n)
    old_ids = {r.run_id for r in parse_sweep(BASE).expand()}
    assert old_ids <= {r.run_id for r in parse_sweep(new).expand()}


def test_a_stored_value_becomes_a_list():
    old = BASE.replace("resources:", "  momentum: {value: 0.5}\nresources:")
    new = BASE.replace("resources:", "  momentum: {values: [0.5, 0.9]}\nresources:")
    g = grown(old, new)
    assert g.refused == [] and (g.old_runs, g.new_runs) == (2, 4)
    assert g.differences == ["parameters.momentum.value: 0.5 -> (not set)",
                             "parameters.momentum.values: (not set) -> [0.5, 0.9]"]


REFUSED = [
    # (what, new file, fragments of the reasons)
    ("a value removed", BASE.replace("[0.05, 0.5]", "[0.05, 0.2]"), ["parameters.lr", "[0.5] left out"]),
    ("a parameter dropped", BASE.replace("resources:", "  width: {values: [4, 8]}\nresources:"), None),
    ("train changed", BASE.replace("steps: 20", "steps: 30"), ["train.steps: 20 -> 30"]),
    ("task changed", BASE.replace("depth: 1", "depth: 2"), ["task.depth: 1 -> 2"]),
    ("a train key added, even at its default", BASE.replace("steps: 20,", "steps: 20, lr: 0.1,"),
     ["train.lr: (not set) -> 0.1"]),
    ("resources changed", BASE.replace("{cpu: 1}", "{cpu: 2}"), ["resources.cpu: 1 -> 2"]),
    ("phases added", BASE + "phases: {lazy_tol: 0.05}\n", ["phases: (not set) -> {\"lazy_tol\": 0.05}"]),
    ("a new parameter without the stored setting",
     BASE.replace("resources:", "  momentum: {values: [0.5, 0.9]}\nresources:"),
     ["parameters.momentum", "leave out the stored file's setting 0.0", "run ids", "add 0.0"]),
    ("a new width list without the stored width", BASE.replace("resources:", "  width: {values: [8, 16]}\nresources:"),
     ["parameters.width", "setting 4"]),
    ("method random", BASE.replace("method: grid", "method: random\nnum_samples: 3").replace(
        "{values: [0.05, 0.5]}", "{values: [0.05, 0.5, 0.2]}"), ["method: only a grid sweep grows", "random"]),
]


@pytest.mark.parametrize("what,new,fragments", REFUSED, ids=[r[0] for r in REFUSED])
def test_other_changes_do_not_grow(what, new, fragments):
    old = BASE
    if what == "a parameter dropped":  # stored with width swept, the new file drops it
        old, new = new, BASE
        fragments = ["parameters.width: no longer swept"]
    g = grown(old, new)
    text = "\n".join(g.refused)
    assert g.refused, what
    for f in fragments:
        assert f in text, f"{what}: {f!r} not in {text}"


def test_key_differences_name_paths_old_and_new():
    a = {"train": {"steps": 20, "lr": 1}, "parameters": {"lr": {"values": [0.1]}}, "x": 1}
    b = {"train": {"steps": 30, "lr": 1.0}, "parameters": {"lr": {"values": [0.1, 0.2]}}, "y": "z"}
    assert key_differences(a, b) == ["train.steps: 20 -> 30", "train.lr: 1 -> 1.0",
                                     "parameters.lr.values: [0.1] -> [0.1, 0.2]", "x: 1 -> (not set)",
                                     "y: (not set) -> \"z\""]
    assert key_differences(a, json.loads(json.dumps(a))) == []


# ------------------------------------------------------------------------------ the check on a store
def _stored(tmp_path, text=BASE):
    store = open_store(tmp_path / "store", write=True)
    register_sweep(parse_sweep(text), text, store)
    return store


def test_a_refused_change_lists_the_differing_keys(tmp_path):
    store = _stored(tmp_path)
    changed = BASE.replace("steps: 20", "steps: 30").replace("[0.05, 0.5]", "[0.05]")
    with pytest.raises(RaydynError) as e:
        check_sweep_unchanged(parse_sweep(changed), changed, store, allow_growth=True)
    msg = str(e.value)
    first = msg.splitlines()[0]
    assert "sweep 'grow' already exists" in first and "different sweep file" in first and "new `name:`" in first
    assert "raydyn sweep delete grow" in first
    assert "keys that differ (stored -> this file):" in msg
    assert "train.steps: 20 -> 30" in msg and "parameters.lr.values: [0.05, 0.5] -> [0.05]" in msg
    assert "grows the stored grid" in msg and "parameters.lr: stored value(s) [0.5] left out" in msg
    assert store.sweep_meta("grow")["hash"] == sweep_hash(BASE)  # nothing written


def test_growth_is_stored_with_history_and_refused_where_growth_is_not_run(tmp_path):
    store = _stored(tmp_path)
    created = store.sweep_meta("grow")["created"]
    bigger = BASE.replace("[0.05, 0.5]", "[0.05, 0.5, 0.2]")
    # refine (and any caller without allow_growth) does not train a grown grid: it says to run it first
    with pytest.raises(RaydynError, match=r"grows the stored grid \(1 new runs\).*raydyn sweep run"):
        check_sweep_unchanged(parse_sweep(bigger), bigger, store)
    g = register_sweep(parse_sweep(bigger), bigger, store, allow_growth=True)
    assert g is not None and g.differences == ["parameters.lr.values: [0.05, 0.5] -> [0.05, 0.5, 0.2]"]
    meta = store.sweep_meta("grow")
    assert store.sweep_text("grow") == bigger and meta["hash"] == sweep_hash(bigger)
    assert meta["created"] == created and "extended" in meta
    assert [h["text"] for h in meta["history"]] == [BASE] and meta["history"][0]["hash"] == sweep_hash(BASE)
    assert meta["history"][0]["runs"] == 2
    # unchanged now; growing again appends to the history
    assert check_sweep_unchanged(parse_sweep(bigger), bigger, store) is None
    biggest = bigger.replace("resources:", "  seed: {values: [0, 1]}\nresources:")
    register_sweep(parse_sweep(biggest), biggest, store, allow_growth=True)
    assert [h["text"] for h in store.sweep_meta("grow")["history"]] == [BASE, bigger]
    # going back to the first file is a shrink: refused
    with pytest.raises(RaydynError, match=r"stored value\(s\) \[0.2\] left out"):
        check_sweep_unchanged(parse_sweep(BASE), BASE, store, allow_growth=True)


# ------------------------------------------------------------------------------ grown end to end (Ray)
@pytest.mark.ray
def test_sweep_run_trains_only_the_added_runs(ray_session, tmp_path):
    from raydyn.cli import app

    root = tmp_path / "store"
    f = tmp_path / "grow.yaml"
    f.write_text(BASE)
    cli = CliRunner()
    r = cli.invoke(app, ["sweep", "run", str(f), "--store", str(root)])
    assert r.exit_code == 0, (r.output, r.exception)
    store = open_store(root)
    before = {row["run_id"]: row["wall_time_s"] for row in store.runs(sweep="grow").to_pylist()}
    parts = {p: p.stat().st_mtime_ns for p in root.rglob("part-*.parquet")}
    assert len(before) == 2

    bigger = BASE.replace("[0.05, 0.5]", "[0.05, 0.5, 0.2]").replace("resources:", "  seed: {values: [0, 1]}\nresources:")
    f.write_text(bigger)
    r = cli.invoke(app, ["sweep", "run", str(f), "--store", str(root)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "grows the stored grid" in r.output and "trained 4 runs" in r.output and "kept 2" in r.output, r.output
    after = {row["run_id"]: row["wall_time_s"] for row in open_store(root).runs(sweep="grow").to_pylist()}
    assert len(after) == 6 and {k: after[k] for k in before} == before  # the stored runs were not retrained
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # their files untouched

    r = cli.invoke(app, ["sweep", "status", "grow", "--store", str(root)])
    assert r.exit_code == 0 and "6/6 runs in the store (6 completed); 0 missing" in r.output, r.output

    # a change that does not only grow is refused, naming the keys
    f.write_text(bigger.replace("steps: 20", "steps: 40"))
    r = cli.invoke(app, ["sweep", "run", str(f), "--store", str(root)])
    assert isinstance(r.exception, RaydynError) and "train.steps: 20 -> 40" in str(r.exception)

    r = cli.invoke(app, ["sweep", "list", "--store", str(root)])
    assert r.exit_code == 0 and "grow  sweep file (grid), grown: 2 files  6 runs (6 completed)" in r.output, r.output
    r = cli.invoke(app, ["sweep", "delete", "grow", "--store", str(root), "--yes"])
    assert r.exit_code == 0 and "deleted sweep 'grow': 6 runs" in r.output, r.output
    assert open_store(root).sweeps() == [] and not list(root.rglob("part-*.parquet"))


# ------------------------------------------------------------------------------ delete and list
@pytest.fixture(params=["path", "mock", "s3"])
def any_store(request, tmp_path, monkeypatch):
    if request.param == "path":
        return open_store(tmp_path / "store", write=True)
    if request.param == "s3":
        if not s3_helper.available():
            pytest.skip("moto[server] is not installed (test extra)")
        return open_store(s3_helper.bucket_uri(), write=True)
    mock = pa_private_fs._MockFileSystem()
    real = store_module._fs_from_uri
    monkeypatch.setattr(store_module, "_fs_from_uri",
                        lambda uri: (mock, uri[len("mock://"):]) if uri.startswith("mock://") else real(uri))
    return open_store("mock://bucket/results", write=True)


def _fill(store, sweep: str, ids: list[str], part: str = "p0") -> None:
    store.write_runs(sweep, part, runs=make_runs(ids), metrics=make_metrics(ids), weights=make_weights(ids),
                     extra={"koopman_spectra": make_metrics(ids)})


def test_delete_sweep_removes_every_table_and_the_record(any_store):
    store = any_store
    _fill(store, "a", ["r1", "r2"])
    _fill(store, "a", ["r3"], part="p1")
    _fill(store, "b", ["s1"])
    store.put_sweep("a", "name: a\n", {"kind": "tracked"})
    store.put_sweep("b", "name: b\n")
    deleted = store.delete_sweep("a")
    assert deleted == {"runs": 2, "metrics": 2, "weights": 2, "koopman_spectra": 2}
    assert store.sweeps() == ["b"] and store.sweep_meta("a") is None and store.sweep_text("a") is None
    for t in ("runs", "metrics", "weights", "koopman_spectra"):
        assert store.parts(t, "a") == [] and store.parts(t, "b") == ["p0"]
    assert store.runs().column("run_id").to_pylist() == ["s1"]
    with pytest.raises(StoreError, match=r"no sweep named 'a' in store .*; sweeps there: b"):
        store.delete_sweep("a")


def test_cli_delete_asks_and_names_unknown_sweeps(tmp_path):
    from raydyn.cli import app

    root = tmp_path / "store"
    store = open_store(root, write=True)
    _fill(store, "a", ["r1", "r2"])
    store.put_sweep("a", "name: a\n", {"created": "2024-01-02T03:04:05Z", "method": "grid", "hash": "h"})
    _fill(store, "t", ["x1"])
    store.put_sweep("t", "tracked\n", {"kind": "tracked", "method": "tracked", "created": "2024-02-01T00:00:00Z"})
    cli = CliRunner()
    r = cli.invoke(app, ["sweep", "delete", "a", "--store", str(root)], input="n\n")
    assert r.exit_code == 1 and "delete sweep 'a': 2 runs, data in koopman_spectra, metrics, runs, weights" in r.output
    assert "nothing deleted" in r.output and open_store(root).sweeps() == ["a", "t"]
    r = cli.invoke(app, ["sweep", "delete", "a", "--store", str(root)], input="")  # no answer: nothing deleted
    assert r.exit_code == 1 and open_store(root).sweeps() == ["a", "t"]
    r = cli.invoke(app, ["sweep", "delete", "nope", "--store", str(root)])
    assert isinstance(r.exception, RaydynError)
    assert "no sweep named 'nope'" in str(r.exception) and "sweeps there: a, t" in str(r.exception)

    r = cli.invoke(app, ["sweep", "list", "--store", str(root), "--json"])
    rows = json.loads(r.output)
    assert [(x["sweep"], x["kind"], x["runs"], x["created"]) for x in rows] == [
        ("a", "sweep file", 2, "2024-01-02T03:04:05Z"), ("t", "tracked", 1, "2024-02-01T00:00:00Z")]
    assert rows[0]["by_status"] == {"completed": 1, "diverged": 1}
    r = cli.invoke(app, ["sweep", "list", "--store", str(root)])
    lines = r.output.splitlines()
    assert lines[0].split() == ["a", "sweep", "file", "(grid)", "2", "runs", "(1", "completed,", "1", "diverged)",
                                "created", "2024-01-02T03:04:05Z"]
    assert lines[1].split()[:2] == ["t", "tracked"] and lines[2].startswith("store:")

    r = cli.invoke(app, ["sweep", "delete", "t", "--store", str(root)], input="y\n")  # tracked sweeps too
    assert r.exit_code == 0 and "deleted tracked sweep 't': 1 runs" in r.output
    assert [x["sweep"] for x in list_sweeps(open_store(root))] == ["a"]
    r = cli.invoke(app, ["sweep", "list", "--store", str(tmp_path / "empty")])
    assert r.exit_code == 0 and "no sweeps in store" in r.output


# ------------------------------------------------------------------------------ W&B sweep configs
TASK = """\
task: {dataset: digits, model: mlp, depth: 1, width: 4}
train: {steps: 20, record_every: 10}
"""


def parse(text: str):
    return parse_sweep(textwrap.dedent(text) + TASK, "wandb.yaml")


def refused(text: str) -> str:
    with pytest.raises(SpecError) as e:
        parse(text)
    return str(e.value)


# "Define a sweep configuration", basic structure (W&B's YAML), program: removed
BASIC = """\
name: sweepdemo
method: bayes
metric:
  goal: minimize
  name: final_test_loss
parameters:
  lr:
    min: 0.0001
    max: 0.1
  batch_size:
    values: [16, 32, 64]
  steps:
    values: [20, 30]
  optimizer:
    values: ["adam", "sgd"]
"""


def test_wandb_bayes_metric_and_inferred_distributions_map_to_raydyn():
    spec = parse(BASIC + "run_cap: 10\n")
    assert (spec.method, spec.metric, spec.goal, spec.num_samples) == ("optuna", "final_test_loss", "minimize", 10)
    p = spec.parameters
    assert (p["lr"].distribution, p["lr"].min, p["lr"].max) == ("uniform", 0.0001, 0.1)  # floats: uniform
    assert p["batch_size"].values == [16, 32, 64] and p["optimizer"].values == ["adam", "sgd"]
    spec = parse(BASIC.replace("min: 0.0001\n    max: 0.1", "min: 4\n    max: 16").replace("  lr:", "  width:")
                 + "num_samples: 3\n")
    assert (spec.parameters["width"].distribution, spec.num_samples) == ("int_uniform", 3)  # integers: int_uniform
    # bayes without a budget: W&B runs it until stopped, raydyn needs num_samples (or W&B's run_cap)
    msg = refused(BASIC)
    assert "method: 'bayes'" in msg and "'optuna'" in msg and "num_samples" in msg and "run_cap" in msg
    # W&B's metric names are what the training script logs; raydyn optimises a final_* runs column
    msg = refused(BASIC.replace("final_test_loss", "validation_loss") + "run_cap: 10\n")
    assert "metric: 'validation_loss' is not a final_* metric" in msg
    # goal maximize
    assert parse(BASIC.replace("minimize", "maximize") + "run_cap: 4\n").goal == "maximize"


def test_wandb_example_as_published_is_refused_with_what_to_do():
    msg = refused("program: train.py\n" + BASIC.replace("  lr:", "  learning_rate:") + "run_cap: 5\n")
    assert "program: raydyn runs no training script" in msg and "task:" in msg and "train:" in msg
    # once program: is gone, W&B's parameter names are checked against raydyn's
    msg = refused(BASIC.replace("  lr:", "  learning_rate:") + "run_cap: 5\n")
    assert "parameters.learning_rate: unknown parameter 'learning_rate'; sweepable:" in msg and " lr," in msg
    # W&B configs have no task/train sections: raydyn needs them
    with pytest.raises(SpecError, match=r"task: required key is missing"):
        parse_sweep(BASIC + "run_cap: 5\n", "wandb.yaml")


# "Sweep configuration examples" (random), with W&B's q_log_uniform_values batch size
RANDOM = """\
name: rnd
method: random
metric:
  goal: minimize
  name: loss
parameters:
  batch_size:
    distribution: q_log_uniform_values
    max: 256
    min: 32
    q: 8
  momentum:
    values: [0.3, 0.4, 0.5]
  steps:
    value: 20
  width:
    values: [128, 256, 512]
  lr:
    distribution: uniform
    max: 0.1
    min: 0
  optimizer:
    values: ["adam", "sgd"]
"""


def test_wandb_random_example():
    msg = refused(RANDOM + "run_cap: 4\n")
    assert "parameters.batch_size.distribution: 'q_log_uniform_values' (W&B's quantised log-uniform) is not " \
           "supported" in msg and "int_uniform" in msg
    assert "parameters.batch_size.q" not in msg  # the distribution is the one problem named
    no_q = RANDOM.replace("distribution: q_log_uniform_values", "distribution: int_uniform").replace("    q: 8\n", "")
    # lr from 0: raydyn's lr must be > 0, checked at the bound
    assert "parameters.lr.min: Input should be greater than 0 (got 0" in refused(no_q + "run_cap: 4\n")
    spec = parse(no_q.replace("min: 0\n", "min: 0.001\n") + "run_cap: 4\n")
    assert (spec.method, spec.num_samples, spec.metric) == ("random", 4, "loss")  # metric: unused by random
    assert spec.parameters["steps"].value == 20 and spec.parameters["batch_size"].distribution == "int_uniform"
    assert len(spec.expand()) == 4
    # run_cap counts runs; with several seeds a point is several runs, so raydyn asks for num_samples
    msg = refused(no_q.replace("  optimizer:", "  seed: {values: [0, 1]}\n  optimizer:") + "run_cap: 4\n")
    assert "run_cap: each drawn point is trained once per seed (2 seeds)" in msg


# "Bayes hyperband example" (names as in W&B's docs but raydyn's where raydyn has the setting)
HYPERBAND = """\
program: train.py
name: hb
method: bayes
metric:
  goal: minimize
  name: val_loss
parameters:
  width:
    values: [96, 128, 148]
  lr:
    values: [0.001, 0.01, 0.003]
  weight_decay:
    values: [1e-5, 1e-6, 1e-7]
  momentum:
    values: [0.8, 0.9, 0.95]
  steps:
    value: 27
early_terminate:
  type: hyperband
  s: 2
  eta: 3
  max_iter: 27
"""


def test_wandb_hyperband_is_refused_naming_each_key():
    msg = refused(HYPERBAND)
    lines = msg.splitlines()
    assert lines[0] == "wandb.yaml: invalid sweep file"
    assert lines[1].startswith("  program: raydyn runs no training script")
    assert lines[2].startswith("  early_terminate: W&B's Hyperband counts iterations") and "train.early_stop" in lines[2]
    assert "method: 'bayes'" in msg and "num_samples" in msg  # no budget given either
    msg = refused(HYPERBAND.replace("program: train.py\n", "").replace("  max_iter: 27\n", "").replace(
        "  s: 2\n  eta: 3\n", "  min_iter: 3\n") + "num_samples: 4\n")
    assert msg.count("\n  ") == 1 and "early_terminate" in msg
    spec = parse(HYPERBAND.replace("program: train.py\n", "").split("early_terminate")[0].replace(
        "val_loss", "final_test_loss") + "num_samples: 4\n")
    assert spec.method == "optuna" and spec.parameters["weight_decay"].values == ["1e-5", "1e-6", "1e-7"]  # YAML 1.1
    assert {r["weight_decay"] for r in [spec.run_config({"weight_decay": "1e-5"})]} == {1e-5}  # coerced


def test_wandb_nested_parameters_command_and_project_are_refused():
    nested = """\
    name: nested_sweep
    method: random
    num_samples: 2
    parameters:
      lr: {distribution: uniform, min: 0.01, max: 0.1}
      nested_category_1:
        parameters:
          momentum: {distribution: uniform, min: 0.0, max: 0.9}
    """
    assert "parameters.nested_category_1.parameters: nested parameters are W&B's" in refused(nested)
    macro = """\
    name: macro
    method: random
    project: demo
    entity: me
    metric:
      name: validation_loss
      target: 0.1
    num_samples: 2
    parameters:
      lr: {min: 0.0001, max: 0.1}
    command:
      - ${env}
      - ${interpreter}
      - ${program}
    """
    msg = refused(macro)
    for f in ("project: W&B's project", "entity: W&B's entity", "metric.target: raydyn does not stop a sweep",
              "command: raydyn runs no training script"):
        assert f in msg, f
    grid = """\
    name: g
    method: grid
    metric: {name: score, goal: minimize}
    run_cap: 3
    parameters:
      lr: {value: 0.01}
    """
    assert "run_cap: a grid sweep trains every combination" in refused(grid)
    assert parse(grid.replace("    run_cap: 3\n", "")).parameters["lr"].value == 0.01


DISTRIBUTIONS = [
    # (W&B parameter entry, raydyn's ParamSpec fields, or the fragment of the refusal)
    ("{distribution: constant, value: 0.1}", {"value": 0.1}),
    ("{distribution: categorical, values: [0.1, 0.2]}", {"values": [0.1, 0.2]}),
    ("{distribution: uniform, min: 0.01, max: 0.1}", {"distribution": "uniform", "min": 0.01, "max": 0.1}),
    ("{distribution: log_uniform_values, min: 0.001, max: 0.1}", {"distribution": "log_uniform", "min": 0.001, "max": 0.1}),
    ("{min: 0.01, max: 0.1}", {"distribution": "uniform", "min": 0.01, "max": 0.1}),
    ("{distribution: q_uniform, min: 0.01, max: 0.1, q: 0.01}", "'q_uniform' (W&B's quantised uniform"),
    ("{distribution: q_log_uniform_values, min: 0.001, max: 0.1}", "'q_log_uniform_values'"),
    ("{distribution: normal, mu: 0.1, sigma: 0.01}", "'normal' (W&B's normal distribution) is not supported"),
    ("{distribution: log_normal, mu: -3, sigma: 1}", "'log_normal'"),
    ("{distribution: inv_log_uniform_values, min: 0.001, max: 0.1}", "'inv_log_uniform_values'"),
    ("{distribution: beta, a: 2, b: 5}", "'beta'"),
    ("{distribution: log_uniform, min: -9.2, max: -2.3}", "W&B's log_uniform takes their natural logs"),
    ("{values: [0.1, 0.2], probabilities: [0.5, 0.5]}", "parameters.lr.probabilities: raydyn draws"),
    ("{distribution: uniform, min: 0.01, max: 0.1, q: 0.01}", "parameters.lr.q: W&B's quantisation step"),
    ("{distribution: constant}", "distribution 'constant' needs 'value'"),
]


@pytest.mark.parametrize("entry,expected", DISTRIBUTIONS, ids=[d[0] for d in DISTRIBUTIONS])
def test_wandb_distributions(entry, expected):
    text = f"name: d\nmethod: random\nnum_samples: 2\nparameters:\n  lr: {entry}\n"
    if isinstance(expected, dict):
        p = parse(text).parameters["lr"]
        assert p.model_dump(exclude_none=True) == expected
    else:
        msg = refused(text)
        assert expected in msg, msg
        assert "parameters.lr" in msg
