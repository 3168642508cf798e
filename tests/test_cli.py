"""The CLI: every command has --help; user mistakes end in one clear message and exit code 2, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from raydyn.cli import app

COMMANDS = [["sweep", "run"], ["sweep", "status"], ["sweep", "refine"], ["query"], ["phase-map"], ["phase-boundary"],
            ["report"], ["store", "check"], ["analyze", "phase"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[" ".join(c) for c in COMMANDS])
def test_every_command_has_help_and_a_store_option(cmd):
    r = CliRunner().invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "--store" in r.output


ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    # PYTHONPATH: the raydyn of this tree, also when cwd is elsewhere (an installed copy may differ)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "raydyn.cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=env)


@pytest.mark.parametrize("args,fragment", [
    (["sweep", "run", "no-such-file.yaml"], "no-such-file.yaml: no such sweep file"),
    (["phase-map", "nosweep"], "no sweep named 'nosweep'"),
    (["phase-boundary", "nosweep"], "no sweep named 'nosweep'"),
    (["phase-boundary", "nosweep", "--format", "xml"], "--format 'xml': allowed values are table, csv, json"),
    (["sweep", "refine", "nosweep", "--budget", "4"], "no sweep named 'nosweep'"),
    (["query", "SELECT * FROM runs", "--format", "xml"], "--format 'xml': allowed values are table, csv, json"),
    (["query", "SELEC 1"], "syntax"),
])
def test_user_errors_are_one_message(tmp_path, args, fragment):
    r = run(*args, "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bad_sweep_file_names_the_key_path(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ntask: {dataset: digits}\ntrain: {steps: 10, optimizer: lion}\n")
    r = run("sweep", "run", str(f), "--store", str(tmp_path / "s"))
    assert r.returncode == 2 and "train.optimizer" in r.stderr and "lion" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s").exists()  # nothing was written for an invalid file


def test_usage_error_is_not_a_traceback(tmp_path):
    r = run("sweep", "run", "x.yaml", "--stroe", "y")
    assert r.returncode == 2 and "No such option" in r.stderr and "Traceback" not in r.stderr
