"""Shared fixtures. One Ray instance serves the whole test session (2 CPUs, no dashboard)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# dummy credentials for the local S3 server of tests/s3_helper.py; set before Ray starts so its workers
# inherit them (no test reaches a real object store)
for _k, _v in (("AWS_ACCESS_KEY_ID", "raydyn-test"), ("AWS_SECRET_ACCESS_KEY", "raydyn-test"),
               ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_EC2_METADATA_DISABLED", "true")):
    os.environ.setdefault(_k, _v)


@pytest.fixture
def run_main(monkeypatch, capsys):
    """Call the CLI entry point (``raydyn.cli.main``) in-process; returns (exit code, stdout, stderr). The
    signal handlers main() installs are put back afterwards."""
    import signal
    import sys

    from raydyn import cli

    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["raydyn", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        out, err = capsys.readouterr()
        return e.value.code, out, err

    yield run
    signal.signal(signal.SIGTERM, old[0])
    signal.signal(signal.SIGINT, old[1])


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
        started = True
    yield ray
    if started:
        ray.shutdown()
