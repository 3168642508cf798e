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
