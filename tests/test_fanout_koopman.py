"""Ray fan-out of the pairwise Wasserstein matrix equals the pure kernel."""
from __future__ import annotations

import numpy as np
import pytest

from raydyn.analysis.koopman import pairwise_wasserstein

pytestmark = pytest.mark.ray


def _spectra(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.choice([3, 6, 10, 10, 10], size=n)
    return [rng.normal(size=s) + 1j * rng.normal(size=s) for s in sizes]


def test_fanout_equals_pure_kernel(ray_session):
    from raydyn.fanout import pairwise_distance_matrix

    spectra = _spectra(0, 150)
    ref = pairwise_wasserstein(spectra)
    got = pairwise_distance_matrix(spectra, block_size=40, n_actors=2)  # 4 x 4 blocks, ragged last
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    assert np.array_equal(got, got.T)
    got_default = pairwise_distance_matrix(spectra, p=2)
    np.testing.assert_allclose(got_default, pairwise_wasserstein(spectra, p=2), rtol=0, atol=1e-12)
    assert pairwise_distance_matrix(spectra[:1]).shape == (1, 1)
    # continuous-time spectra: imaginary parts modulo per-spectrum periods, as the pure kernel
    periods = np.random.default_rng(3).choice([np.pi, 2 * np.pi, np.inf], size=len(spectra))
    got_wrapped = pairwise_distance_matrix(spectra, block_size=40, n_actors=2, imag_period=periods)
    np.testing.assert_allclose(got_wrapped, pairwise_wasserstein(spectra, imag_period=periods), rtol=0, atol=1e-12)
    assert (got_wrapped <= ref + 1e-12).all() and (got_wrapped < ref - 1e-3).any()


def test_fanout_requires_ray(monkeypatch):
    import raydyn.fanout as fanout
    from raydyn.errors import RaydynError

    monkeypatch.setattr(fanout.ray, "is_initialized", lambda: False)
    with pytest.raises(RaydynError, match="ray.init"):
        fanout.pairwise_distance_matrix(_spectra(1, 5))
