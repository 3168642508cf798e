"""Build hook for the one optional C extension (batched assignment for Wasserstein distances).

Everything else is configured in pyproject.toml. The extension is optional: when it cannot be
compiled, raydyn installs anyway and falls back to scipy's linear_sum_assignment (slower).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("raydyn._ext._assignment", ["raydyn/_ext/assignment.c"], optional=True,
                             # no fused multiply-add: the kernel's ground costs must round as numpy's do
                             extra_compile_args=["-O3", "-ffp-contract=off"])])
