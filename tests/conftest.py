"""Shared fixtures. One Ray instance serves the whole test session (2 CPUs, no dashboard)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()
