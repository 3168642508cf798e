"""Tests for raydyn.analysis.neurons: modes, linearity probe, attraction basins."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from raydyn.analysis import neurons as NR

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "0"))
print(f"test_neurons seed={SEED}")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add hand-off cost (and suffer on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _set(layer: nn.Module, W, b) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(W, dtype=torch.float64))
        layer.bias.copy_(torch.as_tensor(b, dtype=torch.float64))
    return layer


def _hand_mlp(inplace=False):
    l1 = _set(nn.Linear(2, 4).double(),
              [[1, 1], [1, -1], [-1, -1], [0, 0]], [0, 0, 0, 1])
    l2 = _set(nn.Linear(4, 3).double(),
              [[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]], [-2, 0, 0])
    return nn.Sequential(l1, nn.ReLU(inplace=inplace), l2, nn.ReLU(inplace=inplace))


def _X_pos(n=50, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return 1 + torch.rand(n, 2, generator=g, dtype=torch.float64)  # in [1, 2]^2, mixed x0 - x1 sign


# ------------------------------------------------------------------ modes


@pytest.mark.parametrize("inplace", [False, True])
def test_modes_hand_built_mlp(inplace):
    X = _X_pos()
    assert (X[:, 0] > X[:, 1]).any() and (X[:, 0] < X[:, 1]).any()
    modes = NR.neuron_modes(_hand_mlp(inplace), X, batch_size=7)
    # layer 1: x0+x1 (OPT), x0-x1 (NPT), -x0-x1 (dead), constant 1 (OPT)
    assert modes["1"] == pytest.approx((0.5, 0.25, 0.25), abs=0)
    # layer 2: 1-2 = -1 (dead), x0+x1 (OPT), exactly 0 (not > 0: dead)
    assert modes["3"] == (1 / 3, 0.0, 2 / 3)
    rates = NR.activation_rates(_hand_mlp(inplace), X)
    frac = float((X[:, 0] > X[:, 1]).double().mean())
    np.testing.assert_allclose(rates["1"], [1.0, frac, 0.0, 1.0])


def test_modes_conv_channels_count_positions():
    conv = nn.Conv2d(1, 3, 1).double()
    _set(conv, torch.tensor([0.0, 1.0, -1.0]).reshape(3, 1, 1, 1), [5.0, 0.0, -1e-3])
    model = nn.Sequential(conv, nn.ReLU())
    X = torch.zeros(4, 1, 3, 3, dtype=torch.float64)
    X[0, 0, 0, 0] = 1.0  # channel 1 is positive at exactly one (sample, position)
    rates = NR.activation_rates(model, X)["1"]
    np.testing.assert_allclose(rates, [1.0, 1 / 36, 0.0])
    assert NR.neuron_modes(model, X)["1"] == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    # LeakyReLU(0.01) is strictly increasing everywhere: every channel preserves order (OPT)
    leaky = nn.Sequential(conv, nn.LeakyReLU(0.01))
    np.testing.assert_allclose(NR.activation_rates(leaky, X)["1"], [1.0, 1.0, 1.0])


def test_modes_restore_model_and_reject_bad_input():
    model = _hand_mlp()
    model.train()
    NR.neuron_modes(model, _X_pos())
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(2, 3), nn.Linear(3, 2), nn.ReLU()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    with pytest.raises(ValueError, match="ran 2 times"):
        NR.neuron_modes(Reuse(), torch.randn(4, 2))
    with pytest.raises(ValueError, match="no activation"):
        NR.neuron_modes(nn.Linear(2, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="X_ref"):
        NR.neuron_modes(model, np.ones((3, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="X_ref"):
        NR.neuron_modes(model, torch.ones(0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        NR.neuron_modes(model, torch.full((2, 2), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="model"):
        NR.neuron_modes("model", _X_pos())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        NR.neuron_modes(model, _X_pos(), batch_size=0)


# ------------------------------------------------------------- linearity


def test_linearity_probe_zero_for_all_positive_layer():
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(64, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(SEED)
    l1 = nn.Linear(3, 5).double()
    with torch.no_grad():
        l1.bias.fill_(100.0)  # pre-activations all > 0 on X
    l2 = nn.Linear(5, 6).double()
    with torch.no_grad():  # centre layer 2 so every neuron is NPT (positive on half of X)
        l2.bias -= (l1(X).relu() @ l2.weight.T + l2.bias).median(0).values
    model = nn.Sequential(l1, nn.ReLU(inplace=True), l2, nn.ReLU(), nn.Linear(6, 3).double())
    y = torch.randint(0, 3, (64,), generator=g)
    before = model(X).detach().clone()
    assert NR.neuron_modes(model, X)["1"] == (1.0, 0.0, 0.0)
    assert NR.neuron_modes(model, X)["3"] == (0.0, 1.0, 0.0)
    res = NR.linearity_probe(model, X, y, batch_size=10)
    assert res.delta_loss["1"] == 0.0 and res.delta_accuracy["1"] == 0.0
    assert res.delta_loss["3"] != 0.0  # the NPT layer does change (test can fail)
    assert res.base_loss == pytest.approx(nn.functional.cross_entropy(before, y).item())
    assert torch.equal(model(X), before)  # model restored
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    only = NR.linearity_probe(model, X, y, layers=["3"])
    assert list(only.delta_loss) == ["3"]
    with pytest.raises(ValueError, match="not activation"):
        NR.linearity_probe(model, X, y, layers=["0"])
    with pytest.raises(ValueError, match="y must"):
        NR.linearity_probe(model, X, y[:5])
    with pytest.raises(ValueError, match="integer"):
        NR.linearity_probe(model, X, y.double())
    with pytest.raises(ValueError, match="scalar"):
        NR.linearity_probe(model, X, y, loss_fn=lambda o, t: (o - o).sum(1))


# ------------------------------------------------------------ sample basin


def _linear_classifier(D, seed=SEED):
    torch.manual_seed(seed)
    return nn.Linear(D, 2).double()


def _critical_radii(model, X, U):
    """eps at which direction u flips the class of x, for a linear 2-class model."""
    W, b = model.weight.detach(), model.bias.detach()
    v, beta = W[1] - W[0], b[1] - b[0]
    f = X @ v + beta  # (N,)
    U = U / U.norm(dim=-1, keepdim=True)
    vu = U @ v  # (R,) or (N, R)
    eps = -f[:, None] / (X.norm(dim=1)[:, None] * vu)
    return torch.where(eps > 0, eps, torch.inf).numpy()


def test_sample_basin_matches_linear_analytic_radius():
    D, N, R, tol = 6, 20, 32, 1e-6
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    U = torch.randn(R, D, generator=g, dtype=torch.float64)
    model = _linear_classifier(D)
    res = NR.sample_basin(model, X, directions=U, eps_max=50.0, tol=tol)
    crit = np.sort(_critical_radii(model, X, U), axis=1)
    allowed_flips = int(np.floor(R * (1 - 0.95) + 1e-9))  # 1 of 32
    analytic = np.minimum(crit[:, allowed_flips], 50.0)
    assert np.all(res.radii <= analytic + 1e-12)
    assert np.max(analytic - res.radii) <= tol
    assert res.median == pytest.approx(np.median(res.radii))
    np.testing.assert_array_equal(res.censored, crit[:, allowed_flips] >= 50.0)


def test_sample_basin_random_directions_match_beta_quantile():
    """With many random directions the radius converges to m / (|x| q95(t)),
    t = <u, v/|v|> for u uniform on the sphere: (t+1)/2 ~ Beta((D-1)/2, (D-1)/2)."""
    D, N, R = 10, 12, 4000
    g = torch.Generator().manual_seed(SEED + 7)
    X = torch.randn(N, D, generator=g, dtype=torch.float64)
    model = _linear_classifier(D)
    res = NR.sample_basin(model, X, n_directions=R, eps_max=100.0, tol=1e-5, seed=SEED)
    W, b = model.weight.detach(), model.bias.detach()
    v, beta = W[1] - W[0], b[1] - b[0]
    m = ((X @ v + beta).abs() / v.norm()).numpy()
    q95 = 2 * stats.beta((D - 1) / 2, (D - 1) / 2).ppf(0.95) - 1
    analytic = m / (X.norm(dim=1).numpy() * q95)
    ratio = res.radii / analytic
    print("sample basin ratio to analytic: median", np.median(ratio), "max dev", np.abs(ratio - 1).max())
    assert np.median(np.abs(ratio - 1)) < 0.03
    assert np.max(np.abs(ratio - 1)) < 0.10


def test_sample_basin_bad_input():
    model = _linear_classifier(3)
    X = torch.randn(4, 3, dtype=torch.float64)
    for kw, match in [({"n_directions": 0}, "n_directions"), ({"eps_max": -1.0}, "eps_max"),
                      ({"tol": 0.0}, "tol"), ({"keep": 1.5}, "keep"),
                      ({"directions": torch.ones(5, 4, dtype=torch.float64)}, "directions"),
                      ({"directions": torch.zeros(5, 3, dtype=torch.float64)}, "zero")]:
        with pytest.raises(ValueError, match=match):
            NR.sample_basin(model, X, **kw)
    with pytest.raises(ValueError, match="X"):
        NR.sample_basin(model, torch.ones(4, dtype=torch.float64))
    # x = 0 has no relative radius
    res = NR.sample_basin(model, torch.cat([X, torch.zeros(1, 3, dtype=torch.float64)]), tol=1e-2)
    assert np.isnan(res.radii[-1]) and np.isfinite(res.radii[:-1]).all()


# ------------------------------------------------------------ weight basin


def test_weight_basin_matches_analytic_flip_threshold():
    """Linear(1, 2) without bias on x > 0, all labelled 1: draw d flips every
    prediction once (w2 - w1) + sigma s (z2 - z1) < 0, s = |W|/sqrt(2).
    Median accuracy over 8 draws stays 1 until the 4th draw flips."""
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.2], [1.0]], dtype=torch.float64))
    X = torch.linspace(0.5, 2.0, 30, dtype=torch.float64).reshape(-1, 1)
    y = torch.ones(30, dtype=torch.long)
    rng = np.random.default_rng(SEED)
    z1 = rng.uniform(0.5, 2.0, 8)
    z2 = -rng.uniform(0.5, 2.0, 8)
    noise = [{"weight": torch.tensor([[a], [b]], dtype=torch.float64)} for a, b in zip(z1, z2)]
    s = float(model.weight.detach().norm()) / np.sqrt(2)
    sigma_d = np.sort(0.8 / (s * (z1 - z2)))
    tol = 1e-7
    w0 = model.weight.detach().clone()
    res = NR.weight_basin(model, X, y, noise=noise, sigma_max=10.0, tol=tol)
    assert res.base_accuracy == 1.0 and not res.censored
    assert sigma_d[3] - tol <= res.sigma <= sigma_d[3]
    assert res.accuracy == 1.0
    assert torch.equal(model.weight, w0)  # restored exactly
    # drop = 1: any sigma keeps accuracy >= 0, so the search is censored at sigma_max
    assert NR.weight_basin(model, X, y, noise=noise, sigma_max=10.0, drop=1.0).censored


def test_weight_basin_seeded_mlp_and_bad_input():
    g = torch.Generator().manual_seed(SEED)
    X = torch.randn(200, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] - X[:, 1] > 0).long()
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = NR.weight_basin(model, X, y, n_draws=8, tol=1e-3, seed=1)
    b = NR.weight_basin(model, X, y, n_draws=8, tol=1e-3, seed=1)
    assert a == b  # deterministic given the seed
    assert 0 < a.sigma < 1 and a.base_accuracy > 0.95
    assert a.accuracy >= a.base_accuracy - 0.01
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    only_w = NR.weight_basin(model, X, y, include=lambda n: n.endswith("weight"), tol=1e-2)
    assert only_w.sigma > 0
    for kw, match in [({"n_draws": 0}, "n_draws"), ({"sigma_max": 0.0}, "sigma_max"),
                      ({"drop": -0.1}, "drop"), ({"noise": []}, "noise"),
                      ({"noise": [{"0.weight": torch.zeros(1)}]}, "noise"),
                      ({"include": lambda n: False}, "include")]:
        with pytest.raises(ValueError, match=match):
            NR.weight_basin(model, X, y, **kw)
    with pytest.raises(ValueError, match="y must"):
        NR.weight_basin(model, X, y.reshape(-1, 1))


# ------------------------------------------------------------------ issue 15: order-preserving, per channel


def test_order_preserving_means_strictly_increasing_not_positive():
    """Lin et al.'s OPT is an order-preserving transformation of the samples. A LeakyReLU/ELU neuron with
    mixed-sign pre-activations preserves order (it was called NPT when OPT meant 'positive on every
    sample'); a GELU neuron is order-preserving above GELU's minimum at -0.75; ReLU6 stops at 6."""
    lin = _set(nn.Linear(1, 3).double(), [[1.0], [1.0], [1.0]], [0.0, -0.6, -1.5])
    X = torch.linspace(0.1, 1.0, 10, dtype=torch.float64).reshape(-1, 1)  # z in [.1,1], [-.5,.4], [-1.4,-.5]
    expect = {
        nn.ReLU: (1 / 3, 1 / 3, 1 / 3),
        nn.LeakyReLU: (1.0, 0.0, 0.0),
        nn.ELU: (1.0, 0.0, 0.0),
        nn.Softplus: (1.0, 0.0, 0.0),
        nn.GELU: (2 / 3, 1 / 3, 0.0),  # z > -0.7518: unit 2 crosses it
    }
    for act, modes in expect.items():
        got = NR.neuron_modes(nn.Sequential(lin, act()), X)["1"]
        assert got == pytest.approx(modes), act.__name__
        # the literal property, checked by sorting: outputs strictly increase with the pre-activation
        with torch.no_grad():
            z = lin(X)
            y = act()(z)
        literal = [bool((torch.diff(y[torch.argsort(z[:, c]), c]) > 0).all()) for c in range(3)]
        assert got[0] == pytest.approx(np.mean(literal)), act.__name__
    big = _set(nn.Linear(1, 2).double(), [[10.0], [5.0]], [0.5, 0.5])  # z up to 10.5 and 5.5
    assert NR.neuron_modes(nn.Sequential(big, nn.ReLU6()), X)["1"] == pytest.approx((0.5, 0.5, 0.0))


@pytest.mark.parametrize("act,lo", [(nn.GELU(), NR._GELU_MIN), (nn.GELU(approximate="tanh"), NR._GELU_TANH_MIN),
                                    (nn.SiLU(), NR._SILU_MIN), (nn.Mish(), NR._MISH_MIN),
                                    (nn.Hardswish(), NR._HARDSWISH_MIN)])
def test_order_preserving_range_starts_at_the_activation_minimum(act, lo):
    x = torch.linspace(-4, 3, 700_001, dtype=torch.float64)
    y = act(x)
    assert abs(float(x[torch.argmin(y)]) - lo) < 2e-5
    above = x > lo + 1e-4
    assert (torch.diff(y[above]) > 0).all() and (torch.diff(y[(x < lo - 1e-4) & (x > -2.9)]) < 0).all()
    assert NR.order_preserving_range(act) == (lo, float("inf"))


def test_sequence_models_count_features_not_positions():
    """A transformer MLP's activation sees (N, S, C) from an nn.Linear: its neurons are the C features
    (an event is a (sample, position) pair), not the S positions."""

    class TokenMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = _set(nn.Linear(2, 4).double(), [[1, 0], [0, 1], [-1, 0], [1, 1]], [0, 0, 0, -3])
            self.act = nn.ReLU()
            self.out = nn.Linear(4, 2).double()

        def forward(self, x):  # (N, S=3, 2)
            return self.out(self.act(self.inp(x)))[:, -1]

    g = torch.Generator().manual_seed(SEED)
    X = 0.5 + torch.rand(5, 3, 2, generator=g, dtype=torch.float64)  # features in [0.5, 1.5]
    rates = NR.activation_rates(TokenMLP(), X)["act"]
    assert rates.shape == (4,)  # it was (3,): the positions
    z = X[..., 0] + X[..., 1] - 3
    np.testing.assert_allclose(rates, [1.0, 1.0, 0.0, float((z > 0).double().mean())])
