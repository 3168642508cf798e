"""The ntk and sharpness probes record the curvature of every member on schedule, NaN elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydyn.analysis.curvature import ntk_top_eigenvalue_exact, sharpness_exact
from raydyn.spec import parse_sweep, populations
from raydyn.tasks.build import init_model, load_data
from raydyn.train.objectives import loss_fn
from raydyn.train.population import train_population

UV = """
name: uvp
task: {dataset: single, model: uv, width: 40}
train: {steps: 30, batch_size: 1, lr: 2.5, lr_units: ntk, record_every: 2, curvature_every: 10,
        record: [weights, ntk, sharpness], dtype: float64}
parameters:
  lr: {values: [1.0, 2.5]}
  seed: {values: [0, 1]}
"""


def test_uv_probes_match_the_exact_curvature_at_every_measured_step():
    (pop,) = populations(parse_sweep(UV).expand(), 64)
    res = train_population(pop)
    mt = res.recorder.metrics_table().to_pandas()
    wt = res.recorder.weights_table().to_pandas()
    for m in pop.members:
        rows = mt[mt.run_id == m.run_id].reset_index(drop=True)
        w = wt[wt.run_id == m.run_id].reset_index(drop=True)
        measured = rows.step.isin([0, 10, 20, 30]).to_numpy()
        assert np.isfinite(rows.ntk_top[measured]).all() and np.isfinite(rows.sharpness[measured]).all()
        assert rows.ntk_top[~measured].isna().all() and rows.sharpness[~measured].isna().all()
        for i in np.flatnonzero(measured):
            vec = np.asarray(w.weights[i], dtype=np.float64)  # float32 snapshot of [u, v]
            u, v = vec[:40], vec[40:]
            assert rows.ntk_top[i] == pytest.approx((u @ u + v @ v) / 40, rel=1e-6)  # uv NTK, exactly
            # Hessian of f^2/2 with f = u.v/sqrt(m), checked against a dense Hessian
            p = torch.from_numpy(np.concatenate([u, v]))

            def loss(q):
                return 0.5 * (q[:40] @ q[40:] / np.sqrt(40)) ** 2

            assert rows.sharpness[i] == pytest.approx(sharpness_exact(loss, p), rel=1e-5, abs=1e-9)


def test_mlp_ntk_probe_equals_dense_ntk_at_init():
    text = """
name: mlpp
task: {dataset: teacher, model: mlp, depth: 1, width: 8, data: {n_train: 12, n_test: 4, d_in: 3}}
train: {steps: 4, batch_size: 12, lr: 0.1, record_every: 2, curvature_every: 2, record: [ntk, sharpness],
        dtype: float64, curvature_batch: 12}
parameters:
  seed: {values: [0, 1]}
"""
    (pop,) = populations(parse_sweep(text).expand(), 64)
    mt = train_population(pop).recorder.metrics_table().to_pandas()
    for m in pop.members:
        data = load_data(m.config)
        model = init_model(m.config, data)
        params = {k: v.detach() for k, v in model.named_parameters()}
        fn = lambda p, x: torch.func.functional_call(model, p, (x,))  # noqa: E731
        row = mt[(mt.run_id == m.run_id) & (mt.step == 0)].iloc[0]
        assert row.ntk_top == pytest.approx(ntk_top_eigenvalue_exact(fn, params, data.x_train), rel=1e-6)
        exact = sharpness_exact(lambda p: loss_fn("mse", fn(p, data.x_train), data.y_train), params)
        assert row.sharpness == pytest.approx(exact, rel=1e-5)
