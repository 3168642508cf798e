"""The compiled fused Wasserstein kernel (raydyn/_ext/assignment.c: wasserstein_pair_sums) gives the
numpy path's distances bit for bit, and the pair ranges of the Ray fan-out cover the upper triangle."""
from __future__ import annotations

import numpy as np
import pytest

from raydyn.analysis.koopman import distances as K


def _spectra(rng, sizes, ties=False):
    out = []
    for s in sizes:
        e = rng.normal(size=s) + 1j * rng.normal(size=s)
        if ties:  # coarse grid: many equal costs, equal eigenvalues, several optimal assignments
            e = np.round(e.real * 2) / 2 + 1j * np.round(e.imag)
        out.append(e)
    return out


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("ties", [False, True])
def test_fused_kernel_is_bit_identical_to_numpy(p, ties, monkeypatch):
    if K._fused_pair_sums is None:
        pytest.skip("the C extension was not built (or is older than wasserstein_pair_sums)")
    rng = np.random.default_rng(7)
    spectra = _spectra(rng, rng.choice([3, 5, 6, 10, 10, 12], size=120), ties)
    spectra += [spectra[5] + 1e-4 * rng.normal(size=spectra[5].size) for _ in range(20)]  # easy pairs
    periods = rng.choice([np.pi, 2.0, np.inf], size=len(spectra))
    fast = [K.pairwise_wasserstein(spectra, p=p), K.pairwise_wasserstein(spectra, p=p, imag_period=periods),
            K.wasserstein_block(spectra[:40], spectra[40:], p=p, imag_period=periods)]
    monkeypatch.setattr(K, "_fused_pair_sums", None)
    slow = [K.pairwise_wasserstein(spectra, p=p), K.pairwise_wasserstein(spectra, p=p, imag_period=periods),
            K.wasserstein_block(spectra[:40], spectra[40:], p=p, imag_period=periods)]
    for a, b in zip(fast, slow):
        assert np.array_equal(a, b)


def test_fused_kernel_checks_its_buffers():
    if K._fused_pair_sums is None:
        pytest.skip("the C extension was not built (or is older than wasserstein_pair_sums)")
    a = np.tile(np.arange(6, dtype=np.complex128), (4, 1)).view(np.float64)  # a pair of equal spectra: easy
    rows = np.arange(3, dtype=np.intp)
    rowmin, sums, hard = np.empty((3, 6)), np.empty(3), np.empty(3, dtype=bool)
    K._fused_pair_sums(a, a, 6, rows, rows, None, False, rowmin, sums, hard)
    assert not hard.any() and (rowmin == 0).all()
    with pytest.raises(IndexError):
        K._fused_pair_sums(a, a, 6, rows + 2, rows, None, False, rowmin, sums, hard)
    with pytest.raises(ValueError):
        K._fused_pair_sums(a, a, 6, rows, rows, None, False, np.empty((3, 5)), sums, hard)
    with pytest.raises(TypeError):
        K._fused_pair_sums(a, a, 6, rows.astype(np.int32), rows, None, False, rowmin, sums, hard)


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_pair_ranges_cover_the_upper_triangle(n):
    from raydyn.fanout import _pair_range

    iu, ju = np.triu_indices(n, 1)
    total = n * (n - 1) // 2
    for step in (1, 4, total):
        got = [_pair_range(n, s, min(s + step, total)) for s in range(0, total, step)]
        assert np.array_equal(np.concatenate([g[0] for g in got]), iu)
        assert np.array_equal(np.concatenate([g[1] for g in got]), ju)


@pytest.mark.ray
def test_fanout_is_bit_identical_to_the_pure_kernel(ray_session):
    from raydyn.fanout import pairwise_distance_matrix

    rng = np.random.default_rng(11)
    spectra = _spectra(rng, rng.choice([4, 10, 10], size=90))
    ref = K.pairwise_wasserstein(spectra)
    for kw in ({}, {"n_actors": 1}, {"block_size": 7, "n_actors": 2}, {"block_size": 1000}):
        got = pairwise_distance_matrix(spectra, **kw)
        assert np.array_equal(got, ref), kw
