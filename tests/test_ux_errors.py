"""Bad input is one clear message, exit code 2, nothing written (issue 16, items 3 and 8-13).

No Ray: the store is built with ``raydyn.track``. Commands run in-process, through ``CliRunner``
(the RaydynError is ``result.exception``) or through ``raydyn.cli.main`` (exit code 2, ``error:``).
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import pyarrow as pa
import pytest
import typer
import yaml
from rich.text import Text
from typer.testing import CliRunner

import raydyn
from raydyn.cli import app
from raydyn.errors import RaydynError, SpecError
from raydyn.spec import EXECUTION_ONLY, parse_sweep, sweep_hash

GOOD = """\
name: bad-input
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 64, n_test: 32, d_in: 4}}
train: {steps: 5, batch_size: 16, optimizer: sgd, lr: 0.05, record_every: 5}
method: grid
parameters:
  lr: {values: [0.01, 0.1]}
"""

LRS = (1.0, 2.0, 3.0, 4.0)  # a linear axis: crossings are interpolated linearly in lr


def loss(lr: float, width: int, seed: int) -> float:
    """width 4: rises as 10 lr, width 8: falls as 50 - 10 lr; seeds at -2, 0, +2 (median: the seed-1 value)."""
    base = 10 * lr if width == 4 else 50 - 10 * lr
    return base + 2 * (seed - 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A tracked sweep 's': lr x width x 3 seeds, depth always 2 (not swept)."""
    path = tmp_path_factory.mktemp("ux") / "store"
    for lr in LRS:
        for width in (4, 8):
            for seed in (0, 1, 2):
                with raydyn.track(path, sweep="s", config={"lr": lr, "width": width, "depth": 2, "seed": seed}) as run:
                    run.log(0, train_loss=100.0)
                    run.log(10, train_loss=loss(lr, width, seed))
    return path


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def raydyn_error(r, *fragments: str) -> str:
    """The RaydynError of a CliRunner result; every fragment is in its message."""
    assert isinstance(r.exception, RaydynError), (r.exception, r.output)
    msg = str(r.exception)
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return msg


def one_clear_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("error:"), err
    flat = " ".join(err.split())  # the console may wrap long messages
    for f in fragments:
        assert f in flat, f"{f!r} not in:\n{err}"


def no_outputs(store: Path) -> None:
    assert not (store / "plots").exists() and not (store / "reports").exists()


# ------------------------------------------------------------- 3. phase-boundary on a numeric metric
def test_phase_boundary_refuses_a_numeric_metric_without_level(store, run_main):
    code, out, err = run_main("phase-boundary", "s", "--metric", "final_train_loss", "--store", str(store))
    one_clear_error(code, err, "'final_train_loss' is a numeric column", "label column such as phase", "--level X")
    assert out == ""


def test_phase_boundary_level_finds_a_known_crossing(store):
    r = invoke("phase-boundary", "s", "--metric", "final_train_loss", "--level", "25", "--format", "json",
               "--store", str(store))
    assert r.exit_code == 0, r.output
    import json

    res = {g["group"]["width"]: g for g in json.loads(r.output)}
    assert sorted(res) == [4, 8]  # grouped by the other swept axis, seeds aggregated
    (up,), (down,) = res[4]["crossings"], res[8]["crossings"]
    assert up["direction"] == "rises" and down["direction"] == "falls"
    # medians 20 at lr 2 and 30 at lr 3 (width 4), 30 and 20 (width 8): 25 is crossed at lr 2.5
    assert up["location"] == pytest.approx(2.5) and down["location"] == pytest.approx(2.5)
    assert (up["lower"], up["upper"], up["lower_median"], up["upper_median"]) == (2.0, 3.0, 20.0, 30.0)
    assert res[4]["points"] == 4 and res[4]["runs"] == 12
    # a level between the medians at lr 1 and 2: interpolated at a quarter of the way
    r = invoke("phase-boundary", "s", "--metric", "final_train_loss", "--level", "12.5", "-f", "csv",
               "--store", str(store))
    rows = r.output.strip().splitlines()
    assert rows[0].startswith("width,level,direction,location") and len(rows) == 3, r.output
    assert float(rows[1].split(",")[3]) == pytest.approx(1.25)
    assert float(rows[2].split(",")[3]) == pytest.approx(3.75)
    r = invoke("phase-boundary", "s", "--metric", "final_train_loss", "--level", "1000", "--store", str(store))
    assert r.exit_code == 0 and "(none)" in r.output


def test_level_crossings_interpolate_in_log_space_on_a_log_axis():
    from raydyn.aggregate.levels import level_crossings

    runs = pa.table({"lr": [0.01, 0.1, 1.0], "m": [0.0, 1.0, 2.0], "status": ["completed"] * 3})
    (g,) = level_crossings(runs, "m", "lr", 0.5)
    assert g.crossings[0].log and g.crossings[0].location == pytest.approx(0.01 ** 0.5 * 0.1 ** 0.5)
    (g,) = level_crossings(runs, "m", "lr", 0.5, log=False)
    assert g.crossings[0].location == pytest.approx(0.055)
    # a median exactly at the level between values on opposite sides is the crossing; diverged runs are left out
    runs = pa.table({"lr": [1.0, 2.0, 3.0, 3.0], "m": [0.0, 1.0, 2.0, -50.0],
                     "status": ["completed", "completed", "completed", "diverged"]})
    (g,) = level_crossings(runs, "m", "lr", 1.0)
    assert [(c.location, c.direction) for c in g.crossings] == [(2.0, "rises")]


def test_phase_boundary_level_needs_a_numeric_metric(store):
    r = invoke("phase-boundary", "s", "--metric", "status", "--level", "1", "--store", str(store))
    raydyn_error(r, "--level needs a numeric --metric", "'status'")


# ------------------------------------------------------------- 8. duplicate keys in a sweep file
def test_duplicate_top_level_key_is_refused_with_its_lines(tmp_path, run_main):
    f = tmp_path / "dup.yaml"
    f.write_text(GOOD + "train:\n  steps: 7\n")
    code, _, err = run_main("sweep", "run", str(f), "--store", str(tmp_path / "store"))
    one_clear_error(code, err, str(f), "duplicate key 'train'", "lines 3 and 7")
    assert not (tmp_path / "store").exists()  # nothing written


def test_duplicate_key_at_any_depth_is_refused():
    nested = GOOD.replace("lr: {values: [0.01, 0.1]}", "lr:\n    values: [0.01]\n    values: [0.1]")
    with pytest.raises(SpecError, match=r"^f\.yaml: duplicate key 'values' on lines 7 and 8"):
        parse_sweep(nested, "f.yaml")
    flow = GOOD.replace("lr: 0.05,", "lr: 0.05, lr: 0.5,")
    with pytest.raises(SpecError, match="duplicate key 'lr' twice on line 3"):
        parse_sweep(flow, "f.yaml")


def test_sweep_files_without_duplicates_still_parse_and_hash():
    assert parse_sweep(GOOD).name == "bad-input"
    assert sweep_hash(GOOD) == sweep_hash(GOOD.replace(", optimizer: sgd", ",   optimizer: sgd") + "# note\n")
    from raydyn.spec import _UniqueKeyLoader

    # keys merged in from an anchor may still be overridden: that is not a duplicate
    data = yaml.load("a: &x {k: 1, j: 2}\nb:\n  <<: *x\n  k: 3\n", Loader=_UniqueKeyLoader)
    assert data == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}}
    for path in sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml")):
        yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # no shipped file has a duplicate key


# ------------------------------------------------------------- 9. query
def test_query_on_a_missing_store_says_so(tmp_path, run_main):
    missing = tmp_path / "no-store"
    code, out, err = run_main("query", "SELECT run_id FROM runs", "--store", str(missing))
    one_clear_error(code, err, f"no store at {missing}")
    assert out == "" and not missing.exists()


def test_query_unknown_table_lists_the_stores_tables(store):
    msg = raydyn_error(invoke("query", "SELECT * FROM runz", "--store", str(store)), "no table named 'runz'",
                       "tables in this store: metrics, runs, weights")
    assert "duckdb_" not in msg and "sqlite" not in msg and "pg_" not in msg


def test_query_refuses_negative_max_rows(store, run_main):
    code, out, err = run_main("query", "SELECT lr FROM runs", "--max-rows", "-1", "--store", str(store))
    one_clear_error(code, err, "--max-rows -1: must be 0 or more")
    assert out == ""
    r = invoke("query", "SELECT lr FROM runs ORDER BY lr", "--max-rows", "0", "--store", str(store))
    assert r.exit_code == 0 and "24 more rows" in r.output


# ------------------------------------------------------------- 10. phase-map and report columns
def test_phase_map_non_numeric_metric(store):
    msg = raydyn_error(invoke("phase-map", "s", "--metric", "run_id", "--store", str(store)),
                       "--metric 'run_id'", "not a metric", "usable metrics:", "final_train_loss")
    assert "StopIteration" not in msg
    raydyn_error(invoke("phase-map", "s", "--metric", "config_json", "--store", str(store)), "'config_json'")
    no_outputs(store)


def test_phase_map_axis_that_was_not_swept(store, run_main):
    code, _, err = run_main("phase-map", "s", "--metric", "final_train_loss", "--x", "depth", "--store", str(store))
    one_clear_error(code, err, "--x 'depth' was not swept", "every run has depth = 2", "swept axes: lr, width")
    raydyn_error(invoke("phase-map", "s", "--metric", "final_train_loss", "--y", "nope", "--store", str(store)),
                 "--y 'nope' is not a column of the runs table", "swept axes: lr, width")
    no_outputs(store)


def test_report_unknown_metric(store):
    raydyn_error(invoke("report", "s", "--metric", "nonexistent", "--store", str(store)),
                 "--metric 'nonexistent' is not a column", "usable metrics:", "final_train_loss")
    raydyn_error(invoke("report", "s", "--metric", "final_train_loss", "--x", "depth", "--store", str(store)),
                 "--x 'depth' was not swept")
    no_outputs(store)


def test_phase_map_still_draws_a_valid_map(store, tmp_path):
    out = tmp_path / "map.png"
    r = invoke("phase-map", "s", "--metric", "final_train_loss", "--out", str(out), "--store", str(store))
    assert r.exit_code == 0, r.output
    assert out.is_file()


def test_a_one_axis_sweep_may_map_a_strip(tmp_path):
    """With a single swept axis there is no second one: a one-value column (seed) as y is a strip, not a mistake."""
    path = tmp_path / "store"
    for lr in LRS:
        with raydyn.track(path, sweep="line", config={"lr": lr, "seed": 0}) as run:
            run.log(0, train_loss=lr)
    r = invoke("phase-map", "line", "--metric", "final_train_loss", "--x", "lr", "--y", "seed",
               "--out", str(tmp_path / "strip.png"), "--store", str(path))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "strip.png").is_file()


# ------------------------------------------------------------- 11. the sweepable list
def test_unknown_parameter_offers_only_sweepable_parameters():
    with pytest.raises(SpecError) as e:
        parse_sweep(GOOD.replace("lr: {values: [0.01, 0.1]}", "bogus: {values: [1, 2]}"))
    listed = str(e.value).split("sweepable: ", 1)[1].split(";")[0].split(", ")
    assert "lr" in listed and "data.n_train" in listed
    assert not set(listed) & set(EXECUTION_ONLY)
    # every offered name can be swept: all of them at once, each at its current value, is a valid file
    spec = parse_sweep(GOOD)
    current = {**spec.task.model_dump(), **spec.train.model_dump(),
               **{f"data.{k}": v for k, v in spec.task.data_options().items()}}
    doc = yaml.safe_load(GOOD)
    doc["parameters"] = {name: {"values": [current[name]]} for name in listed}
    parse_sweep(yaml.safe_dump(doc))


# ------------------------------------------------------------- 13. help texts
def _commands():
    def walk(c, path):
        yield path, c
        for name, sub in sorted(getattr(c, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def _paragraphs(text: str | None) -> list[str]:
    return [p for p in inspect.cleandoc(text or "").partition("\f")[0].split("\n\n") if p.strip()]


def _flat(s: str) -> str:
    return " ".join(s.split())


def test_every_help_renders_its_text_whole(monkeypatch):
    """Every --help exits 0; every [bracketed] token of a docstring or option help is printed (none swallowed
    as Rich markup); every docstring paragraph and option help is printed on ONE line when the terminal is
    wide enough (a line break in a docstring paragraph would print the sentence broken across lines)."""
    import typer.rich_utils as ru

    monkeypatch.setattr(ru, "MAX_WIDTH", 2000)  # nothing wraps: every line break printed comes from the text
    monkeypatch.setattr(ru, "FORCE_TERMINAL", False)
    commands = _commands()
    assert len(commands) >= 20
    whole = brackets = 0
    for path, cmd in commands:
        r = CliRunner().invoke(app, [*path, "--help"])
        where = f"raydyn {' '.join(path)} --help"
        assert r.exit_code == 0, (where, r.output)
        lines = [_flat(re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in r.output.splitlines()]
        text = " ".join(lines)
        assert "\\[" not in text, (where, "an escape is printed")
        sources = _paragraphs(cmd.help) + [p.help for p in cmd.params if getattr(p, "help", None)]
        # a group lists each subcommand with the first paragraph of its help
        sources += [_paragraphs(sub.help)[0] for sub in getattr(cmd, "commands", {}).values() if sub.help]
        for src in sources:
            for token in re.findall(r"\\?\[([^\[\]\n]*)\]", src):
                assert f"[{token}]" in text, (where, f"[{token}] swallowed")
                brackets += 1
            shown = _flat(Text.from_markup(_flat(src)).plain)
            assert any(shown in line for line in lines), (where, "printed broken across lines:", src)
            whole += 1
    assert whole > 150 and brackets >= 1  # the checks ran on every text


def test_symmetry_help_shows_the_record_setting():
    r = CliRunner().invoke(app, ["analyze", "symmetry", "--help"])
    assert r.exit_code == 0 and "train.record: [symmetry]" in _flat(r.output)
