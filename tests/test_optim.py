"""Schedules and gradient clipping: the population's rules equal torch.optim.lr_scheduler and clip_grad_norm_."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydyn.spec import parse_sweep, populations
from raydyn.train.optim import Schedule, clip_coefficients
from raydyn.train.population import train_population
from raydyn.train.reference import make_scheduler, train_single

SCHEDULES = [
    {"schedule": "constant", "warmup_steps": 5},
    {"schedule": "cosine"},
    {"schedule": "cosine", "warmup_steps": 7, "final_lr_factor": 0.1},
    {"schedule": "linear", "final_lr_factor": 0.25},
    {"schedule": "linear", "warmup_steps": 3},
    {"schedule": "step", "decay_every": 9, "decay_gamma": 0.5},
    {"schedule": "step", "warmup_steps": 4, "decay_every": 10, "decay_gamma": 0.3},
]


@pytest.mark.parametrize("cfg", SCHEDULES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_schedule_equals_torch_lr_scheduler(cfg):
    steps = 40
    full = {"steps": steps, "lr": 0.3, **cfg}
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = make_scheduler(full, opt)
    ours = Schedule([full, {"steps": steps, "lr": 0.3}], steps, torch.float64, "cpu")  # a second, constant member
    for t in range(steps):
        f = ours.factor(t)
        assert float(f[0]) * 0.3 == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), t
        assert float(f[1]) == 1.0
        opt.step()
        sched.step()


def test_clip_coefficients_equal_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
             "b": torch.randn(3, 7, generator=g, dtype=torch.float64)}
    max_norm = torch.tensor([0.5, 1e6, float("inf")], dtype=torch.float64)
    total, coef = clip_coefficients(grads, max_norm)
    for i in range(3):
        ps = [torch.nn.Parameter(torch.zeros_like(v[i])) for v in grads.values()]
        for p, v in zip(ps, grads.values()):
            p.grad = v[i].clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, float(max_norm[i]))
        assert float(total[i]) == pytest.approx(float(norm), rel=1e-14)
        for p, v in zip(ps, grads.values()):
            torch.testing.assert_close(p.grad, v[i] * coef[i], rtol=1e-14, atol=0)
    assert float(coef[0]) < 1 and float(coef[1]) == 1.0 and float(coef[2]) == 1.0


TEXT = """
name: sch
task: {{dataset: digits, model: mlp, depth: 1, width: 12}}
train: {{steps: 30, batch_size: 32, optimizer: {opt}, record_every: 5, eval_every: 5, dtype: float64{extra}}}
parameters:
{params}
"""


@pytest.mark.parametrize("opt,extra,params", [
    ("sgd", ", momentum: 0.9, decay_every: 8", "  schedule: {values: [cosine, step, linear]}\n"
     "  warmup_steps: {values: [0, 6]}\n  clip_grad_norm: {values: [null, 0.3]}\n"),
    ("adamw", ", weight_decay: 0.1, lr: 0.01, schedule: cosine, warmup_steps: 5",
     "  clip_grad_norm: {values: [null, 0.05]}\n  seed: {values: [0, 1]}\n"),
], ids=["sgd-12-schedules-in-one-population", "adamw-cosine-clip"])
def test_members_with_schedules_and_clipping_equal_torch(opt, extra, params):
    """Schedule, warm-up and clipping differ per member of one population; each member equals train_single
    (torch.optim + torch.optim.lr_scheduler + clip_grad_norm_) to 1e-9, and its recorded lr is torch's."""
    spec = parse_sweep(TEXT.format(opt=opt, extra=extra, params=params))
    (pop,) = populations(spec.expand(), 64)
    res = train_population(pop)
    t = res.recorder.metrics_table().to_pandas()
    clipped = 0
    for m in pop.members:
        ref = train_single(m.config)
        got = t[t.run_id == m.run_id].sort_values("step")
        np.testing.assert_allclose(got.train_loss, ref["train_loss"], rtol=1e-9, equal_nan=True)
        np.testing.assert_allclose(got.lr, ref["lrs"], rtol=1e-12)
        clipped += m.config["clip_grad_norm"] is not None and bool((got.grad_norm > m.config["clip_grad_norm"]).any())
    assert clipped  # clipping was active for some member (so the comparison tests it)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 2e-6)])
def test_cross_entropy_equals_torchs_with_and_without_vmap(dtype, tol):
    """loss_fn's cross entropy (logsumexp - gathered logit, which vmap batches natively) is F.cross_entropy:
    ordinary and huge logits, its gradient too, one model and vmapped over a population."""
    import torch.nn.functional as F
    from torch.func import grad, vmap

    from raydyn.train.objectives import loss_fn

    g = torch.Generator().manual_seed(0)
    for scale in (1.0, 1e4):
        out = (scale * torch.randn(5, 64, 10, generator=g)).to(dtype)
        y = torch.randint(0, 10, (64,), generator=g)
        want = torch.stack([F.cross_entropy(o, y) for o in out])
        got = vmap(lambda o: loss_fn("cross_entropy", o, y, vmapped=True))(out)
        assert torch.allclose(got, want, rtol=tol, atol=tol * scale), (got - want).abs().max()
        assert torch.allclose(loss_fn("cross_entropy", out[0], y, vmapped=True), want[0], rtol=tol, atol=tol * scale)
        assert torch.equal(loss_fn("cross_entropy", out[0], y), want[0])  # outside vmap: F.cross_entropy itself
        g_want = torch.stack([grad(lambda o: F.cross_entropy(o, y))(o) for o in out])
        g_got = vmap(grad(lambda o: loss_fn("cross_entropy", o, y, vmapped=True)))(out)
        assert torch.allclose(g_got, g_want, rtol=tol, atol=tol), (g_got - g_want).abs().max()


@pytest.mark.parametrize("hp", [
    {"momentum": 0.9, "weight_decay": 0.0, "dampening": 0.0},
    {"momentum": 0.0, "weight_decay": 0.0, "dampening": 0.0},
    {"momentum": [0.9, 0.5, 0.7], "weight_decay": [1e-3, 0.0, 0.1], "dampening": [0.1, 0.0, 0.3]},
    {"momentum": 0.0, "weight_decay": 0.05, "dampening": 0.0},
], ids=["momentum", "plain", "per-member-wd-dampening", "wd-only"])
@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "scheduled"])
def test_foreach_sgd_equals_the_update_tensor_by_tensor_bit_for_bit(hp, scheduled, monkeypatch):
    """PopulationOptimizer's one-call-per-operation SGD gives the bits of the per-tensor update (_sgd)."""
    from raydyn.train.optim import PopulationOptimizer

    P, g = 3, torch.Generator().manual_seed(1)
    full = lambda v: torch.as_tensor(v if isinstance(v, list) else [v] * P, dtype=torch.float32)  # noqa: E731
    hps = {"lr": full([0.1, 0.05, 0.2]), "eps": full(1e-8), "beta1": full(0.9), "beta2": full(0.999),
           **{k: full(v) for k, v in hp.items()}}
    shapes = {"w1": (P, 7, 5), "b1": (P, 7), "w2": (P, 2, 7)}
    start = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    steps = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(5)]
    sched = Schedule([{"schedule": "cosine", "warmup_steps": 2}] * P, 5, torch.float32, "cpu")

    def run(foreach: bool):
        if not foreach:
            monkeypatch.setattr(PopulationOptimizer, "_sgd_foreach", lambda self, *a: False)
        opt = PopulationOptimizer("sgd", {k: v.clone() for k, v in hps.items()})
        params = {k: v.clone() for k, v in start.items()}
        for t, grads in enumerate(steps):
            opt.step(params, grads, torch.ones(P, dtype=torch.bool), sched.factor(t) if scheduled else None,
                     all_active=True)
        monkeypatch.undo()
        return params, opt.state

    (p_fast, st_fast), (p_ref, st_ref) = run(True), run(False)
    for k in shapes:
        assert torch.equal(p_fast[k], p_ref[k]), k
        assert st_fast.get(k, {}).keys() == st_ref.get(k, {}).keys()
        for slot in st_ref.get(k, {}):
            assert torch.equal(st_fast[k][slot], st_ref[k][slot])
    opt = PopulationOptimizer("sgd", {k: v.clone() for k, v in hps.items()})
    params = {k: v.clone() for k, v in start.items()}
    opt.step(params, steps[0], torch.ones(P, dtype=torch.bool), all_active=True)  # the first step creates buffers
    assert opt._sgd_foreach(params, steps[1], None)  # the path this test compares is the one taken
