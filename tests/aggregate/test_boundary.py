"""Boundaries along one axis on planted data: intervals contain the truth; log axes; seeds."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from raydyn.aggregate.boundary import (
    axis_midpoint,
    find_boundaries,
    find_boundaries_rows,
    infer_log,
    summarise_points,
)

SEED = int(os.environ.get("RAYDYN_TEST_SEED", "0"))


def planted(x, cuts, names):
    """Label of x for phases names[0] < cuts[0] <= names[1] < cuts[1] ..."""
    return names[int(np.searchsorted(cuts, x, side="right"))]


def test_single_boundary_linear():
    x = np.linspace(0, 1, 11)
    b = find_boundaries(x, ["a" if v < 0.43 else "b" for v in x], log=False)
    assert len(b) == 1
    b = b[0]
    assert (b.left_phase, b.right_phase) == ("a", "b")
    assert (b.lower, b.upper) == pytest.approx((0.4, 0.5))
    assert b.location == pytest.approx(0.45)
    assert b.contains(0.43) and not b.widened and b.left_fraction == b.right_fraction == 1.0
    assert b.width == pytest.approx(0.1)


def test_intervals_contain_planted_boundaries_random():
    print(f"RAYDYN_TEST_SEED={SEED}")
    rng = np.random.default_rng(SEED)
    for _ in range(200):
        cuts = np.sort(rng.uniform(0, 10, size=3))
        x = rng.uniform(0, 10, size=rng.integers(5, 40))
        labs = [planted(v, cuts, ["p", "q", "r", "s"]) for v in x]
        bs = find_boundaries(x, labs, log=False)
        for b in bs:
            # every reported boundary brackets one planted cut, and the phases agree with it
            inside = [c for c in cuts if b.lower <= c <= b.upper]
            assert inside, (b, cuts)
            assert b.lower <= b.location <= b.upper
        # every planted cut that has grid points on both sides is found
        for c in cuts:
            if x.min() < c <= x.max():
                assert any(b.contains(c) for b in bs)


def test_log_axis_midpoint_is_geometric():
    lr = np.geomspace(1e-4, 1, 9)  # half-decade steps
    labs = ["lazy" if v < 2e-2 else "diverged" for v in lr]
    (b,) = find_boundaries(lr, labs, log=True)
    assert (b.lower, b.upper) == pytest.approx((1e-2, 10**-1.5))
    assert b.location == pytest.approx(10**-1.75)
    assert b.contains(2e-2)
    assert b.width == pytest.approx(0.5 * math.log(10))
    assert b.resolved_width == pytest.approx(10**0.5 - 1)
    # auto detects the log spacing
    (b2,) = find_boundaries(lr, labs)
    assert b2.log and b2.location == pytest.approx(b.location)
    # the linear midpoint would be different
    assert axis_midpoint(1e-2, 10**-1.5, False) != pytest.approx(b.location)


def test_log_axis_rejects_nonpositive():
    with pytest.raises(ValueError, match="positive"):
        find_boundaries([0.0, 1.0, 2.0], ["a", "a", "b"], log=True)


def test_infer_log():
    assert infer_log(np.geomspace(1e-3, 1e-1, 5))
    assert infer_log([1, 2, 4, 8])
    assert not infer_log(np.linspace(1, 5, 9))
    assert not infer_log([-1, 0, 1])
    assert not infer_log([1.0])


def test_seeds_disagree_widen_and_report_fraction():
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    labels = [["a"] * 4, ["a"] * 4, ["a", "a", "a", "b"], ["b"] * 4, ["b"] * 4]
    (b,) = find_boundaries(x, labels, log=False)
    assert (b.left_value, b.right_value) == (3.0, 4.0)
    assert (b.lower, b.upper) == (2.0, 4.0) and b.widened
    assert b.left_fraction == 0.75 and b.right_fraction == 1.0
    assert b.location == 3.5
    # mixed on the right side widens to the right
    labels = [["a"] * 3, ["a"] * 3, ["b", "b", "a"], ["b"] * 3, ["b"] * 3]
    (b,) = find_boundaries(x, labels, log=False)
    assert (b.lower, b.upper) == (2.0, 4.0) and b.right_fraction == pytest.approx(2 / 3)
    assert (b.left_value, b.right_value) == (2.0, 3.0)


def test_repeated_values_are_seeds():
    x = [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    labs = ["a", "a", "a", "b", "b", "b"]
    pts = summarise_points(x, labs)
    assert list(pts.values) == [1.0, 2.0, 3.0]
    assert pts.fraction.tolist() == [1.0, 0.5, 1.0]
    # tie at x=2 goes to the previous point's label 'a'; boundary between 2 and 3, widened to [1, 3]
    (b,) = find_boundaries(x, labs, log=False)
    assert (b.left_phase, b.left_value, b.right_value) == ("a", 2.0, 3.0)
    assert (b.lower, b.upper) == (1.0, 3.0)


def test_unsorted_input_and_several_boundaries():
    x = np.array([5, 1, 3, 2, 4, 6], dtype=float)
    names = {1: "lazy", 2: "lazy", 3: "catapult", 4: "catapult", 5: "diverged", 6: "diverged"}
    bs = find_boundaries(x, [names[int(v)] for v in x], log=False)
    assert [(b.left_phase, b.right_phase) for b in bs] == [("lazy", "catapult"), ("catapult", "diverged")]
    assert [b.location for b in bs] == [2.5, 4.5]


def test_single_phase_has_no_boundary():
    assert find_boundaries([1, 2, 3], ["x", "x", "x"]) == []


def test_rows():
    x = np.linspace(0, 1, 6)
    rows = [["a" if v < c else "b" for v in x] for c in (0.1, 0.5, 0.9)]
    out = find_boundaries_rows(x, rows, log=False)
    for c, bs in zip((0.1, 0.5, 0.9), out):
        assert len(bs) == 1 and bs[0].contains(c)
    with pytest.raises(ValueError, match="row 1"):
        find_boundaries_rows(x, [rows[0], rows[1][:-1]])


def test_input_validation():
    with pytest.raises(ValueError, match="length"):
        find_boundaries([1, 2], ["a"])
    with pytest.raises(ValueError, match="finite"):
        find_boundaries([1, np.nan], ["a", "b"])
    with pytest.raises(ValueError, match="strings"):
        find_boundaries([1, 2], [1, 2])
    with pytest.raises(ValueError, match="log"):
        find_boundaries([1, 2], ["a", "b"], log="yes")
