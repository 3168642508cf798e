"""Weight statistics against hand-computed values and against per-member / numpy references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydyn.analysis.weight_stats import FEATURES, weight_stats

# A = [[1, 1], [1, 1]]: singular values (2, 0); trace 2; L1 4; L2 2.
A = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
# B = [[3, 0], [4, 0], [0, 1]] (3x2): B^T B = diag(25, 1) -> singular values (5, 1);
# trace = B00 + B11 = 3 + 0 = 3; L1 = 8; L2 = sqrt(26).
B = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, 1.0]])
BIAS1 = torch.tensor([1.0, -2.0, 3.0])
BIAS2 = torch.tensor([0.5])


def _hand_values() -> dict[str, float]:
    a = dict(l1=4.0, l2=2.0, tr=2.0, sp=2.0, svm=1.0, svv=2.0)  # var([2,0], ddof=1) = 2
    b = dict(l1=8.0, l2=math.sqrt(26), tr=3.0, sp=5.0, svm=3.0, svv=8.0)  # var([5,1], ddof=1) = 8
    w = np.concatenate([A.numpy().ravel(), B.numpy().ravel()])
    bias = np.array([1.0, -2.0, 3.0, 0.5])
    return {
        "w_l1": (a["l1"] + b["l1"]) / 2,
        "w_l2": (a["l2"] + b["l2"]) / 2,
        "w_trace": (a["tr"] + b["tr"]) / 2,
        "w_spectral": (a["sp"] + b["sp"]) / 2,
        "w_l1_l2": (4 / 2 + 8 / math.sqrt(26)) / 2,
        "w_trace_spectral": (2 / 2 + 3 / 5) / 2,
        "sv_mean": (a["svm"] + b["svm"]) / 2,
        "sv_var": (a["svv"] + b["svv"]) / 2,
        "w_mean": w.mean(),
        "w_median": 1.0,  # sorted entries: 0,0,0,0,1,1,1,1,1,3,4 -> middle (6th of 11) is 1
        "w_var": w.var(ddof=1),
        "b_mean": 0.625,
        "b_median": 0.5,  # sorted [-2, 0.5, 1, 3]: torch takes the lower middle value
        "b_var": bias.var(ddof=1),
    }


def _population(p: int = 3) -> dict[str, torch.Tensor]:
    """Member 0 is exactly (A, B, biases); members 1.. are seeded perturbations."""
    g = torch.Generator().manual_seed(0)
    mats_a = [A] + [A + torch.randn(2, 2, generator=g) for _ in range(p - 1)]
    mats_b = [B] + [B + torch.randn(3, 2, generator=g) for _ in range(p - 1)]
    b1 = [BIAS1] + [torch.randn(3, generator=g) for _ in range(p - 1)]
    b2 = [BIAS2] + [torch.randn(1, generator=g) for _ in range(p - 1)]
    return {
        "l0.weight": torch.stack(mats_a),
        "l0.bias": torch.stack(b1),
        "l1.weight": torch.stack(mats_b),
        "l1.bias": torch.stack(b2),
    }


def test_features_order_and_shapes():
    out = weight_stats(_population())
    assert tuple(out) == FEATURES
    assert len(FEATURES) == 14
    for v in out.values():
        assert v.shape == (3,)
        assert v.dtype == torch.float32


def test_hand_computed_values_member0():
    out = weight_stats(_population())
    for name, want in _hand_values().items():
        assert out[name][0].item() == pytest.approx(want, rel=1e-6, abs=1e-6), name


def test_batched_matches_per_member():
    pop = _population(3)
    batched = weight_stats(pop)
    for i in range(3):
        single = weight_stats({k: v[i : i + 1] for k, v in pop.items()})
        for name in FEATURES:
            torch.testing.assert_close(batched[name][i : i + 1], single[name], rtol=1e-6, atol=1e-6)


def test_against_numpy_reference_random():
    rng = np.random.default_rng(1)
    p = 4
    shapes = [(5, 3), (4, 4), (2, 6)]
    mats = [rng.normal(size=(p, *s)) for s in shapes]
    bias = rng.normal(size=(p, 7))
    params = {f"m{i}": torch.tensor(m) for i, m in enumerate(mats)} | {"b": torch.tensor(bias)}
    out = weight_stats(params)
    assert out["w_l1"].dtype == torch.float64
    for j in range(p):
        per = []
        for m in mats:
            x = m[j]
            sv = np.linalg.svd(x, compute_uv=False)
            l1, l2 = np.abs(x).sum(), np.sqrt((x**2).sum())
            tr = np.trace(x)
            per.append([l1, l2, tr, sv[0], l1 / l2, tr / sv[0], sv.mean(), sv.var(ddof=1)])
        want = np.mean(per, axis=0)
        got = np.array([out[n][j].item() for n in FEATURES[:8]])
        np.testing.assert_allclose(got, want, rtol=1e-10)
        w = np.concatenate([m[j].ravel() for m in mats])
        ws = np.sort(w)
        np.testing.assert_allclose(
            [out["w_mean"][j].item(), out["w_median"][j].item(), out["w_var"][j].item()],
            [w.mean(), ws[(len(ws) - 1) // 2], w.var(ddof=1)],
            rtol=1e-10,
        )
        np.testing.assert_allclose(
            [out["b_mean"][j].item(), out["b_var"][j].item()], [bias[j].mean(), bias[j].var(ddof=1)], rtol=1e-10
        )


def test_conv_kernel_is_reshaped_to_out_by_rest():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(3, 4, 2, 3, 3, generator=g)  # (P, out, in, kh, kw)
    a = weight_stats({"conv.weight": k})
    b = weight_stats({"conv.weight": k.reshape(3, 4, 18)})
    for name in FEATURES:
        torch.testing.assert_close(a[name], b[name], equal_nan=True)


def test_no_biases_gives_nan_bias_features_only():
    out = weight_stats({"w": torch.stack([A, 2 * A])})
    for name in ("b_mean", "b_median", "b_var"):
        assert torch.isnan(out[name]).all()
    for name in FEATURES[:11]:
        assert torch.isfinite(out[name]).all(), name
    assert out["w_l2"].tolist() == pytest.approx([2.0, 4.0])


def test_singular_value_floor():
    # diag(1, 1e-7): the small singular value is floored to 0 for sv_mean/sv_var.
    w = torch.tensor([[[1.0, 0.0], [0.0, 1e-7]]], dtype=torch.float64)
    out = weight_stats({"w": w})
    assert out["sv_mean"].item() == pytest.approx(0.5, abs=1e-15)
    assert out["sv_var"].item() == pytest.approx(0.5, abs=1e-15)
    assert out["w_spectral"].item() == pytest.approx(1.0)


def test_zero_matrix_ratios_are_zero_not_nan():
    out = weight_stats({"w": torch.zeros(2, 3, 3)})
    assert out["w_l1_l2"].tolist() == [0.0, 0.0]
    assert out["w_trace_spectral"].tolist() == [0.0, 0.0]


def test_diverged_member_is_nan_others_unchanged():
    pop = _population(3)
    ref = weight_stats(pop)
    bad = {k: v.clone() for k, v in pop.items()}
    bad["l1.weight"][1, 0, 0] = float("nan")
    bad["l0.bias"][1, 0] = float("inf")
    out = weight_stats(bad)
    for name in FEATURES:
        assert torch.isnan(out[name][1]), name
        torch.testing.assert_close(out[name][[0, 2]], ref[name][[0, 2]])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="params is empty"):
        weight_stats({})
    with pytest.raises(ValueError, match="population sizes"):
        weight_stats({"a": torch.zeros(2, 3, 3), "b": torch.zeros(3, 3, 3)})
    with pytest.raises(ValueError, match="no weight matrix"):
        weight_stats({"b": torch.zeros(2, 3)})
