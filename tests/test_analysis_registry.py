"""An analysis written outside raydyn registers in one place and is then a first-class analysis.

The toy analysis below lives in this test file, not in the package: one options dataclass, one Job subclass
and one :func:`raydyn.jobs.register` call. With no edit to any raydyn file it must appear as
``raydyn analyze toy`` (options from the dataclass's fields), run on Ray, write its table (with its recorded
options) and draw its section in ``raydyn report``; installed packages get the same through the
``raydyn.analyses`` entry-point group.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa
import pytest
from typer.testing import CliRunner

import raydyn
from raydyn.errors import RaydynError
from raydyn.jobs import Analysis, Job, Options, option, register
from raydyn.jobs.base import group_units, run_filter
from raydyn.store import open_store

LR = (0.05, 0.1, 0.2)


@dataclass(frozen=True)
class ToyOptions(Options):
    scale: float = option(1.0, "Multiply each run's last loss by this.")
    metric: str = option("train_loss", "Metrics column to read.", choices=("train_loss", "test_loss"))
    columns: Optional[list[str]] = option(None, "Runs columns copied into the table (comma-separated).")
    label: str = option("toy", "Not recorded: where nothing of the result depends on it.", record=False)

    def check(self) -> None:
        if not self.scale > 0:
            raise RaydynError(f"{self.flag('scale')} must be positive, got {self.scale}")


class ToyJob(Job):
    """A toy analysis: each run's last loss, scaled, as a phase-map metric.

    Registered from a test file to show that analyses need no edit to raydyn.
    """

    name = "toy"
    Options = ToyOptions

    def plan(self, store, sweep: str):
        return group_units(store.table("runs", sweep=sweep), None)

    def compute(self, store, sweep: str, unit):
        (rid,) = unit.run_ids
        m = store.table("metrics", sweep=sweep, columns=["run_id", "step", self.options.metric],
                        filter=run_filter([rid])).to_pydict()
        last = m[self.options.metric][max(range(len(m["step"])), key=m["step"].__getitem__)]
        row = {"run_id": rid, "toy_last": self.options.scale * last, "toy_pid": os.getpid()}
        for c in self.options.columns or ():
            row[f"toy_{c}"] = store.table("runs", sweep=sweep, columns=[c], filter=run_filter([rid])).column(0)[0].as_py()
        return {"toy_summary": pa.Table.from_pylist([row])}


def toy_section(store, sweep: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from raydyn.plots.labels import fig_png

    t = store.table("toy_summary", sweep=sweep).to_pydict()
    fig, ax = plt.subplots()
    ax.bar(range(len(t["toy_last"])), t["toy_last"])
    return [(f"toy: last loss of {len(t['run_id'])} runs", fig_png(fig))]


def toy_after(store, sweep: str, options: ToyOptions):
    n = store.table("toy_summary", sweep=sweep).num_rows
    return [f"toy wrote {n} rows at scale {options.scale:g}"]


TOY = register(Analysis(ToyJob, report=toy_section, after=toy_after))


@pytest.fixture(scope="module")
def store_root(tmp_path_factory):
    """A tracked sweep of three runs with known losses (no training needed)."""
    root = tmp_path_factory.mktemp("toystore")
    for lr in LR:
        with raydyn.track(root, sweep="toys", config={"lr": lr}) as run:
            for step in range(5):
                run.log(step, train_loss=lr * 10 + step, test_loss=1.0 / (step + 1))
    return root


def test_the_toy_command_is_generated_from_its_options(ray_session):
    from raydyn.cli import app

    r = CliRunner().invoke(app, ["analyze", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "toy" in r.output and "A toy analysis: each run's last loss, scaled" in r.output
    r = CliRunner().invoke(app, ["analyze", "toy", "--help"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for flag, text in (("--scale", "Multiply each run's last loss by this."), ("--metric", "Metrics column to read."),
                       ("--columns", "Runs columns copied"), ("--label", "Not recorded"), ("--store", "Store URI"),
                       ("--address", "Ray cluster address")):
        assert flag in r.output and text in r.output
    assert "Registered from a test file" in r.output  # the docstring's body is the command's description


def test_toy_runs_on_ray_writes_its_table_and_report_section(ray_session, store_root, tmp_path):
    from raydyn.cli import app

    r = CliRunner().invoke(app, ["analyze", "toy", "toys", "--store", str(store_root), "--scale", "2",
                                 "--columns", "lr", "--label", "ignored"], terminal_width=200)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "wrote toy_summary: 3 rows (sweep=toys)" in r.output
    assert "toy wrote 3 rows at scale 2" in r.output  # the after hook
    st = open_store(str(store_root))
    t = st.table("toy_summary", sweep="toys").to_pylist()
    got = {row["toy_lr"]: row["toy_last"] for row in t}
    assert got == {lr: pytest.approx(2 * (lr * 10 + 4), rel=1e-12) for lr in LR}
    assert all(row["toy_pid"] != os.getpid() for row in t)  # computed on Ray workers, not in this process
    assert {json.dumps(json.loads(row["options_json"]), sort_keys=True) for row in t} == {
        json.dumps({"scale": 2.0, "metric": "train_loss", "columns": ["lr"]}, sort_keys=True)}  # label not recorded

    # its column is a phase-map metric like any analysis' summary column, and the report draws its section
    from raydyn.report import build_report

    page = build_report(st, "toys", tmp_path / "r.html").read_text()
    assert "<h2>toy</h2>" in page and "toy: last loss of 3 runs" in page and "could not draw" not in page


def test_bad_toy_options_are_named(ray_session, store_root):
    from raydyn.cli import app

    r = CliRunner().invoke(app, ["analyze", "toy", "toys", "--store", str(store_root), "--scale", "-1"])
    assert isinstance(r.exception, RaydynError) and "--scale must be positive, got -1.0" in str(r.exception)
    r = CliRunner().invoke(app, ["analyze", "toy", "toys", "--store", str(store_root), "--metric", "acc"])
    assert "--metric 'acc': allowed values are train_loss, test_loss" in str(r.exception)
    # the same checks from Python
    with pytest.raises(RaydynError, match="--scale must be positive"):
        ToyJob(scale=0)
    assert ToyJob(scale=3).options.record() == {"scale": 3, "metric": "train_loss", "columns": None}


def test_registration_refuses_what_it_cannot_use():
    class Nameless(Job):
        Options = ToyOptions

    with pytest.raises(RaydynError, match="name must be a word"):
        register(Analysis(Nameless))

    class Plain(Job):
        name = "plain"
        Options = dict

    with pytest.raises(RaydynError, match="Options must be a dataclass"):
        register(Analysis(Plain))

    class Other(Job):
        name = "koopman"
        Options = ToyOptions

    with pytest.raises(RaydynError, match="an analysis named 'koopman' is already registered"):
        register(Analysis(Other))


ENTRY_MODULE = '''
from dataclasses import dataclass

import pyarrow as pa

from raydyn.jobs import Analysis, Job, Options, option
from raydyn.jobs.base import group_units


@dataclass(frozen=True)
class CountOptions(Options):
    times: int = option(1, "How many rows per run.")


class CountJob(Job):
    """Count the runs of a sweep (an analysis an installed package provides)."""

    name = "count_runs"
    Options = CountOptions

    def plan(self, store, sweep):
        return group_units(store.table("runs", sweep=sweep), None)

    def compute(self, store, sweep, unit):
        return {"count_runs_rows": pa.table({"run_id": list(unit.run_ids) * self.options.times})}


ANALYSIS = Analysis(CountJob)
'''


def test_an_installed_package_registers_through_the_entry_point_group(store_root, tmp_path):
    """A distribution on the path with a ``raydyn.analyses`` entry point: `raydyn analyze count_runs` exists in a
    fresh process (its own embedded Ray) without the user importing anything."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "count_analysis.py").write_text(ENTRY_MODULE)
    dist = site / "count_analysis-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: count-analysis\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[raydyn.analyses]\ncount_runs = count_analysis:ANALYSIS\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}
    exe = [sys.executable, "-c", "from raydyn.cli import main; main()"]
    r = subprocess.run([*exe, "analyze", "--help"], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "count_runs" in r.stdout and "Count the runs of a sweep" in r.stdout
    r = subprocess.run([*exe, "analyze", "count_runs", "toys", "--store", str(store_root), "--times", "2"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "wrote count_runs_rows: 6 rows (sweep=toys)" in r.stdout
    rows = open_store(str(store_root)).table("count_runs_rows", sweep="toys")
    assert rows.num_rows == 2 * len(LR) and len(set(rows.column("run_id").to_pylist())) == len(LR)
    # a broken entry point is a warning naming it, and the other analyses still work
    (dist / "entry_points.txt").write_text("[raydyn.analyses]\ncount_runs = count_analysis:MISSING\n")
    r = subprocess.run([*exe, "analyze", "--help"], env=env, capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "koopman" in r.stdout and "count_runs" not in r.stdout
    assert "analysis 'count_runs' registered by an installed package (count_analysis:MISSING) could not be loaded" \
        in r.stderr


def test_listing_the_analyses_imports_no_torch():
    """`raydyn analyze --help` builds every command from the registry: the job modules load, torch does not
    (it is imported where a job rebuilds a model, on a worker)."""
    code = ("import json, sys; from raydyn.jobs.registry import analyses; "
            "print(json.dumps([list(analyses()), 'torch' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    names, torch_loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert names == ["hmm", "koopman", "phase", "cmd", "symmetry", "neurons"] and not torch_loaded
