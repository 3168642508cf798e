"""A sweep end to end on an ``s3://`` store: a local S3 protocol server (moto), Ray Tune storing its
trial checkpoints in the bucket, resume, query, phase map, an analysis on Ray workers, store check.

Issue 8, storage URIs: object stores go through pyarrow's file systems on the one code path of the
store; every Ray worker opens the store from its URI.
"""
from __future__ import annotations

import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

from tests import s3_helper

pytestmark = [pytest.mark.ray, pytest.mark.skipif(not s3_helper.available(),
                                                  reason="moto[server] is not installed (test extra)")]

SWEEP = """
name: s3sweep
task: {dataset: digits, model: mlp, depth: 1, width: 8}
train: {steps: 30, batch_size: 64, record_every: 10, record: [weights], checkpoint_every: 10}
method: grid
parameters:
  lr: {values: [0.05, 0.5]}
  width: {values: [4, 8]}
resources: {cpu: 1}
"""


def test_sweep_query_analysis_and_check_on_s3(ray_session, tmp_path):
    from raydyn.cli import app
    from raydyn.store import open_store

    uri = s3_helper.bucket_uri("results")
    sweep = tmp_path / "s3sweep.yaml"
    sweep.write_text(SWEEP)
    cli = CliRunner()
    r = cli.invoke(app, ["sweep", "run", str(sweep), "--store", uri])
    assert r.exit_code == 0, (r.output, r.exception)
    store = open_store(uri)
    runs = store.table("runs", sweep="s3sweep")
    assert runs.num_rows == 4 and set(runs.column("status").to_pylist()) == {"completed"}
    assert store.table("weights", sweep="s3sweep").num_rows == 4 * 4  # steps 0, 10, 20, 30
    # Tune's own files are in the bucket too: each trial reported checkpoints there (steps 10 and 20),
    # which were deleted once its population was in the store (no second copy of its records)
    fs, root = pafs.FileSystem.from_uri(uri)
    tune = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{root}/_tune", recursive=True))]
    results = [p for p in tune if p.endswith("/result.json")]
    assert len(results) == 2  # one trial per width (population)
    for p in results:
        with fs.open_input_stream(p) as f:
            text = f.read().decode()
        assert '"checkpoint_step": 10' in text and '"checkpoint_step": 20' in text, text[:500]
    assert not any("/checkpoint_" in p for p in tune)

    r = cli.invoke(app, ["sweep", "run", str(sweep), "--store", uri])  # resume: nothing left to train
    assert r.exit_code == 0 and "all 4 runs already in the store; nothing to train" in r.output, r.output
    assert open_store(uri).table("runs", sweep="s3sweep").num_rows == 4

    r = cli.invoke(app, ["query", "SELECT count(*) AS n, max(step) AS last FROM metrics", "--store", uri,
                         "--format", "csv"])
    assert r.exit_code == 0 and r.output.splitlines()[1] == "16,30", r.output  # 4 runs x 4 records
    r = cli.invoke(app, ["phase-map", "s3sweep", "--metric", "final_test_loss", "--x", "lr", "--y", "width",
                         "--store", uri, "--out", str(tmp_path / "m.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "m.png").stat().st_size > 1000
    r = cli.invoke(app, ["analyze", "koopman", "s3sweep", "--delays", "1", "--store", uri])  # Ray workers read S3
    assert r.exit_code == 0, (r.output, r.exception)
    assert open_store(uri).table("koopman_summary", sweep="s3sweep").num_rows == 4
    r = cli.invoke(app, ["store", "check", "--store", uri])
    assert r.exit_code == 0, r.output
