"""Curvature: sharpness against known / dense Hessians, NTK against the explicit Jacobian, edge of stability."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydyn.analysis import curvature as C

D = torch.float64

# torch.func's first jvp calls torch.jit.script internally, which torch itself deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only add contention on a shared 2-core box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _quadratic(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=D))
    H = Q @ torch.diag(torch.tensor(eigs, dtype=D)) @ Q.T
    b = torch.randn(len(eigs), generator=g, dtype=D)
    x = torch.randn(len(eigs), generator=g, dtype=D)
    return (lambda p: 0.5 * p @ H @ p + b @ p), x, H


@pytest.mark.parametrize("backend", ["autograd", "func"])
@pytest.mark.parametrize("method,n_iter", [("lanczos", 50), ("power", 300)])
def test_sharpness_quadratic_known_hessian(method, n_iter, backend):
    loss, x, _ = _quadratic([5.0, 3.0, 1.0, -2.0, 0.5, -0.1, 0.0, 2.5])
    s = C.sharpness(loss, x, n_iter=n_iter, method=method, backend=backend, tol=1e-14)
    assert abs(s - 5.0) < 1e-8


@pytest.mark.parametrize("method,n_iter", [("lanczos", 50), ("power", 600)])
def test_sharpness_is_top_algebraic_not_largest_magnitude(method, n_iter):
    # The dominant eigenvalue is -10; sharpness is the largest algebraic one, 4.
    loss, x, _ = _quadratic([-10.0, 4.0, 1.0, 2.0, -3.0, 0.0, 3.5])
    s = C.sharpness(loss, x, n_iter=n_iter, method=method, tol=1e-14)
    assert abs(s - 4.0) < 1e-8


def test_hvp_matches_dense_hessian_columns():
    loss, x, H = _quadratic([1.0, -2.0, 3.0, 4.0])
    for backend in ("autograd", "func"):
        mv = C.hvp(loss, x, backend=backend)
        Hc = torch.stack([mv(e) for e in torch.eye(4, dtype=D)], dim=1)
        assert torch.allclose(Hc, H, atol=1e-12)


def _mlp_problem(seed=0, k=2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(20, 3, generator=g, dtype=D)
    Y = torch.randn(20, k, generator=g, dtype=D)
    p = {
        "W1": torch.randn(8, 3, generator=g, dtype=D) / math.sqrt(3),
        "b1": 0.1 * torch.randn(8, generator=g, dtype=D),
        "W2": torch.randn(k, 8, generator=g, dtype=D) / math.sqrt(8),
    }

    def model(p, X):
        return torch.tanh(X @ p["W1"].T + p["b1"]) @ p["W2"].T

    def loss(p):
        return 0.5 * ((model(p, X) - Y) ** 2).sum(1).mean()

    return model, loss, p, X


def test_sharpness_mlp_matches_dense_hessian():
    _, loss, p, _ = _mlp_problem()
    exact = C.sharpness_exact(loss, p)
    assert abs(C.sharpness(loss, p, method="lanczos") - exact) < 1e-8 * abs(exact)
    assert abs(C.sharpness(loss, p, method="power", n_iter=2000, tol=1e-13) - exact) < 1e-6 * abs(exact)
    # sharpness_exact itself against an independent dense Hessian over the flat vector
    names = list(p)
    flat = torch.cat([p[n].reshape(-1) for n in names])

    def f(v):
        parts, i = {}, 0
        for n in names:
            parts[n] = v[i : i + p[n].numel()].view_as(p[n])
            i += p[n].numel()
        return loss(parts)

    H = torch.autograd.functional.hessian(f, flat)
    assert abs(float(torch.linalg.eigvalsh(H)[-1]) - exact) < 1e-10


def test_params_not_modified_and_tuple_params_work():
    _, loss, p, _ = _mlp_problem()
    before = {k: v.clone() for k, v in p.items()}
    C.sharpness(loss, p)
    assert all(torch.equal(before[k], p[k]) for k in p)
    tup = tuple(p.values())
    s_tuple = C.sharpness(lambda t: loss(dict(zip(p.keys(), t))), tup)
    assert abs(s_tuple - C.sharpness(loss, p)) < 1e-10


@pytest.mark.parametrize("backend", ["autograd", "func"])
def test_ntk_top_eigenvalue_matches_explicit_jacobian(backend):
    model, _, p, X = _mlp_problem(k=3)
    # Independent explicit Jacobian of the flattened outputs (N = 20*3, P = 24+8+24).
    names = list(p)
    flat = torch.cat([p[n].reshape(-1) for n in names])

    def f(v):
        parts, i = {}, 0
        for n in names:
            parts[n] = v[i : i + p[n].numel()].view_as(p[n])
            i += p[n].numel()
        return model(parts, X).reshape(-1)

    J = torch.autograd.functional.jacobian(f, flat)
    top = float(torch.linalg.eigvalsh(J @ J.T / X.shape[0])[-1])
    lam = C.ntk_top_eigenvalue(model, p, X, n_iter=2000, tol=1e-14, backend=backend)
    assert abs(lam - top) < 1e-9 * top
    assert abs(C.ntk_top_eigenvalue_exact(model, p, X) - top) < 1e-10 * top
    # scale convention: Theta = scale * J J^T
    lam_sum = C.ntk_top_eigenvalue(model, p, X, n_iter=2000, tol=1e-14, scale=1.0)
    assert abs(lam_sum - top * X.shape[0]) < 1e-8 * top * X.shape[0]


def test_ntk_default_tolerance_and_warm_start():
    model, _, p, X = _mlp_problem(k=1)
    top = C.ntk_top_eigenvalue_exact(model, p, X)
    lam, vec = C.ntk_top_eigenvalue(model, p, X, return_vector=True, n_iter=500)
    assert abs(lam - top) < 1e-5 * top
    # warm start from the converged vector: one or two iterations are enough
    lam2 = C.ntk_top_eigenvalue(model, p, X, n_iter=2, v0=vec)
    assert abs(lam2 - top) < 1e-5 * top


def test_ntk_of_uv_model_is_norm_formula():
    g = torch.Generator().manual_seed(3)
    m = 50
    p = {"u": torch.randn(m, generator=g, dtype=D), "v": torch.randn(m, generator=g, dtype=D)}
    X = torch.ones(1, 1, dtype=D)

    def uv(p, X):
        return (p["u"] @ p["v"] / math.sqrt(m)) * X[:, 0]

    lam = C.ntk_top_eigenvalue(uv, p, X)
    assert abs(lam - float((p["u"] @ p["u"] + p["v"] @ p["v"]) / m)) < 1e-12


def test_bad_arguments_raise():
    _, loss, p, X = _mlp_problem()
    with pytest.raises(ValueError, match="method"):
        C.sharpness(loss, p, method="arnoldi")
    with pytest.raises(ValueError, match="n_iter"):
        C.sharpness(loss, p, n_iter=0)
    with pytest.raises(ValueError, match="backend"):
        C.hvp(loss, p, backend="jax")
    with pytest.raises(ValueError, match="scale"):
        C.ntk_top_eigenvalue(lambda q, x: x.sum(1), p, X, scale=-1.0)
    with pytest.raises(ValueError, match="params"):
        C.sharpness(loss, 3.0)


def test_edge_of_stability_tanh_mlp():
    """Cohen et al. 2021: under full-batch GD the sharpness rises (progressive
    sharpening) to ~2/eta and then hovers there. Tiny version: a 16-32-32-4 tanh MLP
    on 200 Gaussian inputs with random +-1 targets (so the loss cannot vanish
    before the sharpness gets there), MSE, eta = 2/(3 * initial sharpness)."""
    g = torch.Generator().manual_seed(0)
    n, d, h, k = 200, 16, 32, 4
    X = torch.randn(n, d, generator=g, dtype=D)
    Y = torch.sign(torch.randn(n, k, generator=g, dtype=D))
    sizes = [d, h, h, k]
    ps = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        ps += [torch.randn(b, a, generator=g, dtype=D) / math.sqrt(a), torch.zeros(b, dtype=D)]

    def model(ps, X):
        z = X
        for i in range(0, len(ps) - 2, 2):
            z = torch.tanh(z @ ps[i].T + ps[i + 1])
        return z @ ps[-2].T + ps[-1]

    def loss(ps):
        return 0.5 * ((model(ps, X) - Y) ** 2).sum(1).mean()

    s0 = C.sharpness(loss, ps)
    eta = 2.0 / (3.0 * s0)
    ps = [p.clone().requires_grad_(True) for p in ps]
    ratios = []
    for step in range(701):
        L = loss(ps)
        grads = torch.autograd.grad(L, ps)
        if step >= 400 and step % 20 == 0:
            ratios.append(C.sharpness(loss, [p.detach() for p in ps], tol=1e-6) * eta / 2)
        with torch.no_grad():
            for p, gr in zip(ps, grads):
                p -= eta * gr
    ratios = np.array(ratios)
    assert s0 * eta / 2 == pytest.approx(1 / 3)  # starts well below the edge
    assert 0.95 <= np.median(ratios) <= 1.15, ratios
    assert np.mean((ratios >= 0.95) & (ratios <= 1.15)) >= 0.8, ratios
